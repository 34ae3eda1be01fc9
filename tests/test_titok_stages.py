"""TiTok's two-stage recipe (tasks/titok_task.py) and the ConvNeXt-S logit loss
(backbones/convnext.py): float64 NumPy forwards written from torchvision/models/convnext.py and
bytedance/1d-tokenizer modeling/modules/{perceptual_loss,losses}.py, the stage-1 loss by hand,
stage 2's frozen parameters, the discriminator's step."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.special import erf

from tesserax.backbones import convnext, weights
from tesserax.convert import torch_reader
from tesserax.core import config as config_lib, sharding
from tesserax.core.errors import TesseraxError
from tesserax.tasks import titok_task
from tesserax.tokenizers import titok_losses

TINY = dict(depths=(1, 1, 2, 1), dims=(8, 16, 24, 32), num_classes=10)

# ------------------------------------------------------------------------------- ConvNeXt


def torchvision_shapes(depths, dims, num_classes):
  """torchvision ConvNeXt state-dict keys and shapes."""
  shapes = {"features.0.0.weight": (dims[0], 3, 4, 4), "features.0.0.bias": (dims[0],),
            "features.0.1.weight": (dims[0],), "features.0.1.bias": (dims[0],),
            "classifier.0.weight": (dims[-1],), "classifier.0.bias": (dims[-1],),
            "classifier.2.weight": (num_classes, dims[-1]), "classifier.2.bias": (num_classes,)}
  for s, (depth, d) in enumerate(zip(depths, dims)):
    for j in range(depth):
      p = f"features.{2 * s + 1}.{j}"
      shapes.update({f"{p}.layer_scale": (d, 1, 1), f"{p}.block.0.weight": (d, 1, 7, 7),
                     f"{p}.block.0.bias": (d,), f"{p}.block.2.weight": (d,),
                     f"{p}.block.2.bias": (d,), f"{p}.block.3.weight": (4 * d, d),
                     f"{p}.block.3.bias": (4 * d,), f"{p}.block.5.weight": (d, 4 * d),
                     f"{p}.block.5.bias": (d,)})
    if s:
      p = f"features.{2 * s}"
      shapes.update({f"{p}.0.weight": (dims[s - 1],), f"{p}.0.bias": (dims[s - 1],),
                     f"{p}.1.weight": (d, dims[s - 1], 2, 2), f"{p}.1.bias": (d,)})
  return shapes


def np_convnext(sd, x):
  """ConvNeXt.forward, NCHW float64."""
  def ln_channels(x, p):  # LayerNorm2d / LayerNorm over C, eps 1e-6
    mu, var = x.mean(1, keepdims=True), x.var(1, keepdims=True)
    return ((x - mu) / np.sqrt(var + 1e-6) * sd[f"{p}.weight"][None, :, None, None]
            + sd[f"{p}.bias"][None, :, None, None])

  def patchify_conv(x, p, k):  # kernel k, stride k, no padding
    n, c, h, w = x.shape
    patches = x.reshape(n, c, h // k, k, w // k, k)
    return (np.einsum("ncikjl,ockl->noij", patches, sd[f"{p}.weight"])
            + sd[f"{p}.bias"][None, :, None, None])

  x = ln_channels(patchify_conv(x, "features.0.0", 4), "features.0.1")
  s = 0
  while f"features.{2 * s + 1}.0.layer_scale" in sd:
    if s:
      x = patchify_conv(ln_channels(x, f"features.{2 * s}.0"), f"features.{2 * s}.1", 2)
    j = 0
    while f"features.{2 * s + 1}.{j}.layer_scale" in sd:
      p = f"features.{2 * s + 1}.{j}"
      n, c, h, w = x.shape
      pad = np.pad(x, ((0, 0), (0, 0), (3, 3), (3, 3)))
      wdw = sd[f"{p}.block.0.weight"][:, 0]
      y = sum(wdw[None, :, a, b, None, None] * pad[:, :, a:a + h, b:b + w]
              for a in range(7) for b in range(7)) + sd[f"{p}.block.0.bias"][None, :, None, None]
      y = ln_channels(y, f"{p}.block.2").transpose(0, 2, 3, 1)
      y = y @ sd[f"{p}.block.3.weight"].T + sd[f"{p}.block.3.bias"]
      y = 0.5 * y * (1 + erf(y / math.sqrt(2)))
      y = (y @ sd[f"{p}.block.5.weight"].T + sd[f"{p}.block.5.bias"]).transpose(0, 3, 1, 2)
      x = x + sd[f"{p}.layer_scale"][None] * y
      j += 1
    s += 1
  x = ln_channels(x.mean((2, 3), keepdims=True), "classifier.0")[:, :, 0, 0]
  return x @ sd["classifier.2.weight"].T + sd["classifier.2.bias"]


def antialias_matrix(n_in, n_out):
  """torch F.interpolate(bilinear, align_corners=False, antialias=True) along one axis: output
  i averages inputs j with the triangle weight max(0, 1 - |j + 0.5 - c_i| / support), c_i =
  (i + 0.5) n_in / n_out, support max(n_in / n_out, 1), the weights normalised."""
  support = max(n_in / n_out, 1.0)
  centres = (np.arange(n_out) + 0.5) * n_in / n_out
  m = np.maximum(0.0, 1 - np.abs(np.arange(n_in)[None] + 0.5 - centres[:, None]) / support)
  return m / m.sum(1, keepdims=True)


@pytest.fixture(scope="session")
def tiny_convnext(tmp_path_factory):
  rng = np.random.default_rng(0)
  sd = {k: (0.3 * rng.standard_normal(s)).astype(np.float32)
        for k, s in torchvision_shapes(**TINY).items()}
  src = str(tmp_path_factory.mktemp("convnext") / "convnext.safetensors")
  torch_reader.write(src, sd)
  net = weights.with_params(lambda: convnext.ConvNeXt(rngs=nnx.Rngs(0), **TINY),
                            weights.convnext_params(src, **TINY))
  return net, {k: v.astype(np.float64) for k, v in sd.items()}, src


def test_convnext_matches_float64_numpy_and_the_logit_loss(tiny_convnext):
  net, sd, _ = tiny_convnext
  rng = np.random.default_rng(1)
  x, r = rng.uniform(0, 1, (2, 40, 40, 3)), rng.uniform(0, 1, (2, 40, 40, 3))
  x32 = rng.uniform(-2, 2, (2, 32, 32, 3))
  got_logits, got_loss = nnx.jit(lambda m, x32, x, r: (
      m(x32), convnext.logit_loss(m, x, r, resolution=32)))(
          net, *(jnp.asarray(a, jnp.float32) for a in (x32, x, r)))
  want = np_convnext(sd, x32.transpose(0, 3, 1, 2))
  assert np.abs(np.asarray(got_logits) - want).max() / np.abs(want).max() < 1e-5
  m = antialias_matrix(40, 32)
  mean = np.array(convnext.IMAGENET_MEAN)[None, :, None, None]
  std = np.array(convnext.IMAGENET_STD)[None, :, None, None]
  logits = lambda im: np_convnext(sd, (np.einsum("ih,nchw,jw->ncij", m, im.transpose(0, 3, 1, 2),
                                                 m) - mean) / std)
  want_loss = np.mean((logits(x) - logits(r)) ** 2, axis=-1)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-4)


def test_convnext_s_key_table_and_refusals(tiny_convnext, tmp_path):
  """ConvNeXt-S: the 344 keys of torchvision's state dict and its 50,223,688 parameters
  (ConvNeXt_Small_Weights num_params); a file missing a key is refused naming it."""
  expected = weights._expected(weights.FACTORIES["convnext_small"])  # noqa: SLF001
  rules = convnext.torchvision_rules(expected)
  assert {k: (v[1] if v[2] is None else tuple(v[1][v[2].index(i)] for i in range(len(v[2]))))
          for k, v in rules.items()} == torchvision_shapes(**convnext.CONVNEXT_S)
  assert sum(math.prod(s) for s in expected.values()) == 50_223_688
  sd = torch_reader.read(tiny_convnext[2])
  del sd["features.3.0.layer_scale"]
  src = str(tmp_path / "broken.safetensors")
  torch_reader.write(src, sd)
  with pytest.raises(TesseraxError, match="missing key 'features.3.0.layer_scale'"):
    weights.convnext_params(src, **TINY)


# ------------------------------------------------------------------------ discriminator loss


def test_hinge_and_lecam_gradients_against_numpy():
  """d loss / d logits of factor * hinge + w * LeCam: real logits are pushed up (where < 1),
  fake ones down (where > -1); LeCam pulls mean D(x) towards the fake EMA and mean D(x_rec)
  towards the real EMA."""
  rng = np.random.default_rng(2)
  real, fake = 1.5 * rng.standard_normal((2, 3, 3, 1)), 1.5 * rng.standard_normal((2, 3, 3, 1))
  ema_real, ema_fake, w, n = 0.4, -0.9, 0.3, real.size
  grad = jax.grad(lambda a, b: titok_losses.stage2_discriminator_loss(
      a, b, ema_real, ema_fake, 5, discriminator_start=5, lecam_weight=w)[0], (0, 1))
  g_real, g_fake = grad(jnp.asarray(real), jnp.asarray(fake))
  want_real = -0.5 / n * (real < 1) + w * 2 * max(real.mean() - ema_fake, 0) / n
  want_fake = 0.5 / n * (fake > -1) - w * 2 * max(ema_real - fake.mean(), 0) / n
  np.testing.assert_allclose(g_real, want_real, rtol=1e-5, atol=1e-8)
  np.testing.assert_allclose(g_fake, want_fake, rtol=1e-5, atol=1e-8)


# ---------------------------------------------------------------------------- the recipes


def make_task(arg, **loss):
  config = config_lib.load(f"digits_titok:{arg}")
  config.loss.update(loss)
  config.optim.warmup_steps = 0
  config.disc_optim.update(warmup_steps=0, lr=1e-3)
  return titok_task.TiTokTask(config, sharding.make_mesh(config.mesh)), config


def batch(config, seed):
  x = np.random.default_rng(seed).uniform(-1, 1, (config.batch_size, 16, 16, 1))
  return {"image": x.astype(np.float32), "label": np.zeros(config.batch_size, np.int32)}


def test_stage1_loss_is_cross_entropy_to_the_proxy_codes_plus_the_vq_loss():
  task, config = make_task("stage1_tiny")
  state = task.init()
  b = batch(config, 3)
  proxy = task._frozen_module(task.frozen, "proxy")  # noqa: SLF001
  logits, z, codebook, codes = nnx.jit(lambda m, p, x: (
      m(x)[0], m.encode_features(x), m.codebook[...], p.encode(x)))(
          task.model(state["params"]), proxy, jnp.asarray(b["image"]))
  lg = np.asarray(logits, np.float64)
  logp = lg - lg.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  ce = -np.mean(np.take_along_axis(logp, np.asarray(codes)[..., None], -1))
  unit = lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True)
  zn, cb = unit(np.asarray(z, np.float64)), unit(np.asarray(codebook, np.float64))
  zq = cb[np.argmin(((zn[..., None, :] - cb) ** 2).sum(-1), -1)]
  vq = 1.25 * np.mean((zq - zn) ** 2)  # codebook + 0.25 commitment, equal in value
  _, metrics = task.train_step(state, b)
  np.testing.assert_allclose(metrics["proxy_ce"], ce, rtol=1e-5)
  np.testing.assert_allclose(metrics["loss"], ce + vq, rtol=1e-5)


def test_stage2_freezes_encoder_and_quantizer_and_starts_the_discriminator_on_time():
  """A non-legacy VQ TiTok (the legacy one adds the MaskGIT-VQGAN pixel decoder to what trains,
  and compile time)."""
  task, config = make_task("tiny", recipe="stage2", perceptual="", discriminator_weight=0.01,
                           discriminator_start=1)
  state = task.init()
  host = lambda tree: jax.tree.map(np.array, tree)
  before = host(state)
  assert set(titok_task.STAGE2_FROZEN) < set(before["params"])
  b0, b1 = batch(config, 4), batch(config, 5)
  state, m0 = task.train_step(state, b0)
  after0 = host(state)
  disc_logits = nnx.jit(lambda d, x: d((x + 1) / 2))
  d = lambda params: nnx.merge(task.disc_graphdef, params)
  model = task.model(after0["params"])
  rec = nnx.jit(lambda m, x: m.decode_latents(m.quantize(m.encode_features(x))[0]))(
      model, jnp.asarray(b1["image"]))
  state, m1 = task.train_step(state, b1)
  after1 = host(state)
  assert float(m0["disc_factor"]) == 0.0 and float(m1["disc_factor"]) == 1.0
  for k in titok_task.STAGE2_FROZEN:
    for tree in ("params", "ema"):
      jax.tree.map(np.testing.assert_array_equal, after1[tree][k], before[tree][k])
  changed = lambda a, b: any(not np.array_equal(x, y)
                             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  assert changed(after0["params"]["decoder"], before["params"]["decoder"])
  # Before discriminator_start nothing of the discriminator moves; from it on, one step.
  jax.tree.map(np.testing.assert_array_equal, after0["disc"], before["disc"])
  np.testing.assert_array_equal(after0["lecam"], before["lecam"])
  real0 = np.asarray(disc_logits(d(after0["disc"]), jnp.asarray(b1["image"])), np.float64)
  fake0 = np.asarray(disc_logits(d(after0["disc"]), rec), np.float64)
  np.testing.assert_allclose(after1["lecam"], [0.001 * real0.mean(), 0.001 * fake0.mean()],
                             rtol=1e-4)
  hinge = lambda r, f: 0.5 * (np.maximum(1 - r, 0).mean() + np.maximum(1 + f, 0).mean())
  lecam = max(real0.mean(), 0) ** 2 + max(-fake0.mean(), 0) ** 2  # against EMAs still 0
  np.testing.assert_allclose(m1["disc_loss"], hinge(real0, fake0) + 0.001 * lecam, rtol=1e-4)
  real1 = np.asarray(disc_logits(d(after1["disc"]), jnp.asarray(b1["image"])))
  fake1 = np.asarray(disc_logits(d(after1["disc"]), rec))
  assert hinge(real1, fake1) < hinge(real0, fake0)  # the update descends the hinge loss


def test_clustering_vq_moves_the_codebook_before_the_optimizer_and_l2_is_on_0_1_images():
  """TA-TiTok's clustering_vq (CVQ-VAE's online re-initialisation) in the single-stage step,
  against NumPy: with the learning rate at 0 the step's codebook is exactly the CVQ update."""
  task, config = make_task("tiny", perceptual="")
  config.model.clustering_vq = True
  config.optim.update(lr=0.0, weight_decay=0.0)
  task = titok_task.TiTokTask(config, sharding.make_mesh(config.mesh))
  state = task.init()
  b = batch(config, 6)
  z, codebook, rec = nnx.jit(lambda m, x: (m.encode_features(x), m.codebook[...], m(x)[0]))(
      task.model(state["params"]), jnp.asarray(b["image"]))
  z = np.asarray(z, np.float64).reshape(-1, codebook.shape[1])
  cb = np.asarray(codebook, np.float64)
  unit = lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True)
  d = ((unit(z)[:, None] - unit(cb)[None]) ** 2).sum(-1)
  k = len(cb)
  usage = np.bincount(d.argmin(1), minlength=k) / len(z)
  embed_prob = 0.01 * usage
  decay = np.exp(-embed_prob * k * 10 / 0.01 - 1e-3)[:, None]
  want = cb * (1 - decay) + z[d.argmin(0)] * decay
  new, metrics = task.train_step(state, b)
  np.testing.assert_allclose(new["embed_prob"], embed_prob, rtol=1e-6, atol=1e-9)
  np.testing.assert_allclose(new["params"]["codebook"], want, rtol=1e-5, atol=1e-7)
  x = b["image"].astype(np.float64)
  np.testing.assert_allclose(metrics["reconstruction"],
                             np.mean(((x - np.asarray(rec, np.float64)) / 2) ** 2), rtol=1e-5)
