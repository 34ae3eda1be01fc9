"""Tokenizer losses against direct NumPy implementations of their definitions (LightningDiT
vavae/ldm/modules/losses/contperceptual.py, taming-transformers) and hand computations."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tesserax.backbones.dinov2 import DinoV2
from tesserax.tokenizers import losses


def numpy_vf_loss(z, f, m1, m2, w_cos=1.0, w_dist=1.0):
  """The VF loss of LightningDiT contperceptual.py, position by position, z and f [N, H, W, C]."""
  n = z.shape[0]
  z, f = z.reshape(n, -1, z.shape[-1]), f.reshape(n, -1, f.shape[-1])
  positions = z.shape[1]
  cos = lambda a, b: a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
  mdms, mcos = [], []
  for b in range(n):
    for i in range(positions):
      mcos.append(max(0.0, 1 - m1 - cos(z[b, i], f[b, i])))
      for j in range(positions):
        mdms.append(max(0.0, abs(cos(z[b, i], z[b, j]) - cos(f[b, i], f[b, j])) - m2))
  return w_dist * np.mean(mdms) + w_cos * np.mean(mcos), np.mean(mdms), np.mean(mcos)


@pytest.mark.parametrize("m1,m2", [(0.5, 0.25), (0.0, 0.0), (0.2, 0.6)])
def test_vf_loss_matches_its_definition(m1, m2):
  rng = np.random.default_rng(0)
  z = rng.standard_normal((2, 3, 4, 6))
  f = z + 0.8 * rng.standard_normal((2, 3, 4, 6))  # partly aligned: margins cut some terms
  want, mdms, mcos = numpy_vf_loss(z, f, m1, m2, 0.7, 1.3)
  assert mdms > 0 and mcos > 0
  with jax.enable_x64(True):
    got = losses.vf_loss(jnp.asarray(z), jnp.asarray(f), m1, m2, cos_weight=0.7,
                         distmat_weight=1.3)
    np.testing.assert_allclose(got, want, rtol=1e-10)
  # The margins are active: some pairs fall inside them, so a larger margin lowers the loss.
  assert numpy_vf_loss(z, f, m1 + 0.1, m2 + 0.1)[0] < numpy_vf_loss(z, f, m1, m2)[0]
  np.testing.assert_allclose(losses.vf_loss(jnp.asarray(z, jnp.float32),
                                            jnp.asarray(f, jnp.float32), m1, m2, 0.7, 1.3),
                             want, rtol=1e-5)


def finite_difference_norm(fn, w, h=1e-6):
  grad = np.zeros_like(w)
  for idx in np.ndindex(w.shape):
    e = np.zeros_like(w)
    e[idx] = h
    grad[idx] = (fn(w + e) - fn(w - e)) / (2 * h)
  return np.linalg.norm(grad)


def test_vf_adaptive_weight_is_the_ratio_of_gradient_norms():
  """w = ||d nll / d W|| / (||d vf / d W|| + 1e-4) for W the encoder's last layer, here a
  1x1 conv producing the latents, checked against float64 finite differences."""
  rng = np.random.default_rng(1)
  h = rng.standard_normal((2, 3, 3, 5))
  target = rng.standard_normal((2, 3, 3, 4))
  proj = rng.standard_normal((4, 8))
  features = rng.standard_normal((2, 3, 3, 8))
  w0 = rng.standard_normal((5, 4))
  with jax.enable_x64(True):
    nll = lambda w: jnp.sum(jnp.abs(jnp.einsum("nhwc,cd->nhwd", h, w) - target)) / 2
    vf = lambda w: losses.vf_loss(jnp.einsum("nhwc,cd,de->nhwe", h, w, proj), features)
    weight = lambda w, max_weight: losses.adaptive_weight(jax.grad(nll)(w), jax.grad(vf)(w),
                                                          max_weight)
    got = weight(jnp.asarray(w0), 1e8)
    want = finite_difference_norm(lambda w: float(nll(w)), w0) / (
        finite_difference_norm(lambda w: float(vf(w)), w0) + 1e-4)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # Clamped to [0, max] and detached: no gradient flows through the weight.
    assert weight(jnp.asarray(w0), 0.5) == 0.5
    assert not np.any(jax.grad(lambda w: weight(w, 1e8))(jnp.asarray(w0)))


def test_gan_adaptive_weight_by_hand():
  """Linear last layer y = x W: d/dW sum (y - t)^2 = 2 x^T (x W - t), d/dW -mean(y) = -x^T 1/n."""
  rng = np.random.default_rng(2)
  x, t, w = rng.standard_normal((6, 3)), rng.standard_normal((6, 2)), rng.standard_normal((3, 2))
  with jax.enable_x64(True):
    got = losses.adaptive_weight(
        jax.grad(lambda k: jnp.sum((x @ k - t) ** 2))(jnp.asarray(w)),
        jax.grad(lambda k: losses.generator_loss(x @ k))(jnp.asarray(w)), 1e4)
  grad_a = 2 * x.T @ (x @ w - t)
  grad_b = -x.T @ np.ones((6, 2)) / 12
  np.testing.assert_allclose(got, np.linalg.norm(grad_a) / (np.linalg.norm(grad_b) + 1e-4),
                             rtol=1e-10)


def test_hinge_lecam_kl_nll_by_hand():
  real = jnp.array([2.0, 0.5, -1.0, 0.0])
  fake = jnp.array([-2.0, -0.5, 1.0, 0.0])
  # relu(1 - real) = [0, .5, 2, 1] -> mean .875; relu(1 + fake) = [0, .5, 2, 1] -> .875.
  np.testing.assert_allclose(losses.hinge_d_loss(real, fake), 0.875)
  np.testing.assert_allclose(losses.generator_loss(fake), 0.375)
  # mean real 0.375, mean fake -0.375: relu(.375 - .1)^2 + relu(.2 + .375)^2.
  np.testing.assert_allclose(losses.lecam(real, fake, 0.2, 0.1), 0.275 ** 2 + 0.575 ** 2,
                             rtol=1e-6)
  np.testing.assert_allclose(losses.lecam(real, fake, -1.0, 1.0), 0.0)
  np.testing.assert_allclose(losses.ema_update(0.5, real, 0.9), 0.5 * 0.9 + 0.375 * 0.1,
                             rtol=1e-6)
  # KL of N(m, e^lv): 0.5 * (m^2 + e^lv - 1 - lv) summed per sample, batch-averaged.
  mean = jnp.array([1.0, 0.0, 2.0, 0.0]).reshape(2, 1, 1, 2)
  logvar = jnp.array([0.0, 1.0, 0.0, 0.0]).reshape(2, 1, 1, 2)
  np.testing.assert_allclose(losses.kl_loss(mean, logvar),
                             (0.5 * (1 + (np.e - 2)) + 0.5 * 4) / 2, rtol=1e-6)
  x = jnp.zeros((2, 2, 2, 1))
  x_rec = jnp.array([1.0, -1, 0, 0, 2, 0, 0, 0]).reshape(2, 2, 2, 1)
  lp = jnp.array([0.5, 0.25])
  # per image: sum |d| + 4 pixels * w * lpips = (2 + 4 * .5 * 2) and (2 + 4 * .25 * 2).
  np.testing.assert_allclose(losses.nll_loss(x, x_rec, lp, 2.0), (6 + 4) / 2)
  np.testing.assert_allclose(losses.nll_loss(x, x_rec, lp, 2.0, logvar=1.0),
                             (10 / np.e + 8) / 2, rtol=1e-6)


def np_conv(x, w, b, stride):
  """NHWC x, HWIO w, padding 1."""
  x = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  k = w.shape[0]
  ho, wo = (x.shape[1] - k) // stride + 1, (x.shape[2] - k) // stride + 1
  out = np.zeros((x.shape[0], ho, wo, w.shape[-1]))
  for i in range(k):
    for j in range(k):
      out += x[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride] @ w[i, j]
  return out + (0 if b is None else b)


def test_patchgan_discriminator():
  full = nnx.eval_shape(lambda: losses.NLayerDiscriminator(rngs=nnx.Rngs(0)))
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(full, nnx.Param)))
  # taming defaults (3 layers, ndf 64, BatchNorm so bias-free middle convs):
  # 3*64*16+64, 64*128*16 + 2*128, 128*256*16 + 2*256, 256*512*16 + 2*512, 512*16 + 1.
  assert count == 3136 + 131072 + 256 + 524288 + 512 + 2097152 + 1024 + 8193
  d = losses.NLayerDiscriminator(in_channels=3, ndf=8, n_layers=3, rngs=nnx.Rngs(0))
  x = np.random.default_rng(3).uniform(-1, 1, (3, 32, 32, 3)).astype(np.float32)
  logits = d(jnp.asarray(x), train=True)
  assert logits.shape == (3, 2, 2, 1)  # 32 -> 16 -> 8 -> 4 -> 3 -> 2, as torch's
  # Train mode: BatchNorm with the batch's biased statistics, eps 1e-5, LeakyReLU 0.2.
  lrelu = lambda v: np.where(v > 0, v, 0.2 * v)
  h = lrelu(np_conv(x, np.asarray(d.convs[0].kernel[...]), np.asarray(d.convs[0].bias[...]), 2))
  for i, (conv, norm) in enumerate(zip(list(d.convs)[1:-1], d.norms)):
    assert conv.bias is None
    h = np_conv(h, np.asarray(conv.kernel[...]), None, 2 if i < 2 else 1)
    # Running statistics moved by 0.1 of the batch's (torch momentum 0.1).
    np.testing.assert_allclose(norm.mean[...], 0.1 * h.mean((0, 1, 2)), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(norm.var[...], 0.9 + 0.1 * h.var((0, 1, 2)), rtol=1e-5)
    h = (h - h.mean((0, 1, 2))) / np.sqrt(h.var((0, 1, 2)) + 1e-5)
    h = lrelu(h * np.asarray(norm.scale[...]) + np.asarray(norm.bias[...]))
  want = np_conv(h, np.asarray(d.convs[-1].kernel[...]), np.asarray(d.convs[-1].bias[...]), 1)
  np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-4)
  eval_logits = d(jnp.asarray(x), train=False)
  assert eval_logits.shape == logits.shape and not np.allclose(eval_logits, logits)


def test_vf_projection_and_dinov2_patch_features():
  proj = losses.VFProjection(4, 16, rngs=nnx.Rngs(0))
  assert proj.linear_proj.bias is None and proj.linear_proj.kernel.shape == (1, 1, 4, 16)
  dino = DinoV2(width=32, depth=1, heads=2, patch=14, grid=4, rngs=nnx.Rngs(0))
  images = jnp.asarray(np.random.default_rng(4).uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
  features = losses.dinov2_patch_features(dino, images, resolution=56)
  assert features.shape == (2, 4, 4, 32)
  # Bilinear without antialias (torch F.interpolate, align_corners=False) on a ramp: a 2x
  # upsampled [0, 1] column is [0, .25, .75, 1].
  ramp = jnp.broadcast_to(jnp.array([0.0, 1.0])[None, :, None, None], (1, 2, 2, 3))
  up = jax.image.scale_and_translate(ramp, (1, 4, 4, 3), (1, 2), jnp.array([2.0, 2.0]),
                                     jnp.zeros(2), "linear", antialias=False)
  np.testing.assert_allclose(up[0, :, 0, 0], [0, 0.25, 0.75, 1])
