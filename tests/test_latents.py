"""Caches: the cache equals a direct computation, 8 devices give the cache of 1, an
interrupted encode resumes exactly, its statistics, the `latents` dataset of the pipeline, and
a cache of token ids written by a discrete tokenizer."""
import hashlib
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from flax import nnx

from tesserax.core import registry
from tesserax.core.errors import TesseraxError
from tesserax.data import cache as cache_lib
from tesserax.data import pipeline
from tesserax.data import preprocess
from tesserax.tokenizers import cache_encoder
from tesserax.tokenizers import kl_autoencoder
from tesserax.tokenizers import tokenizer

# One worker builds the module fixtures (compiled once) under `--dist loadgroup`.
pytestmark = pytest.mark.xdist_group("latent_cache")

HERE = os.path.dirname(os.path.abspath(__file__))
SEED, SHARD, BATCH = 3, 64, 32  # the digits test split (297 examples) in 5 shards
NUM_EXAMPLES = 297


def tiny_tokenizer(directory, seed, channels=3):
  """A random-weight KL autoencoder, its weights drawn by NumPy (nnx's initialisers compile
  for seconds), written by tokenizer.save."""
  config = kl_autoencoder.vavae_f16d32()
  config.update(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), z_channels=4,
                embed_dim=4, resolution=16, in_channels=channels)
  rng = np.random.default_rng(seed)
  params = {}
  for path, x in nnx.to_flat_state(nnx.state(nnx.eval_shape(lambda: kl_autoencoder.build(config)),
                                             nnx.Param)):
    name = ".".join(map(str, path))
    std = 1 / np.sqrt(np.prod(x.shape[:-1])) if name.endswith("kernel") else 0.1
    params[name] = (rng.normal(0, std, x.shape) + name.endswith("scale")).astype(np.float32)
  directory = tokenizer.save(directory, "vavae-f16d32", "kl_autoencoder", config, params,
                             {"mean": np.zeros(4), "std": np.ones(4)})
  saved = tokenizer.flat_params(tokenizer.load(directory).model)
  assert saved.keys() == params.keys() and all(np.array_equal(saved[k], params[k]) for k in params)
  return directory


def _image_cfg(data_dir, **overrides):
  cfg = dict(name="digits", data_dir=data_dir, manual_dir="", resolution=16, split="test",
             random_flip=False, num_classes=10)
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


def _latent_cfg(cache_dir, **overrides):
  return _image_cfg(str(cache_dir), **dict(dict(name="latents", resolution=8), **overrides))


def _encode(tokenizer_dir, data_dir, out_dir, log=lambda _: None, **kwargs):
  kwargs = dict(dict(splits=("test",), batch_size=BATCH, shard_size=SHARD, seed=SEED), **kwargs)
  return cache_encoder.encode(tokenizer_dir, _image_cfg(data_dir), str(out_dir), log=log,
                              **kwargs)


def _records(cache_dir):
  """Every record of the cache's test split, in storage order."""
  source = tfds.builder_from_directory(str(cache_dir)).as_data_source("test")
  examples = source.__getitems__(list(range(len(source))))
  return {k: np.stack([ex[k] for ex in examples])
          for k in ("index", "label", "latent", "latent_flip")}


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
  return tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"), seed=1)


@pytest.fixture(scope="session")
def cache(tokenizer_dir, digits_data_dir, tmp_path_factory):
  return _encode(tokenizer_dir, digits_data_dir, tmp_path_factory.mktemp("cache") / "c")


@pytest.fixture(scope="session")
def records(cache):
  return _records(cache)


def test_cache_holds_posterior_samples_of_images_and_flips(cache, records, tokenizer_dir,
                                                           digits_data_dir):
  images, labels = pipeline.load_split(_image_cfg(digits_data_dir), "test")
  np.testing.assert_array_equal(records["index"], np.arange(NUM_EXAMPLES))
  np.testing.assert_array_equal(records["label"], labels)
  model = tokenizer.load(tokenizer_dir).model
  some = [0, 63, 64, 296]  # shard and batch boundaries, the padded last batch
  rgb = np.tile(images[some], (1, 1, 1, 3))
  mean, logvar = jax.jit(model.posterior)(np.concatenate([rgb, rgb[:, :, ::-1]]))
  for flip, key in enumerate(("latent", "latent_flip")):
    for row, i in enumerate(some):
      eps_key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(SEED), i), flip)
      j = flip * len(some) + row
      expected = mean[j] + np.exp(logvar[j] / 2) * jax.random.normal(eps_key, mean[j].shape)
      np.testing.assert_allclose(records[key][i], expected, rtol=1e-5, atol=1e-5,
                                 err_msg=f"{key} {i}")
  assert np.abs(records["latent"][some] - mean[:len(some)]).min() > 0  # a sample, not the mean
  info = tfds.builder_from_directory(cache).info
  assert info.features["label"].num_classes == 10
  assert info.splits["test"].num_examples == NUM_EXAMPLES


