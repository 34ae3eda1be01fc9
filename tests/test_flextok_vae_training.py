"""FlexTok training over the latents of a frozen KL autoencoder (tasks/flextok_task.py with
`model.vae`, configs/digits_flextok.py:latent_tiny) at the tiny size.

Oracles: the exported VAE equals the directory's parameters bit for bit; no leaf of the train
state lies under a "vae" path; the step's flow loss equals flextok.training_loss at latents
recomputed here as posterior mean + std * normal(key_i) * scaling_factor with the documented
keys (and differs from the loss at the posterior mean); a run interrupted and resumed equals
the uninterrupted run bit for bit; bad directories are refused in one line naming the cause.
"""
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from tesserax.core import config as config_lib, sharding, train_state
from tesserax.core.errors import TesseraxError
from tesserax.data import pipeline
from tesserax.tokenizers import flextok, kl_autoencoder, tokenizer
from tesserax.training import loop, task as task_lib

pytestmark = [pytest.mark.xdist_group("flextok_vae"),  # one build of the session fixtures
              pytest.mark.long]

SCALE = 0.5  # model.vae_scaling_factor of the runs: the oracle checks it is applied


def write_vae(directory, vae_config, seed):
  """A tokenizer directory holding a random-init KL autoencoder."""
  model = kl_autoencoder.build(vae_config, seed)
  channels = vae_config.embed_dim
  return tokenizer.save(directory, "kl_autoencoder", "kl_autoencoder", vae_config,
                        tokenizer.flat_params(model),
                        {"mean": np.zeros(channels), "std": np.ones(channels)})


def latent_tiny(digits_data_dir, vae_dir):
  config = config_lib.load("digits_flextok:latent_tiny")
  config.data.data_dir = digits_data_dir
  config.loss.vae_dir = vae_dir
  config.model.vae_scaling_factor = SCALE
  return config


@pytest.fixture(scope="session")
def vae_dir(tmp_path_factory):
  vae_config = config_lib.load("digits_flextok:latent_tiny").model.vae
  return write_vae(tmp_path_factory.mktemp("kl_vae"), vae_config, seed=5)


@pytest.fixture(scope="session")
def latent_run(digits_data_dir, vae_dir, tmp_path_factory):
  """(task, state, workdir) of the 4-step latent_tiny run."""
  workdir = str(tmp_path_factory.mktemp("flextok_latent"))
  task, state = loop.train(latent_tiny(digits_data_dir, vae_dir), workdir, log=lambda *a: None)
  return task, state, workdir


def test_the_export_holds_the_directorys_vae_bit_for_bit(latent_run, vae_dir):
  _, _, workdir = latent_run
  with np.load(os.path.join(vae_dir, tokenizer.PARAMS_FILE)) as f:
    source = dict(f)
  with np.load(os.path.join(workdir, "tokenizer", tokenizer.PARAMS_FILE)) as f:
    exported = {k[len("vae."):]: v for k, v in f.items() if k.startswith("vae.")}
  assert sorted(exported) == sorted(source)
  for key, value in source.items():
    assert exported[key].dtype == value.dtype
    np.testing.assert_array_equal(exported[key], value)


def test_the_train_state_holds_no_vae(latent_run):
  task, state, workdir = latent_run
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
  assert paths and not [p for p in paths if "vae" in p]
  # Every other tokenizer parameter trains: params = the export less the VAE.
  exported = tokenizer.load(os.path.join(workdir, "tokenizer"))
  flat = tokenizer.flat_params(exported.model)
  trained = traverse_util.flatten_dict(jax.device_get(state["params"]["tokenizer"]))
  assert ({".".join(map(str, k)): v.shape for k, v in trained.items()}
          == {k: v.shape for k, v in flat.items() if not k.startswith("vae.")})


class GivenLatents:
  """A FlexTok whose image_latents are given (what training_loss encodes)."""

  def __init__(self, model, latents):
    self.model, self.latents = model, latents

  def image_latents(self, images, keys=None):
    return self.latents

  def __getattr__(self, name):
    return getattr(self.model, name)


