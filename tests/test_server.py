"""The OpenAI-compatible server, driven with the official `openai` client on localhost:
outputs equal offline `generate`, streaming equals non-streaming, bad requests are 400s,
a disconnect frees its slot, `/metrics` parses, and a bounded load test loses nothing."""

import concurrent.futures
import http.client
import json
import time
import urllib.request

import pytest

import dspark_jax as dj

openai = pytest.importorskip("openai")

MAX_NEW = 24


@pytest.fixture(scope="module")
def target():
  return dj.load_target("tiny")


@pytest.fixture(scope="module")
def server(target):
  from dspark_jax.engine.batcher import ContinuousBatcher
  from dspark_jax.serving.server import Server
  batcher = ContinuousBatcher(target, None, slots=8, max_new_tokens=MAX_NEW, rounds_per_step=4,
                              max_prompt_len=200)
  srv = Server(target, batcher, host="127.0.0.1", port=0, model_name="tiny",
               max_waiting=512).start()
  yield srv
  srv.stop()


@pytest.fixture(scope="module")
def client(server):
  return openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused",
                       max_retries=0, timeout=120)


def _get(server, path):
  with urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}", timeout=30) as r:
    return r.read().decode()


def _offline(target, prompt_ids, max_new, **kw):
  res = dj.generate(target, [prompt_ids], max_new_tokens=max_new, **kw)
  return res.texts[0], res.tokens[0]


def test_completions_equal_offline_generate_streaming_or_not(target, client):
  prompt = "the cat sat on"
  ref, _ = _offline(target, target.tokenizer.encode(prompt), 16)
  out = client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0)
  assert out.choices[0].text == ref
  assert out.usage.completion_tokens <= 16 and out.choices[0].finish_reason in ("stop", "length")
  chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=16,
                                          temperature=0, stream=True))
  assert "".join(c.choices[0].text for c in chunks) == ref
  assert chunks[-1].choices[0].finish_reason == out.choices[0].finish_reason


def test_sampled_with_seed_equals_generate_with_that_request_id(target, client):
  prompt = "a b c"
  ids = target.tokenizer.encode(prompt)
  res = dj.generate(target, [ids], max_new_tokens=12, temperature=1.0, seed=0,
                    request_ids=[7])
  out = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=1.0,
                                  seed=7)
  assert out.choices[0].text == res.texts[0]


def test_chat_multi_turn_uses_the_chat_template(target, client):
  msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
          {"role": "user", "content": "count"}]
  ref, _ = _offline(target, target.tokenizer.apply_chat_template(msgs), 16)
  out = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=16,
                                       temperature=0)
  assert out.choices[0].message.content == ref and out.choices[0].message.role == "assistant"
  stream = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=16,
                                          temperature=0, stream=True)
  assert "".join(c.choices[0].delta.content or "" for c in stream) == ref


def test_stop_strings_cut_the_text(target, client):
  prompt = target.tokenizer.apply_chat_template([{"role": "user", "content": "Count from 3 to 9."}])
  ref, _ = _offline(target, prompt, MAX_NEW)  # token ids as the prompt
  stop = ref[5:7]
  assert len(stop) == 2
  out = client.completions.create(model="tiny", prompt=prompt, max_tokens=MAX_NEW,
                                  temperature=0, stop=[stop])
  assert out.choices[0].text == ref[:ref.index(stop)]
  assert out.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("kwargs,msg", [
    (dict(model="nope", prompt="x"), "unknown model"),
    (dict(model="tiny", prompt="x" * 300), "at most 200"),
    (dict(model="tiny", prompt="x", max_tokens=MAX_NEW + 1), "max_tokens"),
    (dict(model="tiny", prompt="x", temperature=-1), "temperature"),
    (dict(model="tiny", prompt="x", top_p=0), "top_p"),
])
def test_bad_requests_are_400_with_a_json_error(client, kwargs, msg):
  with pytest.raises(openai.BadRequestError, match=msg):
    client.completions.create(**kwargs)


def test_models_health_and_metrics(server, client):
  assert [m.id for m in client.models.list().data] == ["tiny"]
  assert json.loads(_get(server, "/health"))["status"] == "ok"
  from prometheus_client.parser import text_string_to_metric_families
  names = {f.name for f in text_string_to_metric_families(_get(server, "/metrics"))}
  for n in ["dspark_generation_tokens", "dspark_num_requests_waiting",
            "dspark_e2e_request_latency_seconds", "dspark_time_to_first_token_seconds",
            "dspark_spec_decode_num_drafts"]:
    assert n in names, n


