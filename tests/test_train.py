"""train.py and the training library: the tiny pipeline learns, resumes exactly, shards exactly.

The tiny target (`load_target("tiny")`) is a 2-layer char-level llama trained for a few
seconds on a word-graph chat corpus, so drafts have real structure to learn in ~30 s.
"""

import glob
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import ml_dtypes
import jax.numpy as jnp
import numpy as np
import pytest

import dspark_jax as dj
from dspark_jax import demo
from dspark_jax import run_config
from dspark_jax.drafts import api
from dspark_jax.drafts.config import DraftConfigError
from dspark_jax.training import data as data_lib
from dspark_jax.training import driver
from dspark_jax.training import parallel_objective as po
from dspark_jax.training import train_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.py")


def tiny_config(**overrides):
  return run_config.apply_overrides(run_config.load_config_file(TINY), overrides)


@pytest.fixture(scope="module")
def target():
  return dj.load_target("tiny")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, target):
  """A workdir holding regenerated + tokenized data (shared by the training tests)."""
  wd = str(tmp_path_factory.mktemp("prepared"))
  cfg = tiny_config()
  driver.stage_generate_data(cfg, wd, target)
  driver.stage_tokenize(cfg, wd, target)
  return wd


def workdir_with_data(prepared, path) -> str:
  path = str(path)
  os.makedirs(path, exist_ok=True)
  shutil.copytree(os.path.join(prepared, "data"), os.path.join(path, "data"))
  return path


def eval_prompts(target, n=16):
  rows = demo.synthetic_prompts(n, seed=123)  # not the training seed
  return [target.tokenizer.apply_chat_template([{"role": "user", "content": r["turns"][0]}])
          for r in rows]


