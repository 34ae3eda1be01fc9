"""The LDM KL autoencoder ("VQGAN-KL"): VA-VAE f16d32 and SD-VAE f8d4.

Architecture of CompVis ldm/modules/diffusionmodules/model.py (Encoder, Decoder) and
ldm/models/autoencoder.py (AutoencoderKL), which hustvl/LightningDiT tokenizer/autoencoder.py
copies:
- GroupNorm(32, eps 1e-6, affine), swish x * sigmoid(x);
- ResnetBlock: norm1 -> swish -> conv1 3x3 -> norm2 -> swish -> conv2 3x3, plus the input
  through a 1x1 `nin_shortcut` where the channel count changes;
- Downsample: pad (0, 1, 0, 1) (right and bottom only), then a 3x3 stride-2 conv, padding 0;
- Upsample: nearest x2, then a 3x3 conv;
- AttnBlock: single head, 1x1-conv q/k/v/proj_out on a GroupNorm'd input, scale c^-0.5,
  residual;
- encoder: conv_in, per level `num_res_blocks` ResnetBlocks (each followed by an AttnBlock
  where the level's resolution is in `attn_resolutions`) and a Downsample except after the last
  level, mid (block_1, attn_1, block_2), norm_out, swish, conv_out to 2 * z_channels;
- decoder: conv_in, mid, then the levels from the lowest resolution up with
  `num_res_blocks + 1` ResnetBlocks and an Upsample except at level 0; `decoder.up[i]` is
  indexed by level (up[-1] runs first), as in the official state dict;
- `in_channels` image channels in and out (the ddconfig in_channels / out_ch; 3 for RGB);
- quant_conv 1x1 (2 z_channels -> 2 embed_dim) and post_quant_conv 1x1 (embed_dim ->
  z_channels); the moments split into mean | logvar (torch.chunk(2, dim=1)), logvar clamped
  to [-30, 20] (DiagonalGaussianDistribution in ldm/modules/distributions/distributions.py).

Module and parameter names mirror the official state dict (convert/vae_checkpoints.py).
Images are NHWC in [-1, 1]; latents NHWC [N, R / f, R / f, embed_dim] with
f = 2 ** (len(ch_mult) - 1).
"""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from tesserax.core import registry
from tesserax.core.errors import TesseraxError
from tesserax.nn import attention
from tesserax.tokenizers import tokenizer

LOGVAR_RANGE = (-30.0, 20.0)


def vavae_f16d32() -> ml_collections.ConfigDict:
  """VA-VAE f16d32 (LightningDiT tokenizer/configs/vavae_f16d32.yaml, vavae/configs/
  f16d32_vfdinov2.yaml): 69,836,067 parameters (keys/vavae_f16d32.txt)."""
  return ml_collections.ConfigDict(dict(
      resolution=256, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
      attn_resolutions=(16,), z_channels=32, embed_dim=32, in_channels=3, dtype="float32"))


def sd_vae_f8d4() -> ml_collections.ConfigDict:
  """SD-VAE f8d4 (stabilityai/sd-vae-ft-ema and sd-vae-ft-mse; ldm models/first_stage_models/
  kl-f8/config.yaml): 83,653,863 parameters, the attention only in the mid blocks."""
  return ml_collections.ConfigDict(dict(
      resolution=256, ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2,
      attn_resolutions=(), z_channels=4, embed_dim=4, in_channels=3, dtype="float32"))


CONFIGS = {"vavae_f16d32": vavae_f16d32, "sd_vae_f8d4": sd_vae_f8d4}


def _conv(cin, cout, kernel, rngs, dtype, padding=None, strides=1):
  """nnx.Conv with logical axis names; 3x3 convs pad 1 (torch padding=1) unless given."""
  return nnx.Conv(
      cin, cout, (kernel, kernel), strides=strides,
      padding=(kernel // 2 if padding is None else padding), dtype=dtype, rngs=rngs,
      kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(),
                                        (None, None, "conv_in", "conv_out")),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros, ("conv_out",)))


def _norm(channels, rngs, dtype):
  return nnx.GroupNorm(
      channels, num_groups=32, epsilon=1e-6, dtype=dtype, use_fast_variance=False, rngs=rngs,
      scale_init=nnx.with_partitioning(nnx.initializers.ones, ("conv_out",)),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros, ("conv_out",)))


