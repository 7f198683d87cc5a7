"""Draft-training data pipeline: prompt sources, regeneration (resumable), loss masks, batches."""

import json
import os

import numpy as np
import pytest

from dspark_jax import generation as generation_lib
from dspark_jax.demo import prompts as demo_prompts
from dspark_jax.demo import tiny
from dspark_jax.tokenizer import Tokenizer
from dspark_jax.training import data

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

# The Qwen3 template's behaviour that matters for the mask: the last assistant turn after the
# last user query gets an empty think block, earlier ones do not; `enable_thinking=False` adds
# the empty think block to the generation prompt.
QWEN3_LIKE = (
    "{%- set ns = namespace(last=0) %}{%- for m in messages %}{%- if m.role == 'user' %}"
    "{%- set ns.last = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for m in messages %}{%- if m.role == 'assistant' %}"
    "{%- if loop.index0 > ns.last and loop.last %}"
    "{{- '<|im_start|>assistant\n<think>\n\n</think>\n\n' + m.content.lstrip('\n') }}"
    "{%- else %}{{- '<|im_start|>assistant\n' + m.content }}{%- endif %}{{- '<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\n\n</think>\n\n' }}{%- endif %}{%- endif %}")

# Gemma 4's shape: `<|turn>role ... <turn|>\n`, "model" for the assistant, and a generation
# prompt that pre-closes an empty thought channel.
GEMMA4_LIKE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "{{ '<|turn>' + role + '\n' + m['content'] + '<turn|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|turn>model\n<|channel>thought\n<channel|>' }}{% endif %}")

SPECIALS = ["<pad>", "<|im_start|>", "<|im_end|>", "<bos>", "<|turn>", "<turn|>", "<|channel>",
            "<channel|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog.", "Hello there, how are you today?",
    "I am fine, thanks! How can I help you?", "Tell me a joke about compilers.",
    "def add(a, b):\n    return a + b\n", "Why did the chicken cross the road?",
    "To get to the other side.", "Please reason step by step, and put your answer in a box.",
    "user assistant system model thought", "Natalia sold clips to 48 of her friends in April.",
] * 3


@pytest.fixture(scope="module")
def hf_tok():
  """A small byte-level BPE trained here, wrapped as an HF fast tokenizer with ChatML."""
  from tokenizers import Tokenizer as RustTokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast
  tok = RustTokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=360, special_tokens=SPECIALS, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(CORPUS, trainer)
  return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>",
                                 bos_token="<bos>", chat_template=CHATML)


def with_template(hf, template):
  import copy
  t = copy.copy(hf)
  t.chat_template = template
  return t


def masked_segments(hf, ids, mask):
  """Decoded text of each maximal run of loss tokens."""
  segs, cur = [], []
  for t, m in zip(ids.tolist(), mask.tolist()):
    if m:
      cur.append(t)
    elif cur:
      segs.append(cur)
      cur = []
  if cur:
    segs.append(cur)
  return [hf.decode(s, skip_special_tokens=False) for s in segs]


CHAT = [{"role": "user", "content": "Hello there, how are you today?"},
        {"role": "assistant", "content": "I am fine, thanks! How can I help you?"},
        {"role": "user", "content": "Tell me a joke about compilers."},
        {"role": "assistant", "content": "Why did the chicken cross the road?\nTo get to the "
                                         "other side."}]


# ---- loss masks -----------------------------------------------------------------------------
def test_mask_covers_assistant_content_and_end_of_turn(hf_tok):
  ids, mask = data.tokenize_conversation(hf_tok, CHAT[:2])
  assert ids.dtype == np.int32 and mask.dtype == np.uint8 and ids.shape == mask.shape
  text = hf_tok.decode(ids, skip_special_tokens=False)
  assert text == hf_tok.apply_chat_template(CHAT[:2], tokenize=False)
  assert masked_segments(hf_tok, ids, mask) == [CHAT[1]["content"] + "<|im_end|>\n"]
  # Everything else (user turn, headers) is outside the loss.
  assert hf_tok.decode(ids[mask == 0], skip_special_tokens=False) == (
      "<|im_start|>user\n" + CHAT[0]["content"] + "<|im_end|>\n<|im_start|>assistant\n")