def read_metrics(wd):
  import json
  with open(os.path.join(wd, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


# ---------------------------------------------------------------------------------------------
# The tiny pipeline: loss falls, tau well above the untrained draft, greedy and T=1.
# ---------------------------------------------------------------------------------------------
# DFlash and Eagle3 learn in the full suite only (`pytest -m slow`; Eagle3 alone took ~2 of
# CI's minutes). CI still trains both: the padding / NaN test runs their steps, the DFlash
# forward is checked against its proposals and Eagle3's sampled loss against the full loss.
@pytest.mark.parametrize("algorithm", ["dspark", pytest.param("dflash", marks=pytest.mark.slow),
                                       pytest.param("eagle3", marks=pytest.mark.slow)])
def test_tiny_training_learns(algorithm, prepared, target, tmp_path):
  wd = workdir_with_data(prepared, tmp_path / algorithm)
  cfg = tiny_config(algorithm=algorithm)
  t0 = time.perf_counter()
  driver.run(cfg, wd, progress=False)
  elapsed = time.perf_counter() - t0
  print(f"{algorithm}: trained + exported in {elapsed:.1f} s")
  metrics = read_metrics(wd)
  first = np.mean([m["loss"] for m in metrics[:3]])
  last = np.mean([m["loss"] for m in metrics[-3:]])
  assert last < 0.8 * first, (first, last)
  assert not any(np.isnan(m["loss"]) for m in metrics)

  trained = dj.load_draft(os.path.join(wd, "draft"), target)
  assert trained.config.algorithm == algorithm
  untrained = api.init_draft(target, algorithm, num_layers=trained.config.num_layers,
                             block_size=trained.config.block_size,
                             markov_rank=trained.config.markov_rank,
                             target_layer_ids=trained.config.target_layer_ids, seed=1)
  prompts = eval_prompts(target)
  for temperature in (0.0, 1.0):
    taus = {}
    for name, draft in (("untrained", untrained), ("trained", trained)):
      res = dj.generate(target, prompts, draft=draft, max_new_tokens=48, temperature=temperature,
                        seed=7)
      taus[name] = res.stats.tau
    print(algorithm, temperature, taus)
    assert taus["untrained"] < 1.2, taus
    assert taus["trained"] > taus["untrained"] + 0.5, (temperature, taus)


# ---------------------------------------------------------------------------------------------
# Exact resume after SIGKILL.
# ---------------------------------------------------------------------------------------------
def _draft_tensors(wd, name="draft"):
  from safetensors.numpy import load_file
  out = {}
  for f in sorted(glob.glob(os.path.join(wd, name, "*.safetensors"))):
    out.update(load_file(f))
  return out


def test_resume_after_sigkill_matches_uninterrupted(prepared, tmp_path):
  steps, every = 120, 20
  over = {"train.max_steps": steps, "train.checkpoint_every": every, "train.epochs": 100}
  # Uninterrupted, in process.
  wd_a = workdir_with_data(prepared, tmp_path / "a")
  driver.run(tiny_config(**over), wd_a, progress=False)
  # Killed with SIGKILL once a mid-run checkpoint exists, then resumed by the same command.
  wd_b = workdir_with_data(prepared, tmp_path / "b")
  cmd = [sys.executable, str(REPO / "train.py"), f"--config={TINY}", f"--workdir={wd_b}"] + [
      f"--config.{k}={v}" for k, v in over.items()]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE)
  ckpt40 = os.path.join(wd_b, "checkpoints", "40")
  deadline = time.time() + 300
  while not os.path.isdir(ckpt40) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  _, err = proc.communicate()
  assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
  assert not os.path.exists(os.path.join(wd_b, "draft")), "run finished before the kill"
  done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "resumed from step" in done.stderr
  a, b = _draft_tensors(wd_a), _draft_tensors(wd_b)
  assert a.keys() == b.keys() and a
  for name in a:
    np.testing.assert_allclose(b[name], a[name], atol=1e-6, rtol=0, err_msg=name)
  # Lines the killed run logged after its last checkpoint are replaced, not duplicated.
  steps_of = lambda wd: [json.loads(l)["step"] for l in open(os.path.join(wd, "metrics.jsonl"))]
  assert steps_of(wd_b) == steps_of(wd_a)
  # An earlier checkpoint still kept exports beside the final draft; one not kept is an error.
  driver.run(tiny_config(**over, **{"train.export_step": 100}), wd_a, mode="export",
             progress=False)
  early = _draft_tensors(wd_a, "draft_step100")
  assert early.keys() == a.keys() and any(np.abs(early[k] - a[k]).max() > 0 for k in a)
  with pytest.raises(ValueError, match="no checkpoint of step 40"):
    driver.run(tiny_config(**over, **{"train.export_step": 40}), wd_a, mode="export",
               progress=False)


# ---------------------------------------------------------------------------------------------
# Sharded step on 8 fake CPU devices == 1-device step.
# ---------------------------------------------------------------------------------------------
SHARDED_SCRIPT = textwrap.dedent("""
    import os, sys
    import jax, numpy as np
    assert len(jax.devices()) == 8, jax.devices()
    import dspark_jax as dj
    from dspark_jax import run_config, sharding
    from dspark_jax.training import driver
    repo, prepared, out, algorithm = sys.argv[1:5]
    results = {}
    for name, mesh in (("one", dict(data=1, fsdp=1, tensor=1)),
                       ("sharded", dict(data=2, fsdp=1, tensor=4))):
      cfg = run_config.apply_overrides(run_config.load_config_file(repo + "/configs/tiny.py"), {
          "algorithm": algorithm, "mesh.data": mesh["data"], "mesh.fsdp": mesh["fsdp"],
          "mesh.tensor": mesh["tensor"], "train.max_steps": 1})
      m = sharding.make_mesh(dict(cfg.mesh))
      target = dj.load_target("tiny", mesh=m)
      trainer = driver.Trainer.create(cfg, os.path.join(out, name), target=target)
      batches = driver.make_batches(cfg, prepared)
      state = trainer.run(batches, total_steps=1, progress=False)
      if name == "sharded":
        specs = [x.sharding.spec for x in jax.tree.leaves(state.params)]
        assert any(any(a is not None for a in s) for s in specs), specs  # really sharded
      leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(state.params))[0]
      results[name] = {jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves}
    worst = max(float(np.abs(results["one"][k] - results["sharded"][k]).max())
                for k in results["one"])
    print("MAXDIFF", worst)
""")


# Eagle3's sharded step is slow only (~1 min of CI); it shares the sharding rules and train
# step with dspark, which runs in CI.
@pytest.mark.parametrize("algorithm", ["dspark", pytest.param("eagle3", marks=pytest.mark.slow)])
def test_sharded_step_matches_single_device(algorithm, prepared, tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  res = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT, str(REPO), prepared,
                        str(tmp_path), algorithm], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=600)
  assert res.returncode == 0, res.stderr[-4000:]
  diff = float(res.stdout.split("MAXDIFF")[-1])
  assert diff < 1e-5, diff


