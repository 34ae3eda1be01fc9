"""The FID InceptionV3: the TF "inception-2015-12-05" graph as ported by pytorch-fid.

pytorch-fid inception.py (FIDInceptionA/C/E_1/E_2): module and parameter names mirror the PyTorch
state dict (`Mixed_6d.branch1x1.conv.kernel` <- `Mixed_6d.branch1x1.conv.weight`), and the
quirks that separate it from torchvision's InceptionV3 are kept: convolutions without bias,
BatchNorm eps 1e-3 with running statistics, `count_include_pad=False` average pools in the
branch pools of Mixed_5*, Mixed_6b-e and Mixed_7b, a 3x3 max pool in Mixed_7c, a 1008-way head.

Images enter as uint8 NHWC of any size. The evaluators quantise float [-1, 1] images to uint8
first (data/preprocess.py:to_uint8), so a float batch and the uint8 file written from it give
the same features. `preprocess` then resizes to 299 and normalises:
  "adm"          the TF graph's own steps (ADM evaluator, torch-fidelity): TF1 ResizeBilinear
                 (align_corners=False, no half-pixel centres, src = dst * in / out), then
                 (x - 128) / 128 (torch-fidelity interpolate_bilinear_2d_like_tensorflow1x);
  "pytorch_fid"  pytorch-fid's steps: x / 255, F.interpolate bilinear with half-pixel
                 centres, then 2x - 1.
Convolutions and the head run at HIGHEST precision (no TF32 or bf16 passes).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.extend import core as jex_core

from tesserax.core.errors import TesseraxError

HIGHEST = lax.Precision.HIGHEST
RESOLUTION = 299
POOL_DIM = 2048
SPATIAL_DIM = 17 * 17 * 7  # sFID: Mixed_6d.branch1x1[..., :7], flattened (ADM evaluator.py)
NUM_CLASSES = 1008
MODES = ("adm", "pytorch_fid")


class BasicConv2d(nnx.Module):
  """Convolution without bias, BatchNorm (eps 1e-3, running statistics), ReLU."""

  def __init__(self, cin, cout, kernel, *, stride=1, padding=(0, 0), rngs):
    kernel = (kernel, kernel) if isinstance(kernel, int) else kernel
    self.conv = nnx.Conv(cin, cout, kernel, strides=stride, use_bias=False,
                         padding=[(padding[0], padding[0]), (padding[1], padding[1])],
                         precision=HIGHEST, rngs=rngs)
    self.bn = nnx.BatchNorm(cout, epsilon=1e-3, use_running_average=True, rngs=rngs)

  def __call__(self, x):
    return nnx.relu(self.bn(self.conv(x)))


def avg_pool_exclude_pad(x):
  """3x3/1 average pool, padding 1, dividing by the number of real pixels in each window
  (`count_include_pad=False`: "Tensorflow's average pool does not use the padded zero's")."""
  pad = ((0, 0), (1, 1), (1, 1), (0, 0))
  total = lax.reduce_window(x, 0.0, lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pad)
  count = lax.reduce_window(jnp.ones(x.shape[1:3], x.dtype), 0.0, lax.add, (3, 3), (1, 1),
                            pad[1:3])
  return total / count[None, :, :, None]


def max_pool(x, stride, padding):
  """3x3 max pool; padded positions are -inf and never win."""
  pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
  return lax.reduce_window(x, -jnp.inf, lax.max, (1, 3, 3, 1), (1, stride, stride, 1), pad)


class InceptionA(nnx.Module):
  """Mixed_5b/5c/5d."""

  def __init__(self, cin, pool_features, *, rngs):
    self.branch1x1 = BasicConv2d(cin, 64, 1, rngs=rngs)
    self.branch5x5_1 = BasicConv2d(cin, 48, 1, rngs=rngs)
    self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=(2, 2), rngs=rngs)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=(1, 1), rngs=rngs)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=(1, 1), rngs=rngs)
    self.branch_pool = BasicConv2d(cin, pool_features, 1, rngs=rngs)

  def __call__(self, x):
    return jnp.concatenate([
        self.branch1x1(x),
        self.branch5x5_2(self.branch5x5_1(x)),
        self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
        self.branch_pool(avg_pool_exclude_pad(x)),
    ], axis=-1)


class InceptionB(nnx.Module):
  """Mixed_6a: 35x35 -> 17x17."""

  def __init__(self, cin, *, rngs):
    self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2, rngs=rngs)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=(1, 1), rngs=rngs)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2, rngs=rngs)

  def __call__(self, x):
    return jnp.concatenate([
        self.branch3x3(x),
        self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
        max_pool(x, 2, 0),
    ], axis=-1)


class InceptionC(nnx.Module):
  """Mixed_6b..6e, with channels_7x7 = c7."""

  def __init__(self, cin, c7, *, rngs):
    row, col = dict(padding=(0, 3)), dict(padding=(3, 0))  # 1x7 and 7x1, 'same'
    self.branch1x1 = BasicConv2d(cin, 192, 1, rngs=rngs)
    self.branch7x7_1 = BasicConv2d(cin, c7, 1, rngs=rngs)
    self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), **row, rngs=rngs)
    self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), **col, rngs=rngs)
    self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1, rngs=rngs)
    self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), **col, rngs=rngs)
    self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), **row, rngs=rngs)
    self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), **col, rngs=rngs)
    self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), **row, rngs=rngs)
    self.branch_pool = BasicConv2d(cin, 192, 1, rngs=rngs)

  def branches(self, x):
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    bd = self.branch7x7dbl_1(x)
    for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                 self.branch7x7dbl_5):
      bd = conv(bd)
    return [self.branch1x1(x), b7, bd, self.branch_pool(avg_pool_exclude_pad(x))]

  def __call__(self, x):
    return jnp.concatenate(self.branches(x), axis=-1)


class InceptionD(nnx.Module):
  """Mixed_7a: 17x17 -> 8x8."""

  def __init__(self, cin, *, rngs):
    self.branch3x3_1 = BasicConv2d(cin, 192, 1, rngs=rngs)
    self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2, rngs=rngs)
    self.branch7x7x3_1 = BasicConv2d(cin, 192, 1, rngs=rngs)
    self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2, rngs=rngs)

  def __call__(self, x):
    b7 = self.branch7x7x3_1(x)
    for conv in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
      b7 = conv(b7)
    return jnp.concatenate(
        [self.branch3x3_2(self.branch3x3_1(x)), b7, max_pool(x, 2, 0)], axis=-1)


class InceptionE(nnx.Module):
  """Mixed_7b (average branch pool) and Mixed_7c (max branch pool, pytorch-fid's
  FIDInceptionE_2: "likely an error in this specific Inception implementation")."""

  def __init__(self, cin, *, max_pool_branch, rngs):
    self.max_pool_branch = max_pool_branch
    self.branch1x1 = BasicConv2d(cin, 320, 1, rngs=rngs)
    self.branch3x3_1 = BasicConv2d(cin, 384, 1, rngs=rngs)
    self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
    self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
    self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=(1, 1), rngs=rngs)
    self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
    self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
    self.branch_pool = BasicConv2d(cin, 192, 1, rngs=rngs)

  def __call__(self, x):
    b3 = self.branch3x3_1(x)
    bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    pool = max_pool(x, 1, 1) if self.max_pool_branch else avg_pool_exclude_pad(x)
    return jnp.concatenate([
        self.branch1x1(x),
        self.branch3x3_2a(b3), self.branch3x3_2b(b3),
        self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd),
        self.branch_pool(pool),
    ], axis=-1)


class InceptionV3(nnx.Module):
  """Maps preprocessed images [N, 299, 299, 3] (see `preprocess`) to
  {"pool": pool_3 [N, 2048], "spatial": sFID features [N, 2023], "logits": [N, 1008]}.

  "logits" are pool_3 @ fc.kernel without the fc bias, what the ADM evaluator feeds its
  Inception Score softmax (ADM evaluator.py); the loader drops `fc.bias`.
  """

  def __init__(self, *, rngs: nnx.Rngs):
    self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2, rngs=rngs)
    self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, rngs=rngs)
    self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=(1, 1), rngs=rngs)
    self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1, rngs=rngs)
    self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, rngs=rngs)
    self.Mixed_5b = InceptionA(192, 32, rngs=rngs)
    self.Mixed_5c = InceptionA(256, 64, rngs=rngs)
    self.Mixed_5d = InceptionA(288, 64, rngs=rngs)
    self.Mixed_6a = InceptionB(288, rngs=rngs)
    self.Mixed_6b = InceptionC(768, 128, rngs=rngs)
    self.Mixed_6c = InceptionC(768, 160, rngs=rngs)
    self.Mixed_6d = InceptionC(768, 160, rngs=rngs)
    self.Mixed_6e = InceptionC(768, 192, rngs=rngs)
    self.Mixed_7a = InceptionD(768, rngs=rngs)
    self.Mixed_7b = InceptionE(1280, max_pool_branch=False, rngs=rngs)
    self.Mixed_7c = InceptionE(2048, max_pool_branch=True, rngs=rngs)
    self.fc = nnx.Linear(POOL_DIM, NUM_CLASSES, use_bias=False, precision=HIGHEST, rngs=rngs)

  def __call__(self, x):
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = max_pool(x, 2, 0)
    x = max_pool(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 2, 0)
    x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))
    x = self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))
    branches = self.Mixed_6d.branches(x)
    # The sFID features are the branch1x1 output of Mixed_6d (TF `mixed_6/conv`), first 7
    # channels sliced in NHWC and flattened in (h, w, c) order (ADM evaluator.py).
    spatial = branches[0][..., :7].reshape(x.shape[0], -1)
    x = self.Mixed_7a(self.Mixed_6e(jnp.concatenate(branches, axis=-1)))
    x = self.Mixed_7c(self.Mixed_7b(x))
    pool = x.mean(axis=(1, 2))
    return {"pool": pool, "spatial": spatial, "logits": self.fc(pool)}


def _source_coords(in_size, out_size, half_pixel):
  """Per output index: the two source indices and the float32 weight of the second.

  TF1 (half_pixel False): src = dst * in / out (TF's LegacyScaler, float32).
  PyTorch (half_pixel True): src = max((dst + 0.5) * in / out - 0.5, 0).
  Both: lo = floor(src), hi = min(lo + 1, in - 1), frac = src - lo.
  """
  scale = np.float32(in_size) / np.float32(out_size)
  dst = np.arange(out_size, dtype=np.float32)
  src = np.maximum((dst + 0.5) * scale - 0.5, 0) if half_pixel else dst * scale
  lo = np.floor(src).astype(np.int32)
  hi = np.minimum(lo + 1, in_size - 1)
  return lo, hi, (src - lo).astype(np.float32)


def _resize_axis(x, axis, out_size, half_pixel):
  lo, hi, frac = _source_coords(x.shape[axis], out_size, half_pixel)
  shape = [1] * x.ndim
  shape[axis] = out_size
  frac = jnp.asarray(frac).reshape(shape)
  a, b = jnp.take(x, lo, axis=axis), jnp.take(x, hi, axis=axis)
  if half_pixel:  # PyTorch's upsample_bilinear2d: weighted sum
    return a * (1 - frac) + b * frac
  return a + (b - a) * frac  # TF1 ResizeBilinear's compute_lerp


def resize_bilinear(x, size, *, half_pixel):
  """Bilinear resize of float NHWC to size x size, no antialiasing. The TF1 form (width then
  height lerp) reproduces ResizeBilinear(align_corners=False, half_pixel_centers=False)."""
  x = _resize_axis(x, 2, size, half_pixel)
  return _resize_axis(x, 1, size, half_pixel)


def preprocess(images, mode="adm"):
  """uint8 NHWC [N, H, W, 3] -> float32 [N, 299, 299, 3], the network's input."""
  if mode not in MODES:
    raise TesseraxError(f"unknown Inception preprocessing mode {mode!r}; choose from {MODES}")
  if images.dtype != jnp.uint8 or images.ndim != 4 or images.shape[-1] != 3:
    raise TesseraxError(
        f"Inception input must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
  x = images.astype(jnp.float32)
  if mode == "adm":
    return (resize_bilinear(x, RESOLUTION, half_pixel=False) - 128.0) / 128.0
  return 2.0 * resize_bilinear(x / 255.0, RESOLUTION, half_pixel=True) - 1.0


def _matmul_flops(jaxpr):
  """2 x multiply-adds of every convolution and dot product in a jaxpr (recursively)."""
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "conv_general_dilated":
      lhs, rhs = (v.aval.shape for v in eqn.invars)
      dn = eqn.params["dimension_numbers"]
      out = eqn.outvars[0].aval.shape
      window = np.prod([rhs[d] for d in dn.rhs_spec[2:]])
      total += 2 * np.prod(out) * window * rhs[dn.rhs_spec[1]]
    elif eqn.primitive.name == "dot_general":
      (lhs_contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2 * np.prod(eqn.outvars[0].aval.shape) * np.prod([lhs[d] for d in lhs_contract])
    for sub in jex_core.jaxprs_in_params(eqn.params):
      total += _matmul_flops(sub)
  return int(total)


@functools.cache
def inception_flops() -> int:
  """FLOPs (2 x multiply-adds) of the network on one 299x299 image: all 94 convolutions and
  the 2048x1008 head, counted from the traced shapes. BatchNorm, ReLU, pooling and the
  resize are elementwise and left out (well under 1% of the total)."""
  abstract = nnx.eval_shape(lambda: InceptionV3(rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  x = jax.ShapeDtypeStruct((1, RESOLUTION, RESOLUTION, 3), jnp.float32)
  jaxpr = jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)
  return _matmul_flops(jaxpr.jaxpr)