class ResnetBlock(nnx.Module):

  def __init__(self, cin, cout, *, rngs, dtype):
    self.norm1 = _norm(cin, rngs, dtype)
    self.conv1 = _conv(cin, cout, 3, rngs, dtype)
    self.norm2 = _norm(cout, rngs, dtype)
    self.conv2 = _conv(cout, cout, 3, rngs, dtype)
    self.nin_shortcut = _conv(cin, cout, 1, rngs, dtype) if cin != cout else None

  def __call__(self, x):
    h = self.conv1(nnx.swish(self.norm1(x)))
    h = self.conv2(nnx.swish(self.norm2(h)))
    return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nnx.Module):
  """LDM AttnBlock: single-head attention over the h * w positions, with 1x1-conv q, k, v and
  proj_out on a GroupNorm'd input, scale c^-0.5, residual. The "einsum" implementation keeps
  the numbers of the original einsum computation (see nn/attention.dot_product_attention)."""

  def __init__(self, channels, *, rngs, dtype):
    self.norm = _norm(channels, rngs, dtype)
    self.q = _conv(channels, channels, 1, rngs, dtype)
    self.k = _conv(channels, channels, 1, rngs, dtype)
    self.v = _conv(channels, channels, 1, rngs, dtype)
    self.proj_out = _conv(channels, channels, 1, rngs, dtype)

  def __call__(self, x):
    n, h, w, c = x.shape
    y = self.norm(x)
    q, k, v = (f(y).reshape(n, h * w, 1, c) for f in (self.q, self.k, self.v))
    out = attention.dot_product_attention(q, k, v, implementation="einsum")
    return x + self.proj_out(out.reshape(n, h, w, c))


class Downsample(nnx.Module):

  def __init__(self, channels, *, rngs, dtype):
    self.conv = _conv(channels, channels, 3, rngs, dtype, padding=0, strides=2)

  def __call__(self, x):
    return self.conv(jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))))


class Upsample(nnx.Module):

  def __init__(self, channels, *, rngs, dtype):
    self.conv = _conv(channels, channels, 3, rngs, dtype)

  def __call__(self, x):
    return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class Level(nnx.Module):
  """One resolution level: `block` ResnetBlocks, an AttnBlock after each where `attn`, and the
  level's `downsample` (encoder) or `upsample` (decoder)."""

  def __init__(self, cin, cout, num_blocks, attn, resample, *, rngs, dtype):
    self.block = nnx.List([ResnetBlock(cin if i == 0 else cout, cout, rngs=rngs, dtype=dtype)
                           for i in range(num_blocks)])
    self.attn = nnx.List([AttnBlock(cout, rngs=rngs, dtype=dtype)
                          for _ in range(num_blocks if attn else 0)])
    if resample == "down":
      self.downsample = Downsample(cout, rngs=rngs, dtype=dtype)
    elif resample == "up":
      self.upsample = Upsample(cout, rngs=rngs, dtype=dtype)

  def __call__(self, x):
    for i, block in enumerate(self.block):
      x = block(x)
      if len(self.attn):
        x = self.attn[i](x)
    if hasattr(self, "downsample"):
      x = self.downsample(x)
    if hasattr(self, "upsample"):
      x = self.upsample(x)
    return x


class Mid(nnx.Module):

  def __init__(self, channels, *, rngs, dtype):
    self.block_1 = ResnetBlock(channels, channels, rngs=rngs, dtype=dtype)
    self.attn_1 = AttnBlock(channels, rngs=rngs, dtype=dtype)
    self.block_2 = ResnetBlock(channels, channels, rngs=rngs, dtype=dtype)

  def __call__(self, x):
    return self.block_2(self.attn_1(self.block_1(x)))