def test_two_host_run_matches_one_host(prepared, tmp_path):
  """`train.py --distributed` on 2 processes (2 CPU devices each, mesh data=2 x tensor=2 over
  both) trains and exports the same draft as one process, with one metrics writer."""
  import socket
  with socket.socket() as sock:
    sock.bind(("localhost", 0))
    port = sock.getsockname()[1]
  # Adam's eps bounds how far it amplifies a near-zero gradient: with 1e-8, float32
  # summation-order noise of ~1e-10 in such a gradient (one process vs a 2 x 2 mesh) moved a
  # weight by lr * g / (|g| + eps) ~ 1e-5 (jax 0.10.2: one Markov-head element at 1.06e-5,
  # on this code and on the previous commit alike). At 1e-3 the weights compare the sharded
  # computation, not the optimizer's sign of noise; they still move by ~lr per step.
  over = ["--config.train.max_steps=2", "--config.train.eps=1e-3"]
  wd_one = workdir_with_data(prepared, tmp_path / "one")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  one = subprocess.run([sys.executable, str(REPO / "train.py"), f"--config={TINY}",
                        f"--workdir={wd_one}"] + over, cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=600)
  assert one.returncode == 0, one.stderr[-3000:]
  wd_two = workdir_with_data(prepared, tmp_path / "two")
  procs = []
  for pid in range(2):
    penv = dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=2",
                JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2",
                JAX_PROCESS_ID=str(pid))
    procs.append(subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), f"--config={TINY}", f"--workdir={wd_two}",
         "--distributed", "--config.mesh.data=2", "--config.mesh.tensor=2"] + over,
        cwd=REPO, env=penv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
  for p in procs:
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
  a, b = _draft_tensors(wd_one), _draft_tensors(wd_two)
  assert a.keys() == b.keys() and a
  for name in a:
    np.testing.assert_allclose(b[name], a[name], atol=1e-5, rtol=0, err_msg=name)
  assert len(read_metrics(wd_two)) == len(read_metrics(wd_one)) == 1


# ---------------------------------------------------------------------------------------------
# Anchors, masks, padding.
# ---------------------------------------------------------------------------------------------
def test_anchors_inside_reply_unique_sorted():
  b, s, n = 6, 40, 8
  mask = np.zeros((b, s), np.int32)
  lengths = np.array([40, 30, 20, 12, 40, 40], np.int32)
  starts = [5, 10, 3, 8, 39, 0]
  for i, st in enumerate(starts):
    mask[i, st:lengths[i]] = 1
  mask[5] = 0  # a padding row: no reply at all
  for seed in range(5):
    anchors, keep = po.sample_anchors(jax.random.key(seed), jnp.asarray(mask),
                                      jnp.asarray(lengths), n)
    anchors, keep = np.asarray(anchors), np.asarray(keep)
    for i in range(b):
      cand = [p for p in range(s - 1) if mask[i, p] and mask[i, p + 1] and p + 1 < lengths[i]]
      kept = anchors[i][keep[i]]
      assert len(kept) == min(n, len(cand))
      assert all(p in cand for p in kept), (i, kept, cand)
      assert len(set(kept.tolist())) == len(kept)
      assert np.all(np.diff(kept) > 0)
  assert keep[5].sum() == 0 and keep[4].sum() == 0


def _tiny_parallel(target, algorithm="dspark", seed=3):
  return api.init_draft(target, algorithm, num_layers=1, block_size=4, markov_rank=8,
                        target_layer_ids=(0,), seed=seed)


def test_context_visibility_strictly_before_anchor(target):
  draft = _tiny_parallel(target)
  rng = np.random.default_rng(1)
  s = 24
  toks = jnp.asarray(rng.integers(4, 100, (1, s)), jnp.int32)
  taps, _ = train_lib.target_features(target.model, toks, draft.config.target_layer_ids)
  anchors = jnp.array([[6, 12]], jnp.int32)
  keep = jnp.ones((1, 2), bool)
  _, _, prev = po.block_labels(toks, jnp.ones((1, s)), jnp.array([s]), anchors, keep, 4)
  z0, _ = po.draft_forward(draft.module, target.model, toks, taps, anchors, keep, prev)
  # Features at the anchor and after it are invisible to that block (and to block 0).
  taps_late = taps.at[:, 12:].add(5.0)
  z1, _ = po.draft_forward(draft.module, target.model, toks, taps_late, anchors, keep, prev)
  np.testing.assert_allclose(z1[:, 1], z0[:, 1], atol=1e-5)
  np.testing.assert_allclose(z1[:, 0], z0[:, 0], atol=1e-5)
  # Features strictly before the anchor do matter.
  taps_early = taps.at[:, 8].add(5.0)
  z2, _ = po.draft_forward(draft.module, target.model, toks, taps_early, anchors, keep, prev)
  np.testing.assert_allclose(z2[:, 0], z0[:, 0], atol=1e-5)  # 8 >= 6: invisible to block 0
  assert float(jnp.abs(z2[:, 1] - z0[:, 1]).max()) > 1e-3  # 8 < 12: visible to block 1


