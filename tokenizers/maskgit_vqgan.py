"""The MaskGIT VQGAN (Chang et al. 2022): TiTok's proxy-code tokenizer and the pixel decoder of
its legacy models.

Architecture of google-research/maskgit maskgit/nets/vqgan_tokenizer.py as ported to PyTorch by
huggingface/open-muse (muse/modeling_maskgit_vqgan.py), which bytedance/1d-tokenizer
modeling/modules/maskgit_vqgan.py copies:
- GroupNorm(32, eps 1e-6, affine), SiLU; no attention anywhere;
- convolutions with TensorFlow "SAME" padding (`Conv2dSame`; for the stride-1 3x3 and 1x1
  convolutions here that is a symmetric pad of 1 and 0);
- ResnetBlock: norm1 -> silu -> conv1 -> norm2 -> silu -> conv2, both convs without bias; where
  the channel count changes the residual is `nin_shortcut` (1x1, out -> out, no bias) applied to
  the *conv2 output*, not to the block input (the original JAX ResBlock does the same), so the
  block returns h + nin_shortcut(h);
- encoder: conv_in (no bias), per level `num_res_blocks` blocks then a 2x2 average pool except at
  the last level, `mid` blocks, norm_out, silu, conv_out 1x1 (bias) to z_channels;
- decoder: conv_in 3x3 (bias), `mid` blocks, the levels from the lowest resolution up
  (`up[i]` indexed by level, up[-1] runs first) with `num_res_blocks` blocks and, except at
  level 0, nearest x2 upsampling then `upsample_conv` 3x3 (bias); norm_out, silu, conv_out;
- codebook `quantize.embedding.weight` [1024, 256], nearest code by squared distance, no
  normalisation.

Images are NHWC; the network works on [0, 1] images (the official input), `encode`/`decode`
take and give tesserax's [-1, 1]. Token ids are [B, R / f, R / f] int32, f = 2 ** (levels - 1).
"""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from tesserax.core import registry
from tesserax.core.errors import TesseraxError
from tesserax.tokenizers import quantizers, tokenizer


def maskgit_vqgan_f16() -> ml_collections.ConfigDict:
  """maskgit-vqgan-imagenet-f16-256 (1d-tokenizer modeling/titok.py PretrainedTokenizer)."""
  return ml_collections.ConfigDict(dict(
      resolution=256, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, z_channels=256,
      codebook_size=1024, in_channels=3, dtype="float32"))


def conv(cin, cout, kernel, rngs, dtype, bias=True):
  """A stride-1 convolution with TF "SAME" padding ((k - 1) // 2 before, k // 2 after)."""
  return nnx.Conv(
      cin, cout, (kernel, kernel), padding="SAME", use_bias=bias, dtype=dtype, rngs=rngs,
      kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(),
                                        (None, None, "conv_in", "conv_out")),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros, ("conv_out",)))


def group_norm(channels, rngs, dtype):
  return nnx.GroupNorm(
      channels, num_groups=32, epsilon=1e-6, dtype=dtype, use_fast_variance=False, rngs=rngs,
      scale_init=nnx.with_partitioning(nnx.initializers.ones, ("conv_out",)),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros, ("conv_out",)))


class ResnetBlock(nnx.Module):

  def __init__(self, cin, cout, *, rngs, dtype):
    self.norm1 = group_norm(cin, rngs, dtype)
    self.conv1 = conv(cin, cout, 3, rngs, dtype, bias=False)
    self.norm2 = group_norm(cout, rngs, dtype)
    self.conv2 = conv(cout, cout, 3, rngs, dtype, bias=False)
    self.nin_shortcut = conv(cout, cout, 1, rngs, dtype, bias=False) if cin != cout else None

  def __call__(self, x):
    h = self.conv1(nnx.silu(self.norm1(x)))
    h = self.conv2(nnx.silu(self.norm2(h)))
    return h + (x if self.nin_shortcut is None else self.nin_shortcut(h))


class Level(nnx.Module):
  """`block` ResnetBlocks, then (decoder, above level 0) nearest x2 and `upsample_conv`."""

  def __init__(self, cin, cout, num_blocks, upsample, *, rngs, dtype):
    self.block = nnx.List([ResnetBlock(cin if i == 0 else cout, cout, rngs=rngs, dtype=dtype)
                           for i in range(num_blocks)])
    self.upsample_conv = conv(cout, cout, 3, rngs, dtype) if upsample else None

  def __call__(self, x):
    for block in self.block:
      x = block(x)
    if self.upsample_conv is not None:
      x = self.upsample_conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))
    return x


def _avg_pool2(x):
  n, h, w, c = x.shape
  return x.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