def test_disconnect_mid_stream_frees_the_slot(server):
  conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
  body = json.dumps({"model": "tiny", "prompt": "abc", "max_tokens": MAX_NEW, "stream": True,
                     "temperature": 1.0})
  conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
  resp = conn.getresponse()
  assert resp.status == 200
  resp.fp.readline()  # the first event: the request holds a slot now
  conn.sock.close()
  conn.close()
  deadline = time.time() + 60
  while time.time() < deadline:
    h = json.loads(_get(server, "/health"))
    if h["running"] == 0 and h["waiting"] == 0:
      break
    time.sleep(0.1)
  assert h["running"] == 0 and h["waiting"] == 0


def test_load_64_concurrent_streams_lose_nothing(target, server, client):
  """Two waves of 128 streaming requests from 64 threads: each completes with its full
  output, once; after the second wave the process holds no more device arrays, bytes or
  live requests than after the first (nothing accumulates per request)."""
  import gc

  import jax

  from dspark_jax.engine.batcher import Request
  prompts = [f"{chr(97 + i % 26)} {i}" for i in range(8)]
  expected = {p: _offline(target, target.tokenizer.encode(p), 6)[0] for p in prompts}

  def one(k):
    p = prompts[k % len(prompts)]
    chunks = list(client.completions.create(model="tiny", prompt=p, max_tokens=6,
                                            temperature=0, stream=True))
    return k, p, chunks[0].id, "".join(c.choices[0].text for c in chunks)

  def footprint():
    gc.collect()
    arrays = jax.live_arrays()
    return (len(arrays), sum(a.nbytes for a in arrays),
            sum(isinstance(o, Request) for o in gc.get_objects()))

  t0 = time.time()
  seen = []
  for wave in range(2):
    with concurrent.futures.ThreadPoolExecutor(64) as pool:
      results = list(pool.map(one, range(128 * wave, 128 * (wave + 1))))
    assert sorted(k for k, *_ in results) == list(range(128 * wave, 128 * (wave + 1)))
    assert len({rid for _, _, rid, _ in results}) == 128  # no response delivered twice
    for _, p, _, text in results:
      assert text == expected[p]
    h = json.loads(_get(server, "/health"))
    assert h["running"] == 0 and h["waiting"] == 0
    seen.append(footprint())
  assert time.time() - t0 < 300
  assert seen[1][0] <= seen[0][0] and seen[1][1] <= seen[0][1], seen  # device arrays
  assert seen[1][2] <= seen[0][2] < 8, seen  # finished requests are not kept alive
  assert server.loop.batcher.engine.pool.size <= server.loop.batcher.engine.pool.max_buffers


def test_benchmark_level_counts_every_token(server):
  """`serving.bench` drives the server: C clients, full-length (ignore_eos) streams."""
  from dspark_jax.serving import bench
  lv = bench.run_level(server.port, ["a b", "c d e", "f"], concurrency=4, per_client=2,
                       max_tokens=6)
  assert lv["requests"] == 8 and lv["tokens"] == 48 and lv["all_full_length"]
  assert lv["throughput_tok_s"] > 0 and lv["ttft_p50_s"] <= lv["latency_p50_s"]
  assert lv["latency_p50_s"] <= lv["latency_p99_s"]
  levels = [dict(lv, concurrency=1, throughput_tok_s=5.0, per_user_tok_s_p50=9.0),
            dict(lv, concurrency=4, throughput_tok_s=12.0, per_user_tok_s_p50=4.0)]
  assert bench.at_sla(levels, 3.0) == {"concurrency": 4, "throughput_tok_s": 12.0}
  assert bench.at_sla(levels, 8.0) == {"concurrency": 1, "throughput_tok_s": 5.0}
  assert bench.at_sla(levels, 10.0) is None


def test_benchmark_offline_only_table_and_nothing_to_run():
  """`--concurrency=` runs only the offline comparison: its table has no server rows; with
  `--offline_prompts=0` too there is nothing to run, a one-line error before any loading."""
  from dspark_jax.serving import bench
  o = dict(static_tok_s=10.0, continuous_tok_s=8.0, continuous_vs_static=0.8, same_tokens=True)
  table = bench.markdown({"setting": "offline only", "decoders": {}, "offline": {"ar": o},
                          "sla": [5.0]})
  assert "| ar | 10.0 | 8.0 | 0.80 | True |" in table
  assert "per-user" not in table and "tok/s/user" not in table
  with pytest.raises(SystemExit, match="nothing to run"):
    bench.main(["--concurrency=", "--offline_prompts=0"])
