"""The autoencoder tokenizer task (tasks/autoencoder.py) on the training loop, with the tiny digits
VA-VAE recipe (configs/digits_kl.py:tiny): the one-pass vjp composition of the loss against
separate jax.grad computations of each term, the discriminator start, the export."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tesserax.data.digits import digits_arrays
from tesserax.data.preprocess import resize_uint8, to_model_range
from tesserax.tokenizers import kl_autoencoder, losses, reconstruct, tokenizer
from tesserax.core import checkpoint, config as config_lib, sharding
from tesserax.eval import evaluators
from tesserax.training import loop

# One worker builds the module fixtures (compiled once) under `--dist loadgroup`.
pytestmark = [pytest.mark.xdist_group("tokenizer_training"), pytest.mark.long]


@pytest.fixture(scope="session")
def trained(digits_data_dir, tmp_path_factory):
  """(setup, final state, workdir) of a 4-step tiny run; its compiled step serves every test."""
  config = config_lib.load("digits_kl:tiny")
  config.data.data_dir = digits_data_dir
  workdir = str(tmp_path_factory.mktemp("kl_tiny"))
  setup, state = loop.train(config, workdir, log=lambda *_: None)
  return setup, jax.device_get(state), workdir


def _batch(n=8):
  images, labels = digits_arrays("test")
  return {"image": to_model_range(resize_uint8(images[:n], 16)), "label": labels[:n]}


def _step(setup, state, batch):
  """One train step on a copy of `state` (the step donates its input)."""
  state = jax.device_put(jax.tree.map(np.copy, state), setup.state_shardings)
  new, metrics = setup.train_step(state, sharding.global_batch(batch, setup.mesh))
  return jax.device_get(new), jax.device_get(metrics)


def test_loss_and_adaptive_weights_match_separate_gradients(trained):
  """At a step past disc_start: d_weight = 0.5 ||dnll/dW_dec|| / (||dg/dW_dec|| + 1e-4), the VF
  weight 0.1 ||dnll/dW_enc|| / (||dvf/dW_enc|| + 1e-4), the loss their weighted sum and the
  gradient norm that of the weighted sum's gradient, each term differentiated on its own."""
  setup, state, _ = trained
  state = jax.tree.map(jnp.asarray, state)  # BatchNorm writes its statistics in place
  c = setup.config
  batch = _batch()
  x = jnp.asarray(batch["image"])
  step = int(state["step"])
  assert step >= c.loss.disc_start
  key = jax.random.fold_in(state["rng"], step)
  net = setup.frozen_graphdefs["foundation"]
  target = nnx.merge(net, setup.frozen["foundation"]).feature_map(x)

  def term(name, params):
    model = nnx.merge(setup.graphdef, params)
    mean, logvar = model.autoencoder.posterior(x)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
    rec = model.autoencoder.decode(z)
    if name == "nll":
      return jnp.sum(jnp.abs(x - rec)) / x.shape[0]
    if name == "kl":
      return losses.kl_loss(mean, logvar)
    if name == "g_loss":
      disc = nnx.merge(setup.disc_graphdef, state["disc"], state["disc_stats"])
      return -jnp.mean(disc(rec, train=True))
    return losses.vf_loss(model.linear_proj(z), target, 0.5, 0.25)

  params = state["params"]
  names = ("nll", "kl", "g_loss", "vf_loss")
  values_and_grads = jax.jit(lambda p: {k: jax.value_and_grad(lambda q: term(k, q))(p)
                                        for k in names})(params)
  values = {k: float(v) for k, (v, _) in values_and_grads.items()}
  grads = {k: g for k, (_, g) in values_and_grads.items()}
  kernel = lambda g, part: np.asarray(g["autoencoder"][part]["conv_out"]["kernel"], np.float64)
  ratio = lambda a, b: np.linalg.norm(a) / (np.linalg.norm(b) + 1e-4)
  d_weight = 0.5 * min(ratio(kernel(grads["nll"], "decoder"),
                             kernel(grads["g_loss"], "decoder")), 1e4)
  vf_weight = 0.1 * ratio(kernel(grads["nll"], "encoder"), kernel(grads["vf_loss"], "encoder"))
  weights = {"nll": 1.0, "kl": 1e-6, "g_loss": d_weight, "vf_loss": vf_weight}
  total = jax.tree.map(lambda *g: sum(w * x for w, x in zip(weights.values(), g)),
                       *[grads[k] for k in weights])
  _, metrics = _step(setup, state, batch)
  for k, v in values.items():
    np.testing.assert_allclose(metrics[k], v, rtol=2e-4, err_msg=k)
  np.testing.assert_allclose(metrics["d_weight"], d_weight, rtol=2e-4)
  np.testing.assert_allclose(metrics["vf_weight"], vf_weight, rtol=2e-4)
  np.testing.assert_allclose(metrics["loss"], sum(weights[k] * values[k] for k in values),
                             rtol=2e-4)
  np.testing.assert_allclose(metrics["grad_norm"], float(optax_norm(total)), rtol=2e-4)
  assert metrics["disc_factor"] == 1.0
  # The discriminator's hinge loss on the real images and the (same-batch) reconstructions.
  rec = nnx.merge(setup.graphdef, params).autoencoder.decode(
      kl_autoencoder.sample(*nnx.merge(setup.graphdef, params).autoencoder.posterior(x), key))
  d = nnx.merge(setup.disc_graphdef, state["disc"], state["disc_stats"])
  np.testing.assert_allclose(metrics["disc_loss"],
                             losses.hinge_d_loss(d(x, train=True), d(rec, train=True)), rtol=2e-4)