@pytest.mark.parametrize("algorithm", ["dspark", "dflash"])
def test_training_forward_equals_propose_block(algorithm, target):
  """The teacher-forced training forward computes exactly what the decoder proposes."""
  draft = _tiny_parallel(target, algorithm)
  rng = np.random.default_rng(0)
  s = 24
  toks = jnp.asarray(rng.integers(4, 100, (1, s)), jnp.int32)
  taps, _ = train_lib.target_features(target.model, toks, draft.config.target_layer_ids)
  anchor_list = [5, 10, 15]
  anchors = jnp.array([anchor_list], jnp.int32)
  keep = jnp.ones((1, 3), bool)
  _, _, prev = po.block_labels(toks, jnp.ones((1, s)), jnp.array([s]), anchors, keep, 4)
  proposals = []
  for j, a in enumerate(anchor_list):
    tokens, logits, _ = dj.propose_block(target, draft, np.asarray(toks[0, :a + 1]).tolist())
    # Teacher-force the sequential head with the tokens the proposal itself sampled.
    prev = prev.at[0, j].set(jnp.concatenate([toks[0, a:a + 1], tokens[:-1]]))
    proposals.append(logits)
  z, _ = po.draft_forward(draft.module, target.model, toks, taps, anchors, keep, prev)
  for j in range(3):
    np.testing.assert_allclose(np.asarray(z[0, j]), np.asarray(proposals[j]), atol=2e-5)


@pytest.mark.parametrize("algorithm", ["dspark", "dflash", "eagle3"])
def test_padding_rows_zero_loss_no_nan(algorithm, target):
  cfg = tiny_config(algorithm=algorithm)
  trainer = driver.Trainer.create(cfg, "/nonexistent-unused", target=target)
  state = trainer.build(total_steps=10)
  s = 32
  rng = np.random.default_rng(0)
  toks = rng.integers(4, 100, (2, 4, s)).astype(np.int32)
  mask = np.zeros((2, 4, s), np.int32)
  lengths = np.full((2, 4), s, np.int32)
  mask[0, 0, 10:] = 1  # one real row; everything else is padding
  toks[1] = 0
  lengths[1] = 0
  batch = dict(tokens=jnp.asarray(toks), loss_mask=jnp.asarray(mask),
               lengths=jnp.asarray(lengths))
  new_state, metrics = trainer.step_fn(state, trainer.rest, target.params, batch)
  for k, v in metrics.items():
    assert np.all(np.isfinite(np.asarray(v))), k
  for leaf in jax.tree.leaves(new_state.params):
    assert np.all(np.isfinite(np.asarray(leaf)))
  # An all-padding batch: zero loss, zero gradient.
  state2 = trainer.build(total_steps=10)
  empty = dict(tokens=jnp.zeros_like(batch["tokens"]), loss_mask=jnp.zeros_like(batch["loss_mask"]),
               lengths=jnp.zeros_like(batch["lengths"]))
  _, m2 = trainer.step_fn(state2, trainer.rest, target.params, empty)
  assert float(m2["loss"]) == 0.0
  assert float(m2["grad_norm"]) == 0.0


def test_offline_feature_cache_matches_online(prepared, target, tmp_path):
  """Cached (bf16) features are the online features of the same batch, rounded to bf16."""
  from dspark_jax.training import feature_cache
  wd = workdir_with_data(prepared, tmp_path / "off")
  cfg = tiny_config(**{"features.mode": "offline",
                       "features.cache_dir": os.path.join(wd, "features")})
  trainer = driver.Trainer.create(cfg, wd, target=target)
  feature_cache.write_cache(target, trainer.dcfg, driver.data_paths(wd)["tokens"],
                            cfg.features.cache_dir, seq_len=cfg.data.seq_len)
  batch = next(driver.make_batches(cfg, wd))
  taps, hidden = train_lib.target_features(target.model, jnp.asarray(batch["tokens"]),
                                           trainer.dcfg.target_layer_ids)
  valid = np.arange(batch["tokens"].shape[1])[None, :] < batch["lengths"][:, None]
  for cached, online in ((batch["taps"], taps), (batch["hidden"], hidden)):
    cached = np.asarray(cached, np.float32)[valid]
    online = np.asarray(online, np.float32)[valid]
    # bf16 keeps 8 mantissa bits: relative rounding error <= 2^-9 (plus tiny fp reordering).
    np.testing.assert_allclose(cached, online, rtol=2.0 ** -8, atol=1e-5)
  assert float(np.abs(batch["hidden"]).max()) > 0.1  # non-trivial features


