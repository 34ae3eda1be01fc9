"""Tokenizer training losses: reconstruction, KL, PatchGAN, adaptive weights, LeCam, VF.

Sources:
- `nll_loss`, `kl_loss`: LDM ldm/modules/losses/contperceptual.py LPIPSWithDiscriminator
  ((|x - x_rec| + w_p LPIPS) / exp(logvar) + logvar, summed per image, averaged over the
  batch; KL of ldm/modules/distributions/distributions.py summed per image, batch-averaged);
  LPIPS is backbones/vgg_lpips.LPIPS.
- `NLayerDiscriminator`, `hinge_d_loss`, `generator_loss`, `adaptive_weight`:
  taming-transformers taming/modules/discriminator/model.py and
  taming/modules/losses/vqperceptual.py (calculate_adaptive_weight).
- `lecam`: Tseng et al. 2021, as in bytedance/1d-tokenizer modeling/modules/losses.py
  (compute_lecam_loss on batch-mean logits against EMAs of the other side).
- `vf_loss`, `VFProjection`, `dinov2_patch_features`: hustvl/LightningDiT
  vavae/ldm/modules/losses/contperceptual.py and vavae/ldm/models/autoencoder.py.
Every loss is a pure function of arrays (features, logits, gradients); the trainer composes
them.
"""
import jax
import jax.numpy as jnp
from flax import nnx

# ---------------------------------------------------------------------- reconstruction, KL


def nll_loss(x, x_rec, perceptual, perceptual_weight=1.0, logvar=0.0):
  """LDM's nll: sum over pixels of (|x - x_rec| + perceptual_weight * perceptual[n]) /
  exp(logvar) + logvar, averaged over the batch. `perceptual`: per-image LPIPS [N], broadcast
  over the pixels and channels as the [N, 1, 1, 1] LPIPS output is in the official code."""
  rec = jnp.abs(x - x_rec) + perceptual_weight * perceptual[:, None, None, None]
  return jnp.sum(rec / jnp.exp(logvar) + logvar) / x.shape[0]


def kl_loss(mean, logvar):
  """KL(N(mean, exp(logvar)) || N(0, 1)) summed over each latent, averaged over the batch."""
  kl = 0.5 * jnp.sum(mean ** 2 + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))
  return jnp.mean(kl)


# ------------------------------------------------------------------------------------- GAN


class NLayerDiscriminator(nnx.Module):
  """taming's PatchGAN: conv 4x4 stride 2 + LeakyReLU(0.2); n_layers - 1 times conv 4x4 stride
  2 (no bias) + BatchNorm + LeakyReLU(0.2) with ndf * min(2^n, 8) channels; conv 4x4 stride 1
  (no bias) + BatchNorm + LeakyReLU(0.2); conv 4x4 stride 1 to one logit per patch. Padding 1,
  weights N(0, 0.02), BatchNorm scale N(1, 0.02) (weights_init). BatchNorm as in torch (eps
  1e-5, momentum 0.1): batch statistics with `train` (as the official loss always runs it),
  whose running averages it updates (nnx.BatchStat), the running averages otherwise; the
  running variance averages the biased batch variance (torch: unbiased, a factor n / (n - 1)
  that only affects `train=False`)."""

  def __init__(self, in_channels=3, ndf=64, n_layers=3, *, rngs: nnx.Rngs):
    init = nnx.initializers.normal(0.02)
    widths = [ndf * min(2 ** n, 8) for n in range(n_layers + 1)]
    conv = lambda cin, cout, stride, bias: nnx.Conv(
        cin, cout, (4, 4), strides=stride, padding=1, use_bias=bias, kernel_init=init,
        rngs=rngs)
    self.convs = nnx.List(
        [conv(in_channels, ndf, 2, True)]
        + [conv(widths[n - 1], widths[n], 2 if n < n_layers else 1, False)
           for n in range(1, n_layers + 1)]
        + [conv(widths[-1], 1, 1, True)])
    self.norms = nnx.List([
        nnx.BatchNorm(w, momentum=0.9, epsilon=1e-5, use_fast_variance=False, rngs=rngs,
                      scale_init=lambda key, shape, dtype: 1 + 0.02 * jax.random.normal(
                          key, shape, dtype))
        for w in widths[1:]])

  def __call__(self, x, train=True):
    x = jax.nn.leaky_relu(self.convs[0](x), 0.2)
    for conv, norm in zip(self.convs[1:-1], self.norms):
      x = jax.nn.leaky_relu(norm(conv(x), use_running_average=not train), 0.2)
    return self.convs[-1](x)