def optax_norm(tree):
  return np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in jax.tree.leaves(tree)))


def test_discriminator_waits_for_disc_start(trained):
  """Before disc_start the GAN terms are weighted 0: the discriminator's parameters stay
  exactly as they are (its BatchNorm statistics still move, as in torch's train mode); from
  disc_start on they are trained."""
  setup, _, _ = trained
  state = jax.device_get(setup.init())
  assert setup.config.loss.disc_start == 2
  batch = _batch()
  after, metrics = _step(setup, state, batch)
  assert metrics["disc_factor"] == 0.0
  jax.tree.map(np.testing.assert_array_equal, after["disc"], state["disc"])
  moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), after["disc_stats"],
                       state["disc_stats"])
  assert all(jax.tree.leaves(moved))
  assert not np.array_equal(after["params"]["autoencoder"]["decoder"]["conv_out"]["kernel"],
                            state["params"]["autoencoder"]["decoder"]["conv_out"]["kernel"])
  state = dict(after, step=np.int32(2))
  after, metrics = _step(setup, state, batch)
  assert metrics["disc_factor"] == 1.0
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), after["disc"], state["disc"])
  assert all(jax.tree.leaves(changed))


def test_checkpoint_holds_the_whole_tokenizer_state_and_export_reconstructs(trained):
  setup, state, workdir = trained
  manager = checkpoint.make_manager(os.path.join(workdir, "checkpoints"), setup.config.checkpoint,
                                    read_only=True)
  restored, data_state = checkpoint.restore(manager, 4, setup.abstract_state)
  manager.close()
  assert set(restored) == {"step", "params", "ema", "opt", "disc", "disc_stats", "disc_opt",
                           "lecam", "rng", "nonfinite_step"}
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), state)
  assert data_state["next_index"] == 4
  # The exported tokenizer directory holds the EMA autoencoder.
  exported = tokenizer.load(os.path.join(workdir, "tokenizer"))
  model, stats = exported.model, exported.stats
  images = _batch()["image"]
  want = setup.reconstruct(state["ema"], images)
  got = np.clip(model.decode(model.encode(jnp.asarray(images))), -1, 1)
  np.testing.assert_allclose(got, want, atol=1e-5)
  assert stats["mean"].shape == stats["std"].shape == (4,) and np.all(stats["std"] > 0)
  # `tesserax reconstruct` feeds it the first channel of 3-channel (tiled) evaluation images
  # and tiles its reconstructions back.
  tiled = reconstruct.reconstruct(model, np.repeat(images, 3, axis=-1))
  np.testing.assert_allclose(tiled, np.repeat(want, 3, axis=-1), atol=1e-5)


def test_latent_demo_stages_on_the_trained_tokenizer(trained, tmp_path):
  """`tesserax demo --latent` on the tiny tokenizer run (resumed, not retrained): its
  reconstruction PSNR is that of the exported tokenizer's reconstructions, and the latent DiT
  trained on the encoded cache is scored on decoded 16x16 digits (the sample grid's size)."""
  from PIL import Image
  from tesserax.data.preprocess import to_uint8
  from tesserax.eval import metrics
  from tesserax.demos import demo
  setup, state, workdir = trained
  os.symlink(workdir, tmp_path / "tokenizer_run")
  generator = config_lib.load("digits_latent_dit:tiny")
  generator.demo.nfe = (1,)  # one sampler to compile
  results = demo.run_latent(setup.config, generator, str(tmp_path))
  recon = setup.config.evals.recon
  images = evaluators.eval_images(setup.config.data, recon.split, recon.num_samples)
  model = tokenizer.load(os.path.join(workdir, "tokenizer")).model
  rec = model.decode(model.encode(jnp.asarray(images)))
  want = metrics.psnr(to_uint8(images), to_uint8(np.clip(np.asarray(rec), -1, 1))).mean()
  assert results["tokenizer"]["psnr"] == pytest.approx(want, rel=1e-5)
  assert generator.data.data_dir == str(tmp_path / "cache")
  assert set(results["generator"]["euler"]) == {"1"} and not results["generator"]["heun"]
  assert 0.0 <= results["generator"]["euler"]["1"]["accuracy"] <= 1.0
  per_class = min(10, generator.evals.digits.num_samples // 10)
  with Image.open(tmp_path / "generator" / "samples_grid.png") as grid:
    assert grid.size[1] > 10 * 16 * 4 - 1 and grid.size[0] > per_class * 16 * 4 - 1
