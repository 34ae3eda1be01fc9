"""FlexTok training (tasks/flextok_task.py), flexible-length reconstruction (`tesserax
reconstruct --tokens K`, `eval-recon --tokens K1,K2`) and `tesserax demo --flextok` at the tiny
size.

Oracles: gradient descent lowers the loss of the batch it descends on (same key, same batch);
a run interrupted and resumed equals the uninterrupted run bit for bit; decoding from K tokens
reads nothing past K (ids past K scrambled decode the same); PSNR recomputed in NumPy from the
written PNGs; the exported tokenizer encodes the training images into the demo's cache.
"""
import json
import os

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from tesserax import cli
from tesserax.backbones import digits_net
from tesserax.core import config as config_lib, sharding
from tesserax.data import pipeline
from tesserax.tokenizers import flextok, tokenizer
from tesserax.training import loop, task as task_lib

# One build of the session fixtures (the tiny FlexTok demo run among them).
pytestmark = [pytest.mark.xdist_group("flextok_task"), pytest.mark.long]


@pytest.fixture(scope="session")
def demo_run(digits_data_dir, tmp_path_factory):
  """The tiny `demo --flextok` (4 FlexTok steps, 4 AR steps), run once for the module."""
  from tesserax.demos import flextok_demo
  load = config_lib.load

  def load_here(spec):  # every recipe reads the session's digits copy
    config = load(spec)
    config.data.data_dir = config.data.data_dir or digits_data_dir
    return config

  workdir = str(tmp_path_factory.mktemp("flextok_demo"))
  mp = pytest.MonkeyPatch()
  mp.setattr(config_lib, "load", load_here)
  try:
    results = flextok_demo.run(workdir, size="tiny")
  finally:
    mp.undo()
  return workdir, results


def tiny(digits_data_dir, **overrides):
  config = config_lib.load("digits_flextok:tiny")
  config.data.data_dir = digits_data_dir
  config.update(overrides)
  return config


def test_descent_lowers_the_loss_of_its_batch(digits_data_dir):
  config = tiny(digits_data_dir)
  config.optim.update(warmup_steps=0, lr=3e-3, schedule="constant")
  task = task_lib.build(config, sharding.make_mesh(config.mesh))
  batch = next(pipeline.make_train_loader(config.data, config.batch_size, config.seed))
  x = jax.device_get(batch["image"])
  key = jax.random.PRNGKey(7)

  # REPA's target: the digits classifier's 4x4 feature map of the grayscale images.
  targets = digits_net.load_classifier(16).feature_map(x.mean(-1, keepdims=True))
  targets = targets.reshape(len(x), -1, targets.shape[-1])

  @jax.jit
  def loss(params):  # the recipe's objective at a fixed key
    trainee = nnx.merge(task.graphdef, params, task.buffers)
    return flextok.training_loss(
        trainee.tokenizer, key, x, keep_k_mode="pow2", null_prob=0.1,
        projector=trainee.projector, repa_targets=targets, repa_weight=0.5)[0]

  state = task.init()
  before = float(loss(state["params"]))
  batch = sharding.global_batch(batch, task.mesh)
  for _ in range(6):
    state, metrics = task.train_step(state, batch)
  assert np.isfinite(float(metrics["repa_loss"])) and float(metrics["repa_loss"]) < 0
  assert float(loss(state["params"])) < before


def test_resumed_run_equals_the_uninterrupted_one(demo_run, digits_data_dir, tmp_path):
  workdir, _ = demo_run
  _, full = task_lib.load_workdir(os.path.join(workdir, "flextok"))
  config = config_lib.load("digits_flextok:tiny")
  config.data.data_dir = digits_data_dir
  split = str(tmp_path / "split")
  config.num_steps = 2
  loop.train(config, split, log=lambda *a: None)
  config.num_steps = 4
  _, resumed = loop.train(config, split, log=lambda *a: None)
  assert int(resumed["step"]) == int(full["step"]) == 4
  for part in ("params", "ema", "opt"):
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed[part]),
                 jax.device_get(full[part]))
  exported = tokenizer.load(os.path.join(split, "tokenizer"))
  assert exported.family == "flextok" and "projector" not in str(exported.config)
  assert len(resumed["params"]["projector"]) == 3  # trained, and left out of the export


def read_folder(folder):
  return np.stack([np.asarray(Image.open(os.path.join(folder, n)))
                   for n in sorted(os.listdir(folder))])


@pytest.fixture(scope="session")
def random_tokenizer(tmp_path_factory):
  """A tiny digits FlexTok directory with every parameter random (no zero-init gates or heads,
  so every register reaches the output)."""
  config = config_lib.load("digits_flextok:tiny").model
  model = flextok.build(config)
  state = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.PRNGKey(3), len(leaves))
  nnx.update(model, jax.tree.unflatten(treedef, [
      0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]))
  directory = str(tmp_path_factory.mktemp("flextok_random"))
  return tokenizer.save(directory, "flextok", "flextok", config, tokenizer.flat_params(model))