# ---------------------------------------------------------------------------------------------
# Metrics files, config errors.
# ---------------------------------------------------------------------------------------------
def test_tensorboard_reads_event_files(tmp_path):
  event_file_loader = pytest.importorskip(
      "tensorboard.backend.event_processing.event_file_loader")
  from dspark_jax.training.metrics import MetricsLogger
  logger = MetricsLogger(str(tmp_path))
  logger.write(1, {"loss": 2.5, "tau_est": 1.25})
  logger.write(2, {"loss": 2.0, "tau_est": 1.5})
  logger.close()
  files = glob.glob(str(tmp_path / "**" / "events.out.tfevents*"), recursive=True)
  assert len(files) == 1
  seen = {}
  for ev in event_file_loader.EventFileLoader(files[0]).Load():
    for v in ev.summary.value:
      val = v.simple_value if v.HasField("simple_value") else float(
          v.tensor.float_val[0])
      seen[(v.tag, ev.step)] = val
  assert seen == {("loss", 1): 2.5, ("tau_est", 1): 1.25, ("loss", 2): 2.0,
                  ("tau_est", 2): 1.5}
  assert len(read_metrics(str(tmp_path))) == 2


def test_tiny_builtin_prompts_only_without_a_prompts_file(tmp_path):
  """configs/tiny.py's 256 synthetic prompts are a fallback, not added to a given prompts file."""
  default = driver.training_prompts(tiny_config())
  assert default == demo.synthetic_prompts(256, seed=0)
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text("".join(json.dumps({"id": f"p{i}", "turns": [f"q {i}"]}) + "\n"
                             for i in range(5)))
  assert driver.training_prompts(tiny_config(**{"data.prompts": str(prompts)})) == [
      {"id": f"p{i}", "turns": [f"q {i}"]} for i in range(5)]
  # Other built-in sources replace the fallback too; an explicit count still adds.
  chat = driver.training_prompts(tiny_config(**{"data.chat_prompts": 3}))
  assert [r["id"] for r in chat] == ["chat-0-0", "chat-0-1", "chat-0-2"]
  both = driver.training_prompts(tiny_config(**{"data.prompts": str(prompts),
                                                "data.synthetic_prompts": 2}))
  assert [r["id"] for r in both] == ["p0", "p1", "p2", "p3", "p4", "synthetic-0-0",
                                     "synthetic-0-1"]
  with pytest.raises(ValueError, match="no training prompts"):
    driver.training_prompts(tiny_config(**{"data.synthetic_fallback": 0}))