def test_multi_turn_system_prompt_and_wrapper(hf_tok):
  ids, mask = data.tokenize_conversation(Tokenizer(hf_tok), CHAT, system_prompt="Be brief.")
  assert hf_tok.decode(ids, skip_special_tokens=False).startswith(
      "<|im_start|>system\nBe brief.<|im_end|>\n")
  assert masked_segments(hf_tok, ids, mask) == [CHAT[1]["content"] + "<|im_end|>\n",
                                                CHAT[3]["content"] + "<|im_end|>\n"]
  # A chat's own system message wins over the default; ShareGPT roles are understood.
  sharegpt = [{"from": "system", "value": "Sys."}, {"from": "human", "value": "Hi"},
              {"from": "gpt", "value": "Hello there, how are you today?"}]
  ids, mask = data.tokenize_conversation(hf_tok, sharegpt, system_prompt="Be brief.")
  assert "Be brief." not in hf_tok.decode(ids)
  assert masked_segments(hf_tok, ids, mask) == ["Hello there, how are you today?<|im_end|>\n"]


def test_truncation(hf_tok):
  full_ids, full_mask = data.tokenize_conversation(hf_tok, CHAT)
  ids, mask = data.tokenize_conversation(hf_tok, CHAT, max_length=30)
  assert len(ids) == 30 < len(full_ids)
  np.testing.assert_array_equal(ids, full_ids[:30])
  np.testing.assert_array_equal(mask, full_mask[:30])


def test_qwen3_think_block_follows_the_generation_prompt(hf_tok):
  tok = with_template(hf_tok, QWEN3_LIKE)
  ids, mask = data.tokenize_conversation(tok, CHAT)
  # As in DeepSpec (no template kwargs): the last turn's empty think block is in the loss.
  assert masked_segments(tok, ids, mask) == [
      CHAT[1]["content"] + "<|im_end|>\n",
      "<think>\n\n</think>\n\n" + CHAT[3]["content"] + "<|im_end|>\n"]
  # With enable_thinking=False the block is part of the generation prompt, hence no target.
  ids, mask = data.tokenize_conversation(tok, CHAT,
                                         chat_template_kwargs={"enable_thinking": False})
  assert masked_segments(tok, ids, mask)[1] == CHAT[3]["content"] + "<|im_end|>\n"


def test_gemma4_assistant_prefix_is_excluded(hf_tok):
  tok = with_template(hf_tok, GEMMA4_LIKE)
  prefix = "<|channel>thought\n<channel|>"
  ids, mask = data.tokenize_conversation(tok, CHAT, assistant_prefix=prefix)
  text = tok.decode(ids, skip_special_tokens=False)
  assert text.count("<|turn>model\n" + prefix) == 2
  assert masked_segments(tok, ids, mask) == [CHAT[1]["content"] + "<turn|>\n",
                                             CHAT[3]["content"] + "<turn|>\n"]


def test_mangling_template_raises(hf_tok):
  tok = with_template(hf_tok, CHATML.replace("m['content']", "m['content'] | upper"))
  with pytest.raises(data.TemplateMismatchError, match="verbatim"):
    data.tokenize_conversation(tok, CHAT[:2])


def test_tokenize_file_filters_and_round_trips(hf_tok, tmp_path):
  rows = [{"id": "a", "conversations": CHAT},
          {"id": 7, "conversations": CHAT[:1] + [{"role": "assistant", "content": "ok"}]},
          {"id": "c", "conversations": CHAT[2:]},
          {"id": "d", "conversations": CHAT[:1]}]  # no assistant turn: no loss tokens
  src = tmp_path / "regen.jsonl"
  src.write_text("".join(json.dumps(r) + "\n" for r in rows))
  out = tmp_path / "tokens.npz"
  counts = data.tokenize_file(Tokenizer(hf_tok), src, out, max_length=4096, min_loss_tokens=5,
                              progress=False)
  assert counts["samples"] == 2 and counts["dropped_short"] == 2 and counts["errors"] == 0
  for mmap in (True, False):
    td = data.load_tokenized(out, mmap=mmap)
    assert len(td) == 2 and list(td.ids) == ["a", "c"]
    assert td.tokens.dtype == np.int32 and td.loss_mask.dtype == np.uint8
    for i, conv in enumerate([CHAT, CHAT[2:]]):
      ids, mask = data.tokenize_conversation(hf_tok, conv)
      toks, m = td.sample(i)
      np.testing.assert_array_equal(toks, ids)
      np.testing.assert_array_equal(m, mask)
    assert counts["tokens"] == td.tokens.shape[0]
    assert counts["loss_tokens"] == int(td.loss_mask.sum())
    assert td.meta["min_loss_tokens"] == 5
  assert isinstance(data.load_tokenized(out).tokens, np.memmap)
  cut = len(data.tokenize_conversation(hf_tok, CHAT)[0]) - 3
  counts = data.tokenize_file(hf_tok, src, out, max_length=cut, min_loss_tokens=1,
                              progress=False)
  assert counts["truncated"] == 1 and data.load_tokenized(out).lengths.max() == cut