def test_training_encodes_a_posterior_sample(latent_run, vae_dir):
  task, state, _ = latent_run
  config = task.config
  batch = next(pipeline.make_train_loader(config.data, config.batch_size, config.seed))
  x = np.asarray(jax.device_get(batch["image"]))
  params = jax.device_get(state["params"])
  k_vae, k_loss = jax.random.split(train_state.step_key(state))
  _, metrics = task.train_step(jax.tree.map(jnp.copy, state),
                               sharding.global_batch(batch, task.mesh))

  vae = tokenizer.load(vae_dir).model
  mean, logvar = (np.asarray(a, np.float64) for a in vae.posterior(x))
  noise = np.stack([np.asarray(jax.random.normal(k, mean.shape[1:]))
                    for k in jax.random.split(k_vae, len(x))])
  sample = (mean + np.exp(0.5 * logvar) * noise) * SCALE
  assert np.abs(sample - mean * SCALE).mean() > 0.1  # the noise is not negligible

  model = task.model(params)

  @jax.jit
  @jax.vmap
  def flow_loss(latents):  # training_loss at the given latents
    return flextok.training_loss(
        GivenLatents(model, latents), k_loss, x, keep_k_mode=config.loss.keep_k,
        null_prob=config.loss.null_prob, skip_rounding_prob=config.loss.skip_rounding_prob,
    )[1]["flow_loss"]

  at_sample, at_mean = np.asarray(flow_loss(jnp.float32(np.stack([sample, mean * SCALE]))))
  got = float(metrics["flow_loss"])
  np.testing.assert_allclose(got, at_sample, rtol=1e-4)
  assert abs(got - at_mean) > 0.01 * got


def test_resumed_run_equals_the_uninterrupted_one(latent_run, digits_data_dir, vae_dir,
                                                  tmp_path):
  """The run's workdir as it was at its step-2 checkpoint, resumed (the VAE read again)."""
  _, full, workdir = latent_run
  split = str(tmp_path / "split")
  shutil.copytree(workdir, split)
  for name in ("checkpoints/4", "tokenizer"):
    shutil.rmtree(os.path.join(split, name))
  _, resumed = loop.train(latent_tiny(digits_data_dir, vae_dir), split, log=lambda *a: None)
  assert int(resumed["step"]) == 4
  for part in ("params", "ema", "opt"):
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed[part]),
                 jax.device_get(full[part]))


def test_exported_tokenizer_encodes_and_decodes_pixels(latent_run, digits_data_dir):
  task, state, workdir = latent_run
  loaded = tokenizer.load(os.path.join(workdir, "tokenizer"))
  assert loaded.family == "flextok" and loaded.config.vae_scaling_factor == SCALE
  images = np.asarray(pipeline.load_split(task.config.data, "test")[0][:6])
  ids = np.asarray(jax.jit(loaded.model.encode)(images))
  assert ids.shape == (6, 4) and ids.dtype == np.int32
  np.testing.assert_array_equal(ids, task.encode(state["ema"], images))  # posterior means
  decoded = np.asarray(jax.jit(loaded.model.decode)(ids))
  assert decoded.shape == (6, 16, 16, 1) and np.all(np.isfinite(decoded))


@pytest.fixture(scope="session")
def other_vae_dir(tmp_path_factory):
  vae_config = config_lib.load("digits_flextok:latent_tiny").model.vae
  vae_config.z_channels = 8
  return write_vae(tmp_path_factory.mktemp("kl_vae_z8"), vae_config, seed=6)


@pytest.mark.parametrize("case, message", [
    ("z_channels", "with z_channels=8, but model.vae.z_channels=4"),
    ("empty", "model.vae is set but loss.vae_dir is empty"),
    ("missing", "loss.vae_dir: tokenizer directory not found"),
    ("flextok", "holds a flextok tokenizer, not a KL autoencoder"),
    ("pixels", "is set but model.vae is None"),
])
def test_bad_vae_directories_are_refused_in_one_line(latent_run, other_vae_dir, digits_data_dir,
                                                     tmp_path, case, message):
  _, _, workdir = latent_run
  vae_dir = {"z_channels": other_vae_dir, "empty": "", "missing": str(tmp_path / "none"),
             "flextok": os.path.join(workdir, "tokenizer"), "pixels": other_vae_dir}[case]
  config = latent_tiny(digits_data_dir, vae_dir)
  if case == "pixels":
    config = config_lib.load("digits_flextok:tiny")
    config.loss.vae_dir = vae_dir
  with pytest.raises(TesseraxError) as e:
    task_lib.build(config, sharding.make_mesh(config.mesh))
  assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
