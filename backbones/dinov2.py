"""DINOv2 ViT-L/14 ("dinov2_vitl14", register-free), the FD-DINOv2 encoder.

Architecture as in facebookresearch/dinov2 models/vision_transformer.py and layers/ with the
torch hub settings of hub/backbones.py (img_size 518, patch 14, LayerScale, MLP FFN, no block
chunks); module and parameter names mirror that state dict. Pre-norm blocks
x += ls1(attn(norm1(x))); x += ls2(mlp(norm2(x))), LayerNorm eps 1e-6, fused qkv with bias,
exact-erf GELU (nn/'s Attention and Mlp). The output is the final-norm CLS token
(`x_norm_clstoken`; the hub head is Identity), 1024-d for ViT-L. An evaluation network: every
matmul runs at HIGHEST precision, and its parameters carry no logical axis names.

The checkpoint's position embedding covers a 37x37 patch grid (518 / 14); at 224 the official
`interpolate_pos_encoding` resamples it to 16x16 with torch bicubic (A = -0.75,
align_corners=False, border-clamped taps) at scale_factor (16 + 0.1) / 37, the "+ 0.1" of
dino#8. That resampling is part of every official forward at 224, so it is reproduced here.

`preprocess` follows dgm-eval, the FD-DINOv2 paper's code (Stein et al. 2023): PIL
`Resize((224, 224), BICUBIC)` on the uint8 image, ToTensor, ImageNet mean/std. (EDM2's
default, torch bicubic with antialias on floats, skips PIL's uint8 rounding between passes.)
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tesserax.core.errors import TesseraxError
from tesserax.nn.attention import Attention
from tesserax.nn.layers import Mlp

HIGHEST = jax.lax.Precision.HIGHEST
RESOLUTION = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class LayerScale(nnx.Module):

  def __init__(self, width):
    self.gamma = nnx.Param(jnp.ones((width,), jnp.float32))

  def __call__(self, x):
    return x * self.gamma[...]


class Block(nnx.Module):

  def __init__(self, width, heads, *, rngs):
    norm = functools.partial(nnx.LayerNorm, width, epsilon=1e-6, rngs=rngs)
    self.norm1 = norm()
    self.attn = Attention(width, heads, precision=HIGHEST, logical_axes=False, rngs=rngs)
    self.ls1 = LayerScale(width)
    self.norm2 = norm()
    self.mlp = Mlp(width, 4 * width, approximate_gelu=False, precision=HIGHEST,
                   logical_axes=False, rngs=rngs)
    self.ls2 = LayerScale(width)

  def __call__(self, x):
    x = x + self.ls1(self.attn(self.norm1(x)))
    return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nnx.Module):

  def __init__(self, patch, width, *, rngs):
    self.proj = nnx.Conv(3, width, (patch, patch), strides=patch, padding="VALID",
                         precision=HIGHEST, rngs=rngs)

  def __call__(self, x):
    x = self.proj(x)
    return x.reshape(x.shape[0], -1, x.shape[-1])  # tokens in row-major (h, w) order


class DinoV2(nnx.Module):
  """Normalised images [N, R, R, 3] (R a multiple of 14, see `preprocess`) -> CLS [N, width].

  The defaults are ViT-L/14 (vit_large: width 1024, depth 24, 16 heads) with the hub's 37x37
  position grid; smaller settings only serve tests.
  """

  def __init__(self, *, width=1024, depth=24, heads=16, patch=14, grid=37, rngs: nnx.Rngs):
    self.patch = patch
    self.patch_embed = PatchEmbed(patch, width, rngs=rngs)
    self.cls_token = nnx.Param(jnp.zeros((1, 1, width), jnp.float32))
    self.pos_embed = nnx.Param(jnp.zeros((1, 1 + grid * grid, width), jnp.float32))
    self.blocks = nnx.List([Block(width, heads, rngs=rngs) for _ in range(depth)])
    self.norm = nnx.LayerNorm(width, epsilon=1e-6, rngs=rngs)

  def position_embedding(self, size):
    """pos_embed for a size x size patch grid (interpolate_pos_encoding)."""
    pos = self.pos_embed[...]
    grid = int(round((pos.shape[1] - 1) ** 0.5))
    if size == grid:
      return pos
    m = jnp.asarray(bicubic_matrix(grid, size, (size + 0.1) / grid))
    patch = pos[0, 1:].reshape(grid, grid, -1)
    patch = jnp.einsum("yi,xj,ijd->yxd", m, m, patch, precision=HIGHEST)
    return jnp.concatenate([pos[:, :1], patch.reshape(1, size * size, -1)], axis=1)

  def tokens(self, x):
    """Final-norm tokens [N, 1 + (R / patch)^2, width]: CLS first, then the patches in row-major
    order."""
    if x.shape[1] != x.shape[2] or x.shape[1] % self.patch:
      raise TesseraxError(f"DINOv2 needs square inputs, a multiple of {self.patch}; got "
                          f"{x.shape[1]}x{x.shape[2]}")
    tokens = self.patch_embed(x)
    cls = jnp.broadcast_to(self.cls_token[...], (x.shape[0], 1, tokens.shape[-1]))
    x = jnp.concatenate([cls, tokens], axis=1) + self.position_embedding(x.shape[1] // self.patch)
    for block in self.blocks:
      x = block(x)
    return self.norm(x)

  def __call__(self, x):
    """The CLS token (FD-DINOv2 features)."""
    return self.tokens(x)[:, 0]

  def patch_features(self, x):
    """Patch tokens as a feature map [N, R / patch, R / patch, width] (VA-VAE's VF target)."""
    grid = x.shape[1] // self.patch
    return self.tokens(x)[:, 1:].reshape(x.shape[0], grid, grid, -1)


def bicubic_matrix(in_size, out_size, scale_factor):
  """[out, in] float32 weights of torch's upsample_bicubic2d along one axis, given an explicit
  scale_factor: src = (dst + 0.5) / scale_factor - 0.5, taps floor(src) - 1 .. floor(src) + 2
  clamped to the border, cubic convolution with A = -0.75."""
  a = -0.75
  src = np.float32(1.0 / scale_factor) * (np.arange(out_size, dtype=np.float32) + 0.5) - 0.5
  base = np.floor(src)
  t = (src - base).astype(np.float32)

  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  weights = np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=1)
  m = np.zeros((out_size, in_size), np.float32)
  for k in range(4):
    idx = np.clip(base.astype(int) - 1 + k, 0, in_size - 1)
    np.add.at(m, (np.arange(out_size), idx), weights[:, k])
  return m


