"""TiTok's stage-2 (decoder fine-tuning) and single-stage adversarial pieces,
bytedance/1d-tokenizer modeling/modules/discriminator.py and modeling/modules/losses.py
(ReconstructionLoss_Stage2). Stage 1 is titok.stage1_loss.

- `MaskBitDiscriminator` (NLayerDiscriminator of MaskBit, Weber et al. 2024): block_in Conv 5x5
  (TF "SAME") 3 -> hidden + LeakyReLU(0.1); per stage Conv 3x3 SAME (hidden * (1, 1, 2, 4)[i]
  -> hidden * (1, 2, 4)[i]), a BlurPool (the depthwise [1, 3, 3, 1] x [1, 3, 3, 1] / 64 filter,
  stride 2, TF-SAME pad for a 4-tap kernel), GroupNorm(32, eps 1e-5), LeakyReLU(0.1); an
  adaptive max pool to 16 x 16; to_logits Conv 1x1 + LeakyReLU(0.1) + Conv 5x5 SAME -> one
  logit map. Images as the official loss feeds them: RGB in [0, 1], NHWC here.
- `stage2_generator_loss`, `stage2_discriminator_loss`: the generator total
  w_rec * mse + w_p * perceptual + w_q * quantizer loss + w_d * factor * (-mean D(x_rec)), the
  factor `discriminator_factor` from `discriminator_start` on (no adaptive weight); the
  discriminator factor * hinge + w_lecam * LeCam against EMAs (decay 0.999) of the batch-mean
  logits (tokenizers/losses.py). The perceptual term is the caller's (stage 2: MSE of
  torchvision ConvNeXt-S logits of both images resized to 224; single stage: LPIPS +
  0.1 ConvNeXt-S), passed as a number.
"""
import jax
import jax.numpy as jnp
from flax import nnx

from tesserax.tokenizers import losses

BLUR = (1.0, 3.0, 3.0, 1.0)
LEAKY_SLOPE = 0.1


def _conv(cin, cout, kernel, rngs):
  return nnx.Conv(cin, cout, (kernel, kernel), padding="SAME", rngs=rngs)


def blur_pool(x):
  """BlurBlock: the separable [1, 3, 3, 1] filter (normalised) per channel, stride 2, after the
  TF-SAME pad of a 4-tap stride-2 kernel (total max((ceil(i / 2) - 1) * 2 + 4 - i, 0), the
  smaller half first)."""
  _, h, w, c = x.shape
  pads = []
  for i in (h, w):
    total = max((-(-i // 2) - 1) * 2 + 4 - i, 0)
    pads.append((total // 2, total - total // 2))
  k = jnp.asarray(BLUR)
  k = jnp.outer(k, k) / jnp.sum(k) ** 2
  kernel = jnp.tile(k[:, :, None, None], (1, 1, 1, c)).astype(x.dtype)
  return jax.lax.conv_general_dilated(
      x, kernel, (2, 2), pads, dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=c)


def adaptive_max_pool(x, size):
  """torch AdaptiveMaxPool2d((size, size)) where the side divides or is divided by `size`."""
  n, h, w, c = x.shape
  if h % size == 0 and w % size == 0:
    return x.reshape(n, size, h // size, size, w // size, c).max(axis=(2, 4))
  if size % h == 0 and size % w == 0:
    return jnp.repeat(jnp.repeat(x, size // h, axis=1), size // w, axis=2)
  raise ValueError(f"adaptive max pool of {h}x{w} to {size}x{size}: sides must divide or be "
                   "divided by the output size")


class MaskBitDiscriminator(nnx.Module):

  def __init__(self, in_channels=3, hidden=128, num_stages=3, pool_size=16, *, rngs: nnx.Rngs):
    mult = (1,) + tuple(2 ** i for i in range(num_stages))
    self.pool_size = pool_size
    self.block_in = _conv(in_channels, hidden, 5, rngs)
    self.blocks = nnx.List([_conv(hidden * mult[i], hidden * mult[i + 1], 3, rngs)
                            for i in range(num_stages)])
    self.norms = nnx.List([nnx.GroupNorm(hidden * mult[i + 1], num_groups=32, epsilon=1e-5,
                                         use_fast_variance=False, rngs=rngs)
                           for i in range(num_stages)])
    width = hidden * mult[-1]
    self.to_logits_in = _conv(width, width, 1, rngs)
    self.to_logits_out = _conv(width, 1, 5, rngs)

  def __call__(self, images01):
    """Images [B, H, W, 3] in [0, 1] -> logits [B, 16, 16, 1]."""
    x = jax.nn.leaky_relu(self.block_in(images01), LEAKY_SLOPE)
    for conv, norm in zip(self.blocks, self.norms):
      x = jax.nn.leaky_relu(norm(blur_pool(conv(x))), LEAKY_SLOPE)
    x = adaptive_max_pool(x, self.pool_size)
    return self.to_logits_out(jax.nn.leaky_relu(self.to_logits_in(x), LEAKY_SLOPE))


def discriminator_factor(step, start, factor=1.0):
  """`factor` from step `start` on, 0 before (should_discriminator_be_trained)."""
  return jnp.where(step >= start, factor, 0.0)


def stage2_generator_loss(images01, reconstructions01, perceptual, quantizer_loss,
                          logits_fake, step, *, reconstruction_weight=1.0,
                          perceptual_weight=0.1, quantizer_weight=1.0, discriminator_weight=0.01,
                          discriminator_start=20_000, factor=1.0):
  """(total, metrics) of ReconstructionLoss_Stage2._forward_generator; images in [0, 1],
  `logits_fake` D(reconstructions) with the discriminator's parameters held fixed. Defaults:
  configs/training/TiTok/stage2/*.yaml (stage 2 zeroes the frozen quantizer's loss)."""
  rec = reconstruction_weight * jnp.mean(jnp.square(images01 - reconstructions01))
  gan = losses.generator_loss(logits_fake)
  weighted_gan = discriminator_weight * discriminator_factor(step, discriminator_start,
                                                             factor) * gan
  total = rec + perceptual_weight * perceptual + quantizer_weight * quantizer_loss + weighted_gan
  return total, {"reconstruction_loss": rec, "perceptual_loss": perceptual_weight * perceptual,
                 "quantizer_loss": quantizer_weight * quantizer_loss,
                 "weighted_gan_loss": weighted_gan, "gan_loss": gan}


def stage2_discriminator_loss(logits_real, logits_fake, ema_real, ema_fake, step, *,
                              discriminator_start=20_000, factor=1.0, lecam_weight=0.001,
                              lecam_decay=0.999):
  """(loss, new ema_real, new ema_fake) of _forward_discriminator: factor * hinge +
  lecam_weight * LeCam against the EMAs before this step's update."""
  loss = discriminator_factor(step, discriminator_start, factor) * losses.hinge_d_loss(
      logits_real, logits_fake)
  loss = loss + lecam_weight * losses.lecam(logits_real, logits_fake, ema_real, ema_fake)
  return (loss, losses.ema_update(ema_real, logits_real, lecam_decay),
          losses.ema_update(ema_fake, logits_fake, lecam_decay))