# ---- prompt sources -------------------------------------------------------------------------
def test_read_rows_formats(tmp_path):
  lines = [
      {"turns": ["q1", "q2"]},
      {"id": "x", "conversations": [{"from": "system", "value": "s"},
                                    {"from": "human", "value": "hi"},
                                    {"from": "gpt", "value": "old answer"},
                                    {"from": "tool", "value": "dropped"},
                                    {"from": "human", "value": "again"}]},
      {"id": 5, "messages": [{"role": "user", "content": "u"},
                             {"role": "assistant", "content": "a"}]},
      {"question": "How many?", "answer": "#### 3"},
      {"prompt": "Say hi."},
      {"conversations": [{"role": "assistant", "content": "no user"}]},  # skipped
  ]
  p = tmp_path / "in.jsonl"
  p.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
  with pytest.warns(UserWarning, match="without a user turn"):
    rows = data.read_rows(p)
  assert rows == [{"id": 0, "turns": ["q1", "q2"]}, {"id": "x", "turns": ["hi", "again"]},
                  {"id": 5, "turns": ["u"]}, {"id": 3, "turns": ["How many?"]},
                  {"id": 4, "turns": ["Say hi."]}]
  assert len(data.read_rows(p, limit=2)) == 2


@pytest.mark.parametrize("line,match", [
    ("{not json", r"in\.jsonl:2: invalid JSON"),
    ('{"foo": 1}', r"in\.jsonl:2: unknown row format"),
    ('{"turns": [1, 2]}', r"in\.jsonl:2: 'turns' must be a list of strings"),
    ('{"conversations": [{"role": "user", "content": ["img"]}]}', r"in\.jsonl:2 message 0"),
    ('{"id": 0, "turns": ["dup"]}', r"in\.jsonl:2: duplicate id 0"),
])
def test_read_rows_errors(tmp_path, line, match):
  p = tmp_path / "in.jsonl"
  p.write_text('{"turns": ["ok"]}\n' + line + "\n")
  with pytest.raises(data.DataFormatError, match=match):
    data.read_rows(p)


def test_stdlib_code_prompts_deterministic():
  a = demo_prompts.stdlib_code_prompts(16, seed=3)
  assert a == demo_prompts.stdlib_code_prompts(16, seed=3)
  assert len(a) == 16 and len({r["turns"][0] for r in a}) == 16
  assert len({r["id"] for r in a}) == 16
  assert all(len(r["turns"]) == 1 and len(r["turns"][0]) > 30 for r in a)
  assert any("```python" in r["turns"][0] for r in a)
  assert demo_prompts.stdlib_code_prompts(16, seed=4) != a


def test_chat_prompts_deterministic_varied_and_bounded():
  a = demo_prompts.chat_prompts(120, seed=3)
  assert a == demo_prompts.chat_prompts(120, seed=3)
  assert demo_prompts.chat_prompts(120, seed=4) != a
  assert len(a) == 120 and len({r["id"] for r in a}) == 120
  assert all(r["id"].startswith("chat-") for r in a)
  assert len({tuple(r["turns"]) for r in a}) == 120
  turns = [len(r["turns"]) for r in a]
  assert set(turns) == {1, 2, 3}  # follow-up questions on some rows
  assert all(0 < len(t) <= 1500 for r in a for t in r["turns"])
  firsts = [r["turns"][0] for r in a]
  for instruction in ("Summarise", "beginner", "example", "key points", "Compare"):
    assert any(instruction in t for t in firsts), instruction
  # Both sources: pydoc topics (language reference) and stdlib docstrings.
  assert any('statement' in t for t in firsts) and any("module" in t for t in firsts)
  assert all(len(t) <= 600 for r in demo_prompts.chat_prompts(20, max_chars=600)
             for t in r["turns"])
  assert demo_prompts.chat_prompts(0) == []


def test_clip_cuts_at_a_boundary():
  text = "First sentence here. Second one is longer than the rest of it."
  assert demo_prompts._clip(text, 36) == "First sentence here."  # not "... Second one is"
  assert demo_prompts._clip("short", 40) == "short"
  assert len(demo_prompts._clip("x" * 100, 40)) == 40