def pil_bicubic_matrix(in_size, out_size):
  """[out, in] float64 weights of PIL's BICUBIC resize along one axis (Resample.c,
  precompute_coeffs): Keys kernel with a = -0.5, widened by in/out when downsampling, centred
  at (i + 0.5) * in / out, normalised over the taps inside the image."""
  scale = in_size / out_size
  stretch = max(scale, 1.0)
  centre = (np.arange(out_size) + 0.5) * scale
  x = np.abs(np.arange(in_size)[None, :] + 0.5 - centre[:, None]) / stretch
  w = np.where(x < 1, (1.5 * x - 2.5) * x * x + 1,
               np.where(x < 2, ((-0.5 * x + 2.5) * x - 4) * x + 2, 0.0))
  return w / w.sum(axis=1, keepdims=True)


def _resize_axis_uint8(x, axis, size):
  """One PIL resampling pass: the weighted sum, rounded half up and clipped to uint8."""
  m = jnp.asarray(pil_bicubic_matrix(x.shape[axis], size), jnp.float32)
  x = jnp.moveaxis(jnp.tensordot(m, x, axes=((1,), (axis,)), precision=HIGHEST), 0, axis)
  return jnp.clip(jnp.floor(x + 0.5), 0, 255)


def preprocess(images):
  """uint8 NHWC -> float32 [N, 224, 224, 3]: PIL's bicubic resize (a width pass then a
  height pass, each rounded to uint8, as Resample.c resamples 8-bit images), then x / 255
  normalised with the ImageNet mean and std. Recent Pillow runs the height pass first for
  some strongly non-square downscales; square images, the case of generated samples, are
  unaffected."""
  if images.dtype != jnp.uint8 or images.ndim != 4 or images.shape[-1] != 3:
    raise TesseraxError(
        f"DINOv2 input must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
  x = images.astype(jnp.float32)
  if x.shape[2] != RESOLUTION:
    x = _resize_axis_uint8(x, 2, RESOLUTION)
  if x.shape[1] != RESOLUTION:
    x = _resize_axis_uint8(x, 1, RESOLUTION)
  return (x / 255.0 - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)