def test_latent_stats_are_float64_moments_of_the_unflipped_latents(cache, records):
  stats = cache_lib.cache_stats(cache)
  z = records["latent"].astype(np.float64)
  np.testing.assert_allclose(stats["mean"], z.mean((0, 1, 2)), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(stats["std"], z.std((0, 1, 2)), rtol=1e-6)
  info = cache_lib.read_info(cache)
  assert (info["seed"], info["latent_shape"], info["image_channels"]) == (SEED, [8, 8, 4], 1)


def test_8_devices_give_the_cache_of_1_device(cache, records, tokenizer_dir, digits_data_dir,
                                              tmp_path):
  out = tmp_path / "eight"
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu")
  run = subprocess.run([sys.executable, os.path.join(HERE, "_encode_worker.py"), tokenizer_dir,
                        digits_data_dir, str(out), str(SEED), str(SHARD), "24"],
                       capture_output=True, text=True, env=env, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  eight = _records(out)
  for key in ("index", "label"):
    np.testing.assert_array_equal(eight[key], records[key])
  for key in ("latent", "latent_flip"):
    np.testing.assert_allclose(eight[key], records[key], rtol=1e-5,
                               atol=1e-5 * np.abs(records[key]).max())


def test_interrupted_encode_resumes_exactly(cache, records, tokenizer_dir, digits_data_dir,
                                            tmp_path):
  out = tmp_path / "resumed"

  def stop_after_2_shards(line):
    if line.startswith("latents test: shard 2/"):
      raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    _encode(tokenizer_dir, digits_data_dir, out, log=stop_after_2_shards)
  with pytest.raises(TesseraxError, match="tesserax data encode"):
    pipeline.load_split(_latent_cfg(out), "test")  # no metadata yet: not a cache
  shards = sorted(f for f in os.listdir(out) if f.startswith("latents-test.array_record-"))
  assert shards == ["latents-test.array_record-00000-of-00005",
                    "latents-test.array_record-00000-of-00005.stats.npz",
                    "latents-test.array_record-00001-of-00005",
                    "latents-test.array_record-00001-of-00005.stats.npz"]
  partial = out / "latents-test.array_record-00002-of-00005.tmp"
  partial.write_bytes(b"a shard killed while it was written")
  lines = []
  _encode(tokenizer_dir, digits_data_dir, out, log=lines.append)
  assert [line.split(" written")[0] for line in lines[:-1]] == [
      f"latents test: shard {s}/5" for s in (3, 4, 5)]
  resumed = _records(out)
  assert sorted(resumed["index"].tolist()) == list(range(NUM_EXAMPLES))  # none lost or doubled
  for key, value in resumed.items():
    np.testing.assert_array_equal(value, records[key], err_msg=key)
  for key in ("mean", "std"):
    np.testing.assert_array_equal(cache_lib.cache_stats(out)[key],
                                  cache_lib.cache_stats(cache)[key])
  assert not partial.exists()


def test_latents_loader_normalises_and_picks_stored_flips(cache, records):
  cfg = _latent_cfg(cache, random_flip=True)
  stats = cache_lib.cache_stats(cache)
  batch_size, num_batches, seed = 40, 8, 5  # 320 positions: into the second epoch
  loader = pipeline.make_train_loader(cfg, batch_size, seed=seed)
  got = [next(loader) for _ in range(num_batches)]
  positions = np.arange(batch_size * num_batches)
  expected, expected_labels, flipped = [], [], 0
  for epoch, within in zip(*np.divmod(positions, NUM_EXAMPLES)):
    rng = np.random.default_rng([seed, epoch])  # the documented order and flips of an epoch
    order = rng.permutation(NUM_EXAMPLES)
    flip = rng.random(NUM_EXAMPLES) < 0.5
    i = order[within]
    expected.append(records["latent_flip" if flip[within] else "latent"][i])
    expected_labels.append(records["label"][i])
    flipped += flip[within]
  assert 0 < flipped < len(positions)
  expected = (np.stack(expected) - stats["mean"]) / stats["std"]
  np.testing.assert_allclose(np.concatenate([b["image"] for b in got]), expected, rtol=1e-6,
                             atol=1e-6)
  np.testing.assert_array_equal(np.concatenate([b["label"] for b in got]), expected_labels)
  assert got[0]["image"].dtype == np.float32 and got[0]["label"].dtype == np.int32

  z, labels = pipeline.load_split(_latent_cfg(cache), "test")
  np.testing.assert_allclose(z, (records["latent"] - stats["mean"]) / stats["std"], rtol=1e-6,
                             atol=1e-6)
  np.testing.assert_array_equal(labels, records["label"])


def test_decoder_denormalises_and_decodes(cache, records, tokenizer_dir):
  stats = cache_lib.cache_stats(cache)
  decode = cache_encoder.load_decoder(cache, batch_size=2)
  images = decode((records["latent"][:3] - stats["mean"]) / stats["std"])
  loaded = tokenizer.load(tokenizer_dir)
  decoded = np.clip(jax.jit(loaded.model.decode)(records["latent"][:3]), -1, 1)
  assert images.shape == (3, 16, 16, 1)
  np.testing.assert_allclose(images, decoded.mean(-1, keepdims=True), rtol=1e-4, atol=1e-4)
  # The tokenizer's own statistics (mean 0, std 1) and channels: `sample --tokenizer`.
  np.testing.assert_allclose(loaded.decode_normalized(records["latent"][:3], batch_size=2),
                             decoded, rtol=1e-4, atol=1e-4)


def _one_line_error(fn, match):
  with pytest.raises(TesseraxError, match=match) as e:
    fn()
  assert "\n" not in str(e.value)


def test_one_line_errors(cache, tokenizer_dir, digits_data_dir, tmp_path):
  _one_line_error(lambda: pipeline.load_split(_latent_cfg(cache, resolution=16), "test"),
                  r"latents of shape \[8, 8, 4\]; set data.resolution=8")
  _one_line_error(lambda: pipeline.load_split(_latent_cfg(cache, num_classes=5), "test"),
                  "set data.num_classes=10")
  _one_line_error(lambda: pipeline.load_split(_latent_cfg(tmp_path), "test"),
                  "tesserax data encode")
  _one_line_error(lambda: pipeline.build("latents", str(tmp_path)), "tesserax data encode")
  _one_line_error(lambda: _encode(tokenizer_dir, digits_data_dir, cache, seed=SEED + 1),
                  "another seed")
  _one_line_error(lambda: _encode(tokenizer_dir, digits_data_dir, cache, shard_size=100),
                  "another shard_size")
  other = tiny_tokenizer(tmp_path / "other", seed=2)
  _one_line_error(lambda: _encode(other, digits_data_dir, cache), "another tokenizer")
  _one_line_error(lambda: _encode(str(tmp_path / "missing"), digits_data_dir, tmp_path / "c"),
                  "tokenizer directory not found")
  _one_line_error(lambda: _encode(str(tmp_path), digits_data_dir, tmp_path / "c"),
                  "not a tokenizer directory")
  _one_line_error(lambda: cache_encoder.encode(tokenizer_dir,
                                               _image_cfg(digits_data_dir, resolution=8),
                                               str(tmp_path / "c")),
                  "image resolution 8 differs from the tokenizer's 16")


# ------------------------------------------------------------- a cache of integer token ids


PATCH, LEVELS = 4, 8


class PatchLevels(nnx.Module):
  """A tiny discrete tokenizer: the id of each 4x4 patch is the sum of its 8-bit pixel values
  in 8 equal bins (exact integer arithmetic); decoding paints each patch with the middle of its
  bin in [-1, 1] plus `offset`."""

  is_discrete = True
  latent_dtype = np.int32
  codebook_size = LEVELS

  def __init__(self, config, *, rngs):
    del rngs
    self.resolution, self.channels = config.resolution, config.channels
    side = config.resolution // PATCH
    self.latent_shape = (side, side, 1)
    self.offset = nnx.Param(jnp.zeros(()))

  def encode(self, images, keys=None):
    assert keys is None or len(keys) == len(images)  # one key per example
    n, side = len(images), self.latent_shape[0]
    pixels = jnp.round((images + 1) * 127.5).astype(jnp.int32)
    sums = pixels.reshape(n, side, PATCH, side, PATCH, -1).sum((2, 4, 5))
    return (sums * LEVELS // (PATCH * PATCH * self.channels * 256))[..., None]

  def decode(self, ids):
    values = (ids[..., 0] + 0.5) / LEVELS * 2 - 1 + self.offset[...]
    patches = jnp.repeat(jnp.repeat(values, PATCH, axis=1), PATCH, axis=2)
    return jnp.repeat(patches[..., None], self.channels, axis=-1)


registry.TOKENIZERS.register("patch_levels", PatchLevels)


def expected_ids(images):
  """The ids of PatchLevels.encode of uint8 images [n, 16, 16, 1], computed with NumPy."""
  n, side = len(images), images.shape[1] // PATCH
  sums = images.astype(np.int64).reshape(n, side, PATCH, side, PATCH).sum((2, 4))
  return (sums * LEVELS // (PATCH * PATCH * 256))[..., None]


@pytest.fixture(scope="session")
def token_cache(digits_data_dir, tmp_path_factory):
  config = ml_collections.ConfigDict(dict(resolution=16, channels=1))
  tokenizer_dir = tokenizer.save(tmp_path_factory.mktemp("patch_levels"), "patch_levels",
                                 "patch_levels", config, {"offset": np.float32(0.75)})
  return tokenizer_dir, _encode(tokenizer_dir, digits_data_dir,
                                tmp_path_factory.mktemp("token_cache") / "c")


def test_token_id_cache_round_trip(token_cache, digits_data_dir):
  tokenizer_dir, cache = token_cache
  loaded = tokenizer.load(tokenizer_dir)
  assert loaded.stats is None and loaded.family == "patch_levels"
  assert not os.path.exists(os.path.join(tokenizer_dir, tokenizer.STATS_FILE))
  assert not os.path.exists(os.path.join(cache, cache_lib.STATS_FILE))
  num_examples, read = pipeline.image_reader(_image_cfg(digits_data_dir), "test")
  images, labels = read(np.arange(num_examples))
  records = _records(cache)
  for key, x in (("latent", images), ("latent_flip", images[:, :, ::-1])):
    assert records[key].dtype == np.int32, key
    np.testing.assert_array_equal(records[key], expected_ids(x), err_msg=key)
  assert 2 < len(np.unique(records["latent"])) <= LEVELS
  np.testing.assert_array_equal(records["label"], labels)

  # The pipeline serves the ids unnormalised as int32, the stored flipped ones where flipped.
  ids, got_labels = pipeline.load_split(_latent_cfg(cache, resolution=4), "test")
  assert ids.dtype == np.int32
  np.testing.assert_array_equal(ids, records["latent"])
  np.testing.assert_array_equal(got_labels, labels)
  batch_size, seed = 64, 5
  batch = next(pipeline.make_train_loader(_latent_cfg(cache, resolution=4, random_flip=True),
                                          batch_size, seed=seed))
  rng = np.random.default_rng([seed, 0])
  order = rng.permutation(NUM_EXAMPLES)[:batch_size]
  flips = (rng.random(NUM_EXAMPLES) < 0.5)[:batch_size]
  assert 0 < flips.sum() < batch_size
  assert batch["image"].dtype == np.int32
  np.testing.assert_array_equal(
      batch["image"], np.where(flips[:, None, None, None], records["latent_flip"][order],
                               records["latent"][order]))

  # Decoding: the ids as they are (no statistics), then clipped.
  decoded = cache_encoder.load_decoder(cache, batch_size=8)(records["latent"][:10])
  values = (records["latent"][:10, :, :, 0] + 0.5) / LEVELS * 2 - 1 + 0.75
  expected = np.repeat(np.repeat(values, PATCH, 1), PATCH, 2)[..., None]
  assert decoded.shape == (10, 16, 16, 1) and (expected > 1).any()
  np.testing.assert_allclose(decoded, np.clip(expected, -1, 1), rtol=1e-6, atol=1e-6)
  assert cache_lib.read_info(cache)["tokenizer"]["kind"] == "patch_levels"


def test_a_tokenizer_directory_of_the_old_format_loads(tokenizer_dir, tmp_path):
  """convert/vae.py wrote config.json without "tokenizer": such a directory is a KL
  autoencoder and loads (and encodes) as before."""
  old = tmp_path / "old"
  old.mkdir()
  for name in (tokenizer.PARAMS_FILE, tokenizer.STATS_FILE):
    (old / name).write_bytes(open(os.path.join(tokenizer_dir, name), "rb").read())
  config = tokenizer.read_config(tokenizer_dir)
  (old / tokenizer.CONFIG_FILE).write_text(
      '{"kind": "vavae-f16d32", "model": %s}' % json.dumps(config["model"].to_dict()))
  new, legacy = tokenizer.load(tokenizer_dir), tokenizer.load(old)
  assert (legacy.kind, legacy.family) == ("vavae-f16d32", "kl_autoencoder")
  assert isinstance(legacy.model, kl_autoencoder.KLAutoencoder)
  assert legacy.digest == new.digest == hashlib.sha256(
      (old / tokenizer.PARAMS_FILE).read_bytes()).hexdigest()
  assert legacy.config.to_dict() == new.config.to_dict()
  for k in ("mean", "std"):
    np.testing.assert_array_equal(legacy.stats[k], new.stats[k])
  params, want = tokenizer.flat_params(legacy.model), tokenizer.flat_params(new.model)
  assert params.keys() == want.keys()
  assert all(np.array_equal(params[k], want[k]) for k in want)
  z = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
  np.testing.assert_array_equal(legacy.decode_normalized(z), new.decode_normalized(z))