def test_unknown_config_field_is_a_clear_error(tmp_path):
  with pytest.raises(run_config.ConfigError, match="train has no field 'lrate'.*valid fields.*lr"):
    tiny_config(**{"train.lrate": 1e-3})
  res = subprocess.run([sys.executable, str(REPO / "train.py"), f"--config={TINY}",
                        f"--workdir={tmp_path}", "--config.draft.blok_size=3"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
  assert res.returncode != 0
  assert "unknown config field 'draft.blok_size'" in res.stderr
  assert "Traceback" not in res.stderr


def test_layer_id_out_of_range_and_small_block(target):
  with pytest.raises(DraftConfigError, match=r"target_layer_ids \[7\] out of range"):
    driver.Trainer.create(tiny_config(**{"draft.target_layer_ids": (0, 7)}), "/unused",
                          target=target)
  with pytest.raises(DraftConfigError, match="block_size must be >= 2"):
    driver.Trainer.create(tiny_config(**{"draft.block_size": 1}), "/unused", target=target)
  with pytest.raises(DraftConfigError, match="algorithm must be dspark, dflash or eagle3"):
    driver.Trainer.create(tiny_config(algorithm="medusa"), "/unused", target=target)


@pytest.mark.parametrize("name", ["qwen3_4b", "qwen3_8b", "qwen3_14b", "gemma4_12b", "tiny"])
def test_configs_have_deepspec_defaults(name):
  cfg = run_config.load_config_file(REPO / "configs" / f"{name}.py")
  assert cfg.algorithm in ("dspark", "dflash", "eagle3")
  if name != "tiny":
    assert cfg.draft.block_size == 7 and cfg.draft.num_layers == 5
    assert cfg.train.num_anchors == 512 and cfg.draft.markov_rank == 256
    assert (cfg.train.loss_ce, cfg.train.loss_l1, cfg.train.loss_conf) == (0.1, 0.9, 1.0)
    assert cfg.train.lr == 6e-4 and cfg.train.warmup_ratio == 0.04
    assert cfg.train.max_grad_norm == 1.0 and cfg.train.global_batch_size == 512
    assert cfg.train.epochs == 10 and cfg.train.compute_dtype == "bfloat16"
    assert len(cfg.draft.target_layer_ids) == 5


# ---------------------------------------------------------------------------------------------
# Reduced draft vocabulary: the loss over N columns, and a trained restricted draft.
# ---------------------------------------------------------------------------------------------
def _random_loss_inputs(seed, v=11, p=3):
  rng = np.random.default_rng(seed)
  z = jnp.asarray(rng.normal(size=(2, 4, p, v)) * 2, jnp.float32)
  t = jnp.asarray(rng.normal(size=(2, 4, p, v)) * 2, jnp.float32)
  labels = jnp.asarray(rng.integers(0, v, size=(2, 4, p)), jnp.int32)
  mask = jnp.asarray(np.cumprod(rng.random((2, 4, p)) < 0.8, axis=-1), jnp.float32)
  conf = jnp.asarray(rng.normal(size=(2, 4, p)), jnp.float32)
  return z, conf, t, labels, mask


def test_reduced_vocab_loss_with_every_id_equals_full_loss():
  z, conf, t, labels, mask = _random_loss_inputs(0)
  w = po.LossWeights()
  full, s_full = po.losses(z, conf, t, labels, mask, w)
  ids = jnp.arange(z.shape[-1], dtype=jnp.int32)
  red, s_red = po.losses(z, conf, t, labels, mask, w, ids)
  np.testing.assert_allclose(red, full, rtol=1e-6)
  for k in ("ce", "l1", "bce", "pos_agree", "tau_sum"):
    np.testing.assert_allclose(s_red[k], s_full[k], rtol=1e-6, atol=1e-7)


def test_reduced_vocab_l1_counts_target_mass_outside_and_ce_skips_it():
  z_full, conf, t, labels, mask = _random_loss_inputs(1)
  ids = jnp.asarray([0, 3, 4, 8], jnp.int32)
  z = z_full[..., ids]
  w = po.LossWeights(ce=1.0, l1=1.0, conf=1.0)
  _, stats = po.losses(z, conf, t, labels, mask, w, ids)
  # The oracle: q over all V columns with zeros outside the vocabulary.
  q = np.zeros(t.shape, np.float64)
  q[..., np.asarray(ids)] = np.asarray(jax.nn.softmax(z, axis=-1))
  pt = np.asarray(jax.nn.softmax(t, axis=-1), np.float64)
  l1 = np.abs(q - pt).sum(-1)
  pw = np.asarray(mask) * np.exp(-np.arange(z.shape[-2]) / w.decay_gamma)
  np.testing.assert_allclose(stats["l1"], (pw * l1).sum() / (pw.sum() + 1e-6), rtol=1e-5)
  inside = np.isin(np.asarray(labels), np.asarray(ids))
  assert inside.any() and (~inside).any()
  with np.errstate(divide="ignore"):
    logq = np.log(np.take_along_axis(q, np.asarray(labels)[..., None], -1)[..., 0])
  ce = np.where(inside, -logq, 0.0)
  np.testing.assert_allclose(stats["ce"], (pw * ce).sum() / (pw.sum() + 1e-6), rtol=1e-5)
  assert np.isfinite(float(stats["ce"]))
  # Acceptance 1 - L1/2 is the exact acceptance of the restricted q: tau_sum uses it.
  alpha = np.clip(1 - l1 / 2, 0, 1)
  surv = np.cumprod(np.where(np.asarray(mask) > 0, alpha, 0.0), -1)
  tau_sum = ((1 + surv.sum(-1)) * np.asarray(mask)[..., 0]).sum()
  np.testing.assert_allclose(stats["tau_sum"], tau_sum, rtol=1e-5)


@pytest.mark.parametrize("algorithm", ["dspark", pytest.param("eagle3", marks=pytest.mark.slow)])
def test_training_a_reduced_vocab_draft(algorithm, prepared, target, tmp_path):
  wd = workdir_with_data(prepared, tmp_path / "vocab")
  n = 12
  cfg = tiny_config(**{"draft.vocab_size": n, "algorithm": algorithm})
  driver.run(cfg, wd, progress=False)
  trainer = driver.Trainer.create(cfg, wd, target=target)
  ids = trainer.draft_vocab_ids()
  assert len(ids) == n and set(target.stop_token_ids) <= set(ids.tolist())
  trained = dj.load_draft(os.path.join(wd, "draft"), target)
  assert trained.config.algorithm == algorithm and trained.config.draft_vocab_size == n
  assert np.asarray(trained.module.draft_vocab[...]).tolist() == ids.tolist()
  metrics = read_metrics(wd)
  assert metrics[-1]["loss"] < 0.8 * metrics[0]["loss"]
  prompts = eval_prompts(target)
  res = dj.generate(target, prompts, draft=trained, max_new_tokens=48, seed=7)
  ref = dj.generate(target, prompts, max_new_tokens=48)
  assert res.tokens == ref.tokens  # greedy stays exact
  print(algorithm, "tau", res.stats.tau)
  assert res.stats.tau > 1.5, res.stats.tau


def test_eagle3_sampled_positions_loss_is_the_full_loss_estimate(target):
  """K >= every row's candidates: the sampled loss is the full loss; K small: unbiased."""
  from flax import nnx
  from dspark_jax.training import eagle3_objective as e3
  cfg = tiny_config(algorithm="eagle3")
  trainer = driver.Trainer.create(cfg, "/nonexistent-unused", target=target)
  module = trainer.init_module()
  s = 24
  rng = np.random.default_rng(3)
  toks = jnp.asarray(rng.integers(4, 40, (3, s)), jnp.int32)
  mask = np.zeros((3, s), np.int32)
  mask[0, 8:20] = 1
  mask[1, 3:] = 1
  mask[2, 15:] = 1
  lengths = jnp.asarray([20, 24, 22], jnp.int32)
  mb = dict(tokens=toks, loss_mask=jnp.asarray(mask), lengths=lengths)
  out = target.model(toks, taps=trainer.dcfg.target_layer_ids, compute_logits=False)
  kw = dict(ttt_length=cfg.eagle3.ttt_length, step_decay=cfg.eagle3.step_loss_decay)
  full, _ = e3.objective(module, target.model, mb, out.taps, out.hidden, jax.random.key(0), **kw)
  exact, _ = e3.objective(module, target.model, mb, out.taps, out.hidden, jax.random.key(0),
                          loss_positions=s - 1, **kw)
  np.testing.assert_allclose(float(exact), float(full), rtol=1e-5)

  graph, state = nnx.split(module)

  @jax.jit
  def sampled(key):
    loss, _ = e3.objective(nnx.merge(graph, state), target.model, mb, out.taps, out.hidden, key,
                           loss_positions=4, **kw)
    return loss

  draws = np.asarray([float(sampled(jax.random.key(i))) for i in range(300)])
  err = draws.std() / np.sqrt(len(draws))
  assert draws.std() > 0
  assert abs(draws.mean() - float(full)) < 4 * err, (draws.mean(), float(full), err)


def test_eagle3_reduced_vocab_losses(target):
  """Over a draft vocabulary: CE keeps the target mass on the N tokens, L1 adds the mass
  outside (q = 0 there), guesses are target ids; N = V in any order is the full loss."""
  from flax import nnx
  from dspark_jax.training import eagle3_objective as e3
  rng = np.random.default_rng(0)
  v, ids = 10, np.asarray([1, 4, 5, 8], np.int32)
  z = rng.normal(size=(3, len(ids))).astype(np.float32)
  p = rng.dirichlet(np.ones(v), size=3).astype(np.float32)
  ce, l1, guess = e3.soft_losses(jnp.asarray(z), jnp.asarray(p), jnp.asarray(ids))
  q = np.exp(z - z.max(-1, keepdims=True))
  q /= q.sum(-1, keepdims=True)
  full_q = np.zeros((3, v), np.float32)
  full_q[:, ids] = q
  np.testing.assert_allclose(ce, -(p[:, ids] * np.log(q)).sum(-1), rtol=1e-5)
  np.testing.assert_allclose(l1, np.abs(full_q - p).sum(-1), rtol=1e-5)
  assert np.asarray(guess).tolist() == ids[z.argmax(-1)].tolist()

  # The whole TTT objective: a draft vocabulary of every id (shuffled) is the full loss.
  cfg = tiny_config(algorithm="eagle3")
  full_trainer = driver.Trainer.create(cfg, "/nonexistent-unused", target=target)
  module = full_trainer.init_module()
  vocab_size = target.config.vocab_size
  restricted = driver.Trainer.create(tiny_config(**{"algorithm": "eagle3",
                                                    "draft.vocab_size": vocab_size}),
                                     "/nonexistent-unused", target=target).dcfg
  other = api.build_module(restricted, jnp.float32, 0)
  nnx.update(other, nnx.state(module))
  other.draft_vocab.value = jnp.asarray(rng.permutation(vocab_size), jnp.int32)
  s = 24
  toks = jnp.asarray(rng.integers(4, 40, (2, s)), jnp.int32)
  mask = np.zeros((2, s), np.int32)
  mask[0, 6:] = 1
  mask[1, 2:18] = 1
  mb = dict(tokens=toks, loss_mask=jnp.asarray(mask), lengths=jnp.asarray([24, 20], jnp.int32))
  out = target.model(toks, taps=full_trainer.dcfg.target_layer_ids, compute_logits=False)
  kw = dict(ttt_length=cfg.eagle3.ttt_length, step_decay=cfg.eagle3.step_loss_decay,
            loss_positions=8)
  key = jax.random.key(1)
  a, sa = e3.objective(module, target.model, mb, out.taps, out.hidden, key, **kw)
  b, sb = e3.objective(other, target.model, mb, out.taps, out.hidden, key, **kw)
  np.testing.assert_allclose(float(b), float(a), rtol=1e-5)
  for name in ("pos_alpha", "pos_agree", "pos_count"):
    np.testing.assert_allclose(np.asarray(sb[name]), np.asarray(sa[name]), rtol=1e-5,
                               atol=1e-6)


def test_feature_cache_resumes_after_a_kill(prepared, target, tmp_path):
  """A cache whose run stopped after one batch resumes there and ends equal to a full run."""
  from dspark_jax.training import feature_cache
  wd = workdir_with_data(prepared, tmp_path / "resume")
  cfg = tiny_config()
  dcfg = driver.Trainer.create(cfg, wd, target=target).dcfg
  tokens = driver.data_paths(wd)["tokens"]
  full_dir, part_dir = str(tmp_path / "full"), str(tmp_path / "part")
  feature_cache.write_cache(target, dcfg, tokens, full_dir, seq_len=cfg.data.seq_len,
                            batch_size=32, progress=False)
  full = feature_cache.open_cache(full_dir)
  n = full.manifest["num_samples"]
  # The killed run: batch 0 on disk, progress says 1, no manifest yet.
  feature_cache.write_cache(target, dcfg, tokens, part_dir, seq_len=cfg.data.seq_len,
                            batch_size=32, progress=False)
  with open(os.path.join(part_dir, "progress.json")) as f:
    prog = json.load(f)
  assert prog["batches_done"] == prog["batches"] > 1
  lengths = np.asarray(data_lib.load_tokenized(tokens).lengths)
  schedule = feature_cache._schedule(lengths, 32, cfg.data.seq_len, 32)
  later = np.concatenate([idx for idx, _ in schedule[1:]])
  store = feature_cache.FeatureCache(part_dir).store
  for i in later:
    store[int(i)].write(np.full(store.shape[1:], 7.0, ml_dtypes.bfloat16)).result()  # unwritten
  os.remove(os.path.join(part_dir, "manifest.json"))
  prog["batches_done"] = 1
  with open(os.path.join(part_dir, "progress.json"), "w") as f:
    json.dump(prog, f)
  with pytest.raises(FileNotFoundError):
    feature_cache.open_cache(part_dir)
  feature_cache.write_cache(target, dcfg, tokens, part_dir, seq_len=cfg.data.seq_len,
                            batch_size=32, progress=False)
  part = feature_cache.open_cache(part_dir)
  idx = np.arange(n)
  a_taps, a_hid = full.read(idx, cfg.data.seq_len)
  b_taps, b_hid = part.read(idx, cfg.data.seq_len)
  np.testing.assert_array_equal(a_taps, b_taps)
  np.testing.assert_array_equal(a_hid, b_hid)
  # Short samples ran at their batch's padded length, not seq_len: the tail stays zero.
  idx0, length0 = schedule[0]
  assert length0 < cfg.data.seq_len and length0 % 32 == 0
  assert not a_hid[idx0, length0:].any() and a_hid[idx0[0], :lengths[idx0[0]]].any()


def test_reference_answers_fill_in_prompts_not_regenerated(tmp_path, target):
  prompts = tmp_path / "gsm.jsonl"
  rows = [{"question": f"Q{i}?", "answer": f"It is {i}*2 = <<{i}*2={2 * i}>>{2 * i}.\n#### {2 * i}"}
          for i in range(3)]
  prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
  wd = tmp_path / "wd"
  (wd / "data").mkdir(parents=True)
  regen = {"id": 1, "conversations": [{"role": "user", "content": "Q1?"},
                                      {"role": "assistant", "content": "Two."}]}
  (wd / "data" / "regenerated.jsonl").write_text(json.dumps(regen) + "\n")
  cfg = tiny_config(**{"data.prompts": str(prompts), "data.reference_answers": True,
                       "data.min_loss_tokens": 1})
  driver.stage_tokenize(cfg, str(wd), target)
  mixed = [json.loads(line) for line in (wd / "data" / "train.jsonl").read_text().splitlines()]
  assert [r["id"] for r in mixed] == [1, 0, 2]
  assert mixed[0]["conversations"][1]["content"] == "Two."
  assert mixed[2]["conversations"][1]["content"] == "It is 2*2 = 4.\n#### 4"
  assert len(data_lib.load_tokenized(wd / "data" / "tokens.npz")) == 3