def test_data_package_keeps_the_old_names():
  """`data_lib.X` works for every name of the module before it became a package."""
  for name in ("read_rows", "normalize_messages", "DataFormatError", "TemplateMismatchError",
               "regenerate", "render_with_spans", "tokenize_conversation", "tokenize_file",
               "TokenizedData", "load_tokenized", "BatchIterator", "stdlib_code_prompts",
               "synthetic_prompts"):
    assert hasattr(data, name), name
  assert data.stdlib_code_prompts is demo_prompts.stdlib_code_prompts


# ---- batches --------------------------------------------------------------------------------
def synthetic_corpus(n=23, seed=0):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(3, 20, n)
  offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
  tokens = rng.integers(1, 100, offsets[-1]).astype(np.int32)
  mask = (rng.random(offsets[-1]) < 0.6).astype(np.uint8)
  return data.TokenizedData(tokens=tokens, loss_mask=mask, offsets=offsets,
                            ids=np.asarray([str(i) for i in range(n)]), meta={})


def test_batches_shapes_padding_and_epochs():
  corpus = synthetic_corpus()
  it = data.BatchIterator(corpus, batch_size=4, seq_len=12, seed=1, pad_id=99)
  assert it.steps_per_epoch == 5 and it.samples_per_epoch == 20
  epoch0 = [next(it) for _ in range(5)]
  b = epoch0[0]
  assert b["tokens"].shape == (4, 12) and b["tokens"].dtype == np.int32
  assert b["loss_mask"].shape == (4, 12) and b["loss_mask"].dtype == np.uint8
  assert b["lengths"].dtype == np.int32
  for batch in epoch0:
    for j, i in enumerate(batch["sample_index"]):
      toks, m = corpus.sample(i)
      n = min(len(toks), 12)
      assert batch["lengths"][j] == n
      np.testing.assert_array_equal(batch["tokens"][j, :n], toks[:n])
      np.testing.assert_array_equal(batch["loss_mask"][j, :n], m[:n])
      assert (batch["tokens"][j, n:] == 99).all() and (batch["loss_mask"][j, n:] == 0).all()
  seen = np.concatenate([x["sample_index"] for x in epoch0])
  assert len(set(seen.tolist())) == 20  # each epoch: distinct samples, remainder dropped
  epoch1 = np.concatenate([next(it)["sample_index"] for _ in range(5)])
  assert it.state()["epoch"] == 1 and not np.array_equal(seen, epoch1)
  again = data.BatchIterator(corpus, batch_size=4, seq_len=12, seed=1)
  np.testing.assert_array_equal(again.epoch_order(0).reshape(-1), seen)
  other = data.BatchIterator(corpus, batch_size=4, seq_len=12, seed=2)
  assert not np.array_equal(other.epoch_order(0).reshape(-1), seen)


@pytest.mark.parametrize("bucket_window", [0, 3])
def test_batches_exact_resume(bucket_window):
  corpus = synthetic_corpus()
  kw = dict(batch_size=4, seq_len=16, seed=5, bucket_window=bucket_window)
  ref = data.BatchIterator(corpus, **kw)
  stream = [next(ref) for _ in range(13)]  # crosses two epoch boundaries
  it = data.BatchIterator(corpus, **kw)
  for _ in range(7):
    next(it)
  state = json.loads(json.dumps(it.state()))  # what a checkpoint stores
  resumed = data.BatchIterator(corpus, **kw)
  resumed.restore(state)
  for want in stream[7:]:
    got = next(resumed)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
  if bucket_window:  # bucketing keeps each epoch a permutation subset of the samples
    order = ref.epoch_order(0).reshape(-1)
    assert len(set(order.tolist())) == 20
  with pytest.raises(ValueError, match="batch_size"):
    data.BatchIterator(corpus, batch_size=2, seq_len=16, seed=5).restore(state)


def test_batches_from_file(hf_tok, tmp_path):
  src = tmp_path / "regen.jsonl"
  src.write_text("".join(json.dumps({"id": i, "conversations": CHAT}) + "\n" for i in range(5)))
  data.tokenize_file(hf_tok, src, tmp_path / "t.npz", max_length=64, progress=False)
  it = data.BatchIterator(tmp_path / "t.npz", batch_size=2, seq_len=32,
                          pad_id=hf_tok.pad_token_id)
  b = next(it)
  assert b["tokens"].shape == (2, 32) and it.steps_per_epoch == 2


# ---- regeneration ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chat_target(hf_tok):
  cfg = tiny.tiny_config("qwen3", vocab=len(hf_tok), hidden=16, layers=1, heads=2,
                            kv_heads=1, head_dim=8)
  target = tiny.random_target(cfg, seed=3, scale=4.0)
  target.tokenizer = Tokenizer(hf_tok)
  return target