def test_reconstruct_from_k_tokens_reads_only_the_first_k(random_tokenizer, digits_data_dir,
                                                          tmp_path, capsys):
  directory = random_tokenizer
  model = tokenizer.load(directory).model
  common = ["--tokenizer", directory, "--data", "digits", "--data_dir", digits_data_dir,
            "--num", "5", "--batch_size", "8"]  # one batch: the decoder noise of one call
  for k in (1, 3):
    assert cli.main(["reconstruct", *common, "--tokens", str(k), "--steps", "3",
                     "--out", str(tmp_path / f"k{k}")]) == 0
  originals = read_folder(tmp_path / "k1" / "originals")
  x = originals[..., :1].astype(np.float32) / 127.5 - 1
  ids = np.asarray(model.encode(x))
  scrambled = ids.copy()
  scrambled[:, 3:] = np.random.default_rng(0).integers(0, model.codebook_size,
                                                       scrambled[:, 3:].shape)
  expected = np.clip(np.asarray(model.decode(scrambled, num_tokens=3, steps=3)), -1, 1)
  expected = np.repeat(np.round((expected + 1) * 127.5).clip(0, 255).astype(np.uint8), 3, -1)
  got = read_folder(tmp_path / "k3" / "reconstructions")
  np.testing.assert_allclose(got.astype(int), expected.astype(int), atol=1)
  assert np.abs(got.astype(int) - read_folder(tmp_path / "k1" / "reconstructions")).max() > 8
  all_four = np.asarray(model.decode(scrambled, steps=3))  # the scrambled 4th token is read
  assert np.abs(np.clip(all_four, -1, 1) - (expected[..., :1] / 127.5 - 1)).max() > 0.1

  out = tmp_path / "per_k.json"
  assert cli.main(["eval-recon", *common, "--tokens", "1,3", "--steps", "3",
                   "--metrics", "psnr", "--out", str(out)]) == 0
  scores = json.loads(out.read_text())["tokens"]
  for k in (1, 3):
    rec = read_folder(tmp_path / f"k{k}" / "reconstructions").astype(np.float64)
    mse = ((originals.astype(np.float64) - rec) ** 2).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(scores[str(k)]["psnr"], np.mean(10 * np.log10(255 ** 2 / mse)),
                               rtol=1e-9)
  assert "tokens   3: psnr" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["reconstruct", "--tokens", "0"], "--tokens 0 is outside 1..256"),
    (["reconstruct", "--tokens", "257"], "--tokens 257 is outside 1..256"),
    (["reconstruct", "--tokens", "8"], "--tokens 8: this FlexTok has 4 registers"),
    (["eval-recon", "--tokens", "1,x"], "expected comma-separated integers"),
    (["eval-recon", "--tokens", "2,300"], "--tokens 300 is outside 1..256"),
    (["reconstruct", "--steps", "0"], "--steps must be positive"),
])
def test_bad_token_count_is_one_line(random_tokenizer, tmp_path, capsys, args, message):
  command, *flags = args
  out = ["--out", str(tmp_path / "o")] if command == "reconstruct" else []
  assert cli.main([command, "--tokenizer", random_tokenizer, "--data", "digits", *flags,
                   *out]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
  assert not os.path.exists(tmp_path / "o")


def test_tokens_flag_refused_for_a_fixed_length_tokenizer(tmp_path, capsys):
  from test_latents import tiny_tokenizer
  directory = tiny_tokenizer(tmp_path / "kl", seed=1)
  assert cli.main(["reconstruct", "--tokenizer", directory, "--data", "digits", "--tokens", "2",
                   "--out", str(tmp_path / "o")]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "flexible-length tokenizers (FlexTok)" in err, err


def test_demo_writes_per_k_figures_and_caches_the_exported_tokens(demo_run, digits_data_dir):
  workdir, results = demo_run
  with open(os.path.join(workdir, "metrics.json")) as f:
    assert json.load(f) == json.loads(json.dumps(results))
  assert sorted(results["tokenizer"], key=int) == ["1", "2", "4"]  # K <= the 4 registers
  assert sorted(results["generator"], key=int) == ["1", "2", "4"]
  for entry in [*results["tokenizer"].values(), *results["generator"].values()]:
    assert entry["fid"] >= 0
  for entry in results["generator"].values():
    assert 0 <= entry["accuracy"] <= 1
  # reconstructions.png: originals + one column per K, 10 rows of 64x64 cells.
  assert Image.open(os.path.join(workdir, "reconstructions.png")).size == (
      4 * 65 + 1, 10 * 65 + 1)
  assert Image.open(os.path.join(workdir, "flextok.png")).size[0] > 0
  model = tokenizer.load(os.path.join(workdir, "flextok", "tokenizer")).model
  cache_config = config_lib.load("digits_ar:tiny")
  cache_config.data.update(data_dir=os.path.join(workdir, "cache"), resolution=4)
  ids, labels = pipeline.load_split(cache_config.data, "train")
  images, image_labels = pipeline.load_split(pipeline.image_config(cache_config.data), "train")
  assert ids.dtype == np.int32 and ids.shape == (len(images), 4)
  np.testing.assert_array_equal(labels, image_labels)
  np.testing.assert_array_equal(ids[:64], np.asarray(model.encode(images[:64])))