class Encoder(nnx.Module):

  def __init__(self, c, *, rngs, dtype):
    widths = [c.ch * m for m in c.ch_mult]
    self.conv_in = conv(c.in_channels, c.ch, 3, rngs, dtype, bias=False)
    self.down = nnx.List([Level(([c.ch] + widths)[i], widths[i], c.num_res_blocks, False,
                                rngs=rngs, dtype=dtype) for i in range(len(widths))])
    self.mid = nnx.List([ResnetBlock(widths[-1], widths[-1], rngs=rngs, dtype=dtype)
                         for _ in range(c.num_res_blocks)])
    self.norm_out = group_norm(widths[-1], rngs, dtype)
    self.conv_out = conv(widths[-1], c.z_channels, 1, rngs, dtype)

  def __call__(self, x):
    x = self.conv_in(x)
    for i, level in enumerate(self.down):
      x = level(x)
      if i != len(self.down) - 1:
        x = _avg_pool2(x)
    for block in self.mid:
      x = block(x)
    return self.conv_out(nnx.silu(self.norm_out(x)))


class Decoder(nnx.Module):
  """z [B, h, w, z_channels] -> images in [0, 1] (nominally) [B, h f, w f, in_channels]."""

  def __init__(self, c, *, rngs, dtype):
    widths = [c.ch * m for m in c.ch_mult]
    self.conv_in = conv(c.z_channels, widths[-1], 3, rngs, dtype)
    self.mid = nnx.List([ResnetBlock(widths[-1], widths[-1], rngs=rngs, dtype=dtype)
                         for _ in range(c.num_res_blocks)])
    self.up = nnx.List([Level((widths + [widths[-1]])[i + 1], widths[i], c.num_res_blocks, i != 0,
                              rngs=rngs, dtype=dtype) for i in range(len(widths))])
    self.norm_out = group_norm(widths[0], rngs, dtype)
    self.conv_out = conv(widths[0], c.in_channels, 3, rngs, dtype)

  def __call__(self, z):
    x = self.conv_in(z)
    for block in self.mid:
      x = block(x)
    for level in reversed(self.up):
      x = level(x)
    return self.conv_out(nnx.silu(self.norm_out(x)))


def codebook_param(rngs, size, dim):
  """A [size, dim] codebook, init U(-1/size, 1/size) (the VQ-VAE embedding init)."""
  init = lambda key, shape: jax.random.uniform(key, shape, jnp.float32, -1.0 / size, 1.0 / size)
  return nnx.Param(nnx.with_partitioning(init, ("vocab", None))(rngs.params(), (size, dim)))


def check_widths(c):
  if any(w % 32 for w in (c.ch * m for m in c.ch_mult)):
    raise ValueError(f"ch * ch_mult {c.ch} * {tuple(c.ch_mult)} must be multiples of 32 "
                     "(GroupNorm(32))")


def nearest_codes(z, codebook):
  """argmin_k |z - e_k|^2 over the last axis of z (computed in float32)."""
  d = quantizers.distances(z.astype(jnp.float32), codebook.astype(jnp.float32))
  return jnp.argmin(d, axis=-1).astype(jnp.int32)


def check_ids(ids, codebook_size, shape):
  """Refuses token ids of another shape than [B, *shape] or, when concrete, out of range."""
  if tuple(ids.shape[1:]) != tuple(shape):
    raise TesseraxError(f"token ids of shape {tuple(ids.shape[1:])}; this tokenizer decodes "
                        f"{tuple(shape)} ids per image")
  if not jnp.issubdtype(ids.dtype, jnp.integer):
    raise TesseraxError(f"token ids of dtype {ids.dtype}; expected integers")
  if not isinstance(ids, jax.core.Tracer):
    values = np.asarray(ids)
    if values.size and (values.min() < 0 or values.max() >= codebook_size):
      raise TesseraxError(f"token ids in [{values.min()}, {values.max()}]; this tokenizer's "
                          f"codebook has {codebook_size} entries [0, {codebook_size})")


class MaskGitVQGAN(nnx.Module):
  """A discrete tokenizer (tokenizers/tokenizer.py): ids [R / f, R / f] in [0, codebook_size)."""

  is_discrete = True
  latent_dtype = np.int32

  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    c = config
    check_widths(c)
    dtype = jnp.dtype(c.dtype)
    factor = 2 ** (len(c.ch_mult) - 1)
    if c.resolution % factor:
      raise ValueError(f"resolution {c.resolution} is not divisible by the factor {factor}")
    self.resolution, self.channels = c.resolution, c.in_channels
    self.codebook_size = c.codebook_size
    self.latent_shape = (c.resolution // factor, c.resolution // factor)
    self.encoder = Encoder(c, rngs=rngs, dtype=dtype)
    self.decoder = Decoder(c, rngs=rngs, dtype=dtype)
    self.codebook = codebook_param(rngs, c.codebook_size, c.z_channels)

  def encode(self, images, keys=None):
    """Images [-1, 1] -> the nearest codes [B, h, w] of the encoder output (deterministic:
    `keys` are ignored)."""
    del keys
    tokenizer.check_images(images, self.resolution, self.channels)
    return nearest_codes(self.encoder((images + 1) / 2), self.codebook[...])

  def decode(self, ids):
    """Token ids [B, h, w] -> images in [-1, 1] (nominally)."""
    check_ids(ids, self.codebook_size, self.latent_shape)
    return self.decoder(jnp.take(self.codebook[...], ids, axis=0)) * 2 - 1


registry.TOKENIZERS.register("maskgit_vqgan", MaskGitVQGAN)