# Prompt lengths are chosen so that every generate call hits one of two compiled shapes
# (batch 2; prompt bucket 32 for turn 1, 64 for turn 2), which keeps this test fast. Rows are
# processed shortest-first, so the two 2-turn rows share the second chunk.
ROWS = [{"id": "r0", "turns": ["Hello there, how are you today?", "Why?"]},
        {"id": 1, "turns": ["Say hi."]},
        {"id": "r2", "turns": ["Tell me a joke.", "More?"]},
        {"id": "r3", "turns": ["def add(a, b):"]}]


def read_jsonl(path):
  return {str(r["id"]): r for r in map(json.loads, open(path))}


def test_regenerate_multi_turn_and_resume(chat_target, hf_tok, tmp_path, monkeypatch):
  calls = []
  real = generation_lib.generate

  def spy(target, prompts, **kw):
    calls.append([list(p) for p in prompts])
    return real(target, prompts, **kw)

  monkeypatch.setattr(generation_lib, "generate", spy)
  kw = dict(max_new_tokens=6, batch_size=4, chunk_size=2, seed=11, progress=False)
  full = tmp_path / "full.jsonl"
  data.regenerate(chat_target, ROWS, full, **kw)
  rows = read_jsonl(full)
  assert sorted(rows) == sorted(str(r["id"]) for r in ROWS)
  prompts = [p for c in calls for p in c]
  for src in ROWS:
    conv = rows[str(src["id"])]["conversations"]
    assert [m["role"] for m in conv] == ["user", "assistant"] * len(src["turns"])
    assert [m["content"] for m in conv[::2]] == src["turns"]
    assert all(not m["content"].endswith("<|im_end|>") for m in conv[1::2])
    # Turn k was prompted with the regenerated history (chat template + generation prompt).
    for k in range(len(src["turns"])):
      want = hf_tok.apply_chat_template(conv[:2 * k + 1], tokenize=False,
                                        add_generation_prompt=True)
      assert hf_tok.encode(want, add_special_tokens=False) in prompts
  # Chunk 1 (single-turn rows): one call; chunk 2 (2-turn rows): one call per turn.
  assert [len(c) for c in calls] == [2, 2, 2]
  assert all(len(r["finish_reasons"]) == len(r["conversations"]) // 2 for r in rows.values())

  # Simulated kill during the second chunk's write: two complete rows, then half a line.
  lines = full.read_text().splitlines(keepends=True)
  part = tmp_path / "part.jsonl"
  part.write_text(lines[0] + lines[1] + lines[2][:len(lines[2]) // 2])
  calls.clear()
  data.regenerate(chat_target, ROWS, part, **kw)
  assert read_jsonl(part) == rows  # resumed rows sample exactly what the full run sampled
  assert part.read_text().startswith(lines[0] + lines[1])
  assert len(part.read_text().splitlines()) == 4
  assert [len(c) for c in calls] == [2, 2]  # only the unfinished chunk was regenerated
  calls.clear()
  data.regenerate(chat_target, ROWS, part, **kw)  # complete: nothing to do
  assert not calls and read_jsonl(part) == rows
  assert not os.path.exists(tmp_path / "part_error.jsonl")

  # The regenerated file feeds the tokenizer stage directly.
  counts = data.tokenize_file(hf_tok, part, tmp_path / "t.npz", min_loss_tokens=1,
                              progress=False)
  assert counts["samples"] + counts["dropped_short"] == 4 and counts["errors"] == 0


def test_regenerate_context_limit_and_errors(chat_target, tmp_path):
  rows = [{"id": "long", "turns": ["word " * 40]}, {"id": "a", "turns": ["Say hi.", "More?"]},
          {"id": "b", "turns": ["def add(a, b):", "Why?"]}]
  out = tmp_path / "o.jsonl"
  # Turn-1 prompts have ~20 tokens, turn-2 prompts > 30: the limit ends both chats after turn 1.
  data.regenerate(chat_target, rows, out, max_new_tokens=4, progress=False,
                  max_context_tokens=30)
  got = read_jsonl(out)
  assert sorted(got) == ["a", "b"]
  assert all(len(r["conversations"]) == 2 for r in got.values())
  errs = read_jsonl(tmp_path / "o_error.jsonl")
  assert list(errs) == ["long"]
  with pytest.raises(ValueError, match="duplicate"):
    data.regenerate(chat_target, rows + rows[:1], tmp_path / "d.jsonl", max_new_tokens=4)