def _attn_levels(c):
  """Whether each level has attention: level i works at resolution / 2**i."""
  return [c.resolution // 2 ** i in tuple(c.attn_resolutions) for i in range(len(c.ch_mult))]


class Encoder(nnx.Module):

  def __init__(self, c, *, rngs, dtype):
    widths = [c.ch * m for m in c.ch_mult]
    last = len(widths) - 1
    self.conv_in = _conv(c.in_channels, c.ch, 3, rngs, dtype)
    self.down = nnx.List([
        Level(([c.ch] + widths)[i], widths[i], c.num_res_blocks, attn,
              "down" if i != last else None, rngs=rngs, dtype=dtype)
        for i, attn in enumerate(_attn_levels(c))])
    self.mid = Mid(widths[-1], rngs=rngs, dtype=dtype)
    self.norm_out = _norm(widths[-1], rngs, dtype)
    self.conv_out = _conv(widths[-1], 2 * c.z_channels, 3, rngs, dtype)

  def __call__(self, x):
    x = self.conv_in(x)
    for level in self.down:
      x = level(x)
    return self.conv_out(nnx.swish(self.norm_out(self.mid(x))))


class Decoder(nnx.Module):

  def __init__(self, c, *, rngs, dtype):
    widths = [c.ch * m for m in c.ch_mult]
    self.conv_in = _conv(c.z_channels, widths[-1], 3, rngs, dtype)
    self.mid = Mid(widths[-1], rngs=rngs, dtype=dtype)
    self.up = nnx.List([
        Level((widths + [widths[-1]])[i + 1], widths[i], c.num_res_blocks + 1, attn,
              "up" if i != 0 else None, rngs=rngs, dtype=dtype)
        for i, attn in enumerate(_attn_levels(c))])
    self.norm_out = _norm(widths[0], rngs, dtype)
    self.conv_out = _conv(widths[0], c.in_channels, 3, rngs, dtype)

  def __call__(self, z):
    x = self.mid(self.conv_in(z))
    for level in reversed(self.up):
      x = level(x)
    return self.conv_out(nnx.swish(self.norm_out(x)))


class KLAutoencoder(nnx.Module):
  """A continuous tokenizer (the interface of tokenizers/tokenizer.py): float32 latents of
  `latent_shape` [R / f, R / f, embed_dim]."""

  is_discrete = False
  codebook_size = 0
  latent_dtype = np.float32

  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    c = config
    if any(w % 32 for w in (c.ch * m for m in c.ch_mult)):
      raise ValueError(f"ch * ch_mult {c.ch} * {tuple(c.ch_mult)} must be multiples of 32 "
                       "(GroupNorm(32))")
    dtype = jnp.dtype(c.dtype)
    self.resolution, self.channels = c.resolution, c.in_channels
    self.factor = 2 ** (len(c.ch_mult) - 1)
    if c.resolution % self.factor:
      raise ValueError(f"resolution {c.resolution} is not divisible by the factor {self.factor}")
    self.latent_shape = (c.resolution // self.factor, c.resolution // self.factor, c.embed_dim)
    self.encoder = Encoder(c, rngs=rngs, dtype=dtype)
    self.decoder = Decoder(c, rngs=rngs, dtype=dtype)
    self.quant_conv = _conv(2 * c.z_channels, 2 * c.embed_dim, 1, rngs, dtype)
    self.post_quant_conv = _conv(c.embed_dim, c.z_channels, 1, rngs, dtype)

  def posterior(self, images):
    """(mean, logvar) of the diagonal Gaussian posterior, logvar clamped to [-30, 20]."""
    tokenizer.check_images(images, self.resolution, self.channels)
    moments = self.quant_conv(self.encoder(images))
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, *LOGVAR_RANGE)

  def encode(self, images, keys=None):
    """Latents: the posterior mean, or with per-example PRNG keys [B] a posterior sample
    mean + std * normal(keys[i]) of each example."""
    mean, logvar = self.posterior(images)
    return mean if keys is None else jax.vmap(sample)(mean, logvar, keys)

  def decode(self, latents):
    if tuple(latents.shape[1:]) != self.latent_shape:
      raise TesseraxError(f"latents of shape {tuple(latents.shape[1:])} given to a tokenizer "
                          f"with latent shape {self.latent_shape}")
    return self.decoder(self.post_quant_conv(latents))


def sample(mean, logvar, key=None):
  """The posterior mean (key None) or mean + exp(logvar / 2) * eps."""
  if key is None:
    return mean
  return mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)


def build(config, seed=0) -> KLAutoencoder:
  return KLAutoencoder(config, rngs=nnx.Rngs(seed))


registry.TOKENIZERS.register("kl_autoencoder", KLAutoencoder)