def hinge_d_loss(logits_real, logits_fake):
  """0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_rec)))."""
  return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def generator_loss(logits_fake):
  """The generator's adversarial loss, -mean D(x_rec)."""
  return -jnp.mean(logits_fake)


def adaptive_weight(grad_a, grad_b, max_weight):
  """||grad_a|| / (||grad_b|| + 1e-4), clamped to [0, max_weight] and detached: the gradients
  of two losses w.r.t. one last layer's kernel. GAN (taming calculate_adaptive_weight): nll
  over the generator loss w.r.t. the decoder's conv_out kernel, max 1e4; VF (LightningDiT
  calculate_adaptive_weight_vf): nll over the VF loss w.r.t. the encoder's conv_out kernel,
  max 1e8. The caller multiplies by disc_weight / vf_weight."""
  ratio = jnp.linalg.norm(grad_a) / (jnp.linalg.norm(grad_b) + 1e-4)
  return jax.lax.stop_gradient(jnp.clip(ratio, 0.0, max_weight))


def lecam(logits_real, logits_fake, ema_real, ema_fake):
  """LeCam regulariser: relu(mean D(x) - ema_fake)^2 + relu(ema_real - mean D(x_rec))^2, the
  EMAs tracking the batch-mean logits (`ema_update`)."""
  return (jnp.square(jax.nn.relu(jnp.mean(logits_real) - ema_fake))
          + jnp.square(jax.nn.relu(ema_real - jnp.mean(logits_fake))))


def ema_update(ema, logits, decay):
  """ema * decay + mean(logits) * (1 - decay) (TiTok: decay 0.999)."""
  return ema * decay + jax.lax.stop_gradient(jnp.mean(logits)) * (1.0 - decay)


# -------------------------------------------------------------------------------------- VF


class VFProjection(nnx.Module):
  """linear_proj: a bias-free 1x1 conv from the latent channels to the foundation model's
  feature width (1024 for DINOv2-L), applied to the sampled latent."""

  def __init__(self, latent_channels, feature_dim, *, rngs: nnx.Rngs):
    self.linear_proj = nnx.Conv(latent_channels, feature_dim, (1, 1), use_bias=False, rngs=rngs)

  def __call__(self, z):
    return self.linear_proj(z)


def _normalize(x, eps=1e-12):
  """torch F.normalize over the last axis: x / max(||x||, eps)."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def vf_loss(z, features, cos_margin=0.5, distmat_margin=0.25, cos_weight=1.0,
            distmat_weight=1.0):
  """distmat_weight * L_mdms + cos_weight * L_mcos between projected latents z and foundation
  features, both [N, H, W, C]:
  L_mdms = mean relu(|cos(z_i, z_j) - cos(f_i, f_j)| - distmat_margin) over every sample and
  pair of positions; L_mcos = mean relu(1 - cos_margin - cos(z_i, f_i)) over positions (torch
  F.cosine_similarity, eps 1e-8)."""
  n, c = z.shape[0], z.shape[-1]
  z, features = z.reshape(n, -1, c), features.reshape(n, -1, features.shape[-1])
  zn, fn = _normalize(z), _normalize(features)
  hp = jax.lax.Precision.HIGHEST
  diff = jnp.abs(jnp.einsum("bic,bjc->bij", zn, zn, precision=hp)
                 - jnp.einsum("bic,bjc->bij", fn, fn, precision=hp))
  mdms = jnp.mean(jax.nn.relu(diff - distmat_margin))
  norms = jnp.linalg.norm(z, axis=-1) * jnp.linalg.norm(features, axis=-1)
  cos = jnp.sum(z * features, axis=-1) / jnp.maximum(norms, 1e-8)
  mcos = jnp.mean(jax.nn.relu(1.0 - cos_margin - cos))
  return distmat_weight * mdms + cos_weight * mcos


def dinov2_patch_features(dino, images, resolution=224):
  """Final-norm DINOv2 patch tokens [N, R/14, R/14, width] of images in [-1, 1], resized
  bilinearly (no antialias, F.interpolate) to `resolution` and fed without ImageNet
  normalisation, as the released VA-VAE was trained (hustvl/LightningDiT issue #78). The CLS
  token is dropped. `dino`: backbones/dinov2.DinoV2."""
  n, h, w, c = images.shape
  scale = jnp.array([resolution / h, resolution / w])
  x = jax.image.scale_and_translate(images, (n, resolution, resolution, c), (1, 2), scale,
                                    jnp.zeros(2), "linear", antialias=False)
  return dino.patch_features(x)
