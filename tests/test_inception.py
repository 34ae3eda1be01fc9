"""Tests of backbones/inception.py, the FID InceptionV3.

Oracles: the conv shapes and parameter counts of pytorch-fid inception.py's FID InceptionV3,
written out here as the official PyTorch state dict; an independent float64 NumPy forward
pass written from the documented architecture (torchvision BasicConv2d + pytorch-fid's FID
blocks); NumPy transcriptions of TF1 ResizeBilinear and PyTorch's half-pixel bilinear;
constructed inputs for the pooling and BatchNorm quirks.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from numpy.lib.stride_tricks import sliding_window_view

from tesserax.backbones import inception, weights
from tesserax.core.errors import TesseraxError


# ------------------------------------------------ the official state dict (pytorch-fid weights)


def appendix_conv_shapes():
  """{block: [O, I, kh, kw]} for the 94 BasicConv2d blocks of pytorch-fid inception.py."""
  s = {"Conv2d_1a_3x3": (32, 3, 3, 3), "Conv2d_2a_3x3": (32, 32, 3, 3),
       "Conv2d_2b_3x3": (64, 32, 3, 3), "Conv2d_3b_1x1": (80, 64, 1, 1),
       "Conv2d_4a_3x3": (192, 80, 3, 3)}
  for name, cin, pool in (("Mixed_5b", 192, 32), ("Mixed_5c", 256, 64), ("Mixed_5d", 288, 64)):
    s.update({f"{name}.branch1x1": (64, cin, 1, 1), f"{name}.branch5x5_1": (48, cin, 1, 1),
              f"{name}.branch5x5_2": (64, 48, 5, 5), f"{name}.branch3x3dbl_1": (64, cin, 1, 1),
              f"{name}.branch3x3dbl_2": (96, 64, 3, 3), f"{name}.branch3x3dbl_3": (96, 96, 3, 3),
              f"{name}.branch_pool": (pool, cin, 1, 1)})
  s.update({"Mixed_6a.branch3x3": (384, 288, 3, 3), "Mixed_6a.branch3x3dbl_1": (64, 288, 1, 1),
            "Mixed_6a.branch3x3dbl_2": (96, 64, 3, 3), "Mixed_6a.branch3x3dbl_3": (96, 96, 3, 3)})
  for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
    s.update({f"{name}.branch1x1": (192, 768, 1, 1), f"{name}.branch7x7_1": (c7, 768, 1, 1),
              f"{name}.branch7x7_2": (c7, c7, 1, 7), f"{name}.branch7x7_3": (192, c7, 7, 1),
              f"{name}.branch7x7dbl_1": (c7, 768, 1, 1), f"{name}.branch7x7dbl_2": (c7, c7, 7, 1),
              f"{name}.branch7x7dbl_3": (c7, c7, 1, 7), f"{name}.branch7x7dbl_4": (c7, c7, 7, 1),
              f"{name}.branch7x7dbl_5": (192, c7, 1, 7), f"{name}.branch_pool": (192, 768, 1, 1)})
  s.update({"Mixed_7a.branch3x3_1": (192, 768, 1, 1), "Mixed_7a.branch3x3_2": (320, 192, 3, 3),
            "Mixed_7a.branch7x7x3_1": (192, 768, 1, 1), "Mixed_7a.branch7x7x3_2": (192, 192, 1, 7),
            "Mixed_7a.branch7x7x3_3": (192, 192, 7, 1), "Mixed_7a.branch7x7x3_4": (192, 192, 3, 3)})
  for name, cin in (("Mixed_7b", 1280), ("Mixed_7c", 2048)):
    s.update({f"{name}.branch1x1": (320, cin, 1, 1), f"{name}.branch3x3_1": (384, cin, 1, 1),
              f"{name}.branch3x3_2a": (384, 384, 1, 3), f"{name}.branch3x3_2b": (384, 384, 3, 1),
              f"{name}.branch3x3dbl_1": (448, cin, 1, 1),
              f"{name}.branch3x3dbl_2": (384, 448, 3, 3),
              f"{name}.branch3x3dbl_3a": (384, 384, 1, 3),
              f"{name}.branch3x3dbl_3b": (384, 384, 3, 1), f"{name}.branch_pool": (192, cin, 1, 1)})
  return s


def official_shapes():
  """The 472 tensors of pt_inception-2015-12-05-6726825d.pth (pytorch-fid's FID weights)."""
  shapes = {}
  for block, shape in appendix_conv_shapes().items():
    shapes[f"{block}.conv.weight"] = shape
    for leaf in ("weight", "bias", "running_mean", "running_var"):
      shapes[f"{block}.bn.{leaf}"] = (shape[0],)
  shapes["fc.weight"], shapes["fc.bias"] = (1008, 2048), (1008,)
  return shapes


def random_state_dict(seed=0):
  """Official keys and shapes with random values that keep activations O(1): He-scaled conv
  weights and BatchNorm statistics near the identity."""
  rng = np.random.RandomState(seed)
  state = {}
  for key, shape in official_shapes().items():
    if key.endswith("conv.weight"):
      value = rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))
    elif key.endswith(("bn.weight", "running_var")):
      value = rng.uniform(0.5, 1.5, shape)
    elif key == "fc.weight":
      value = rng.standard_normal(shape) / np.sqrt(2048)
    else:
      value = 0.1 * rng.standard_normal(shape)
    state[key] = value.astype(np.float32)
  return state


def test_official_table_matches_the_published_counts():
  """The table written out here has the official counts: 94 BasicConv2d, 472 tensors,
  21,751,136 conv + 68,864 BatchNorm + 2,065,392 fc floats."""
  shapes = official_shapes()
  sizes = {k: int(np.prod(v)) for k, v in shapes.items()}
  assert len(appendix_conv_shapes()) == 94 and len(shapes) == 472
  assert sum(v for k, v in sizes.items() if k.endswith("conv.weight")) == 21_751_136
  assert sum(v for k, v in sizes.items() if ".bn." in k) == 68_864
  assert sizes["fc.weight"] + sizes["fc.bias"] == 2_065_392


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
  """(official state dict, InceptionV3 loaded from it through the .npz loader)."""
  state = random_state_dict()
  path = tmp_path_factory.mktemp("inception") / "pt_inception-2015-12-05-6726825d.npz"
  np.savez(path, **state)
  model = weights.with_params(weights.FACTORIES["inception"], weights.inception_params(path))
  return state, model


# ------------------------------------------------------------- float64 NumPy forward (oracle)


def np_conv(x, w, stride=1, pad=(0, 0)):
  """x [H, W, C], torch weight [O, I, kh, kw], zero padding, no bias; float64."""
  x = np.pad(x, ((pad[0], pad[0]), (pad[1], pad[1]), (0, 0)))
  kh, kw = w.shape[2:]
  cols = sliding_window_view(x, (kh, kw), axis=(0, 1))[::stride, ::stride]
  h, wd = cols.shape[:2]
  return (cols.reshape(h * wd, -1) @ w.reshape(w.shape[0], -1).T).reshape(h, wd, -1)


def np_avg_pool_no_pad_count(x):
  """3x3/1 average over the real pixels of each window (count_include_pad=False)."""
  padded = np.pad(x, ((1, 1), (1, 1), (0, 0)))
  total = sliding_window_view(padded, (3, 3), axis=(0, 1)).sum((-1, -2))
  ones = np.pad(np.ones(x.shape[:2]), 1)
  count = sliding_window_view(ones, (3, 3)).sum((-1, -2))
  return total / count[:, :, None]


def np_max_pool(x, stride, pad):
  x = np.pad(x, ((pad, pad), (pad, pad), (0, 0)), constant_values=-np.inf)
  return sliding_window_view(x, (3, 3), axis=(0, 1))[::stride, ::stride].max((-1, -2))


def np_forward(state, x):
  """pytorch-fid's FIDInceptionV3 on one preprocessed image x [299, 299, 3], float64."""
  sd = {k: v.astype(np.float64) for k, v in state.items()}

  def conv(name, x, stride=1, pad=(0, 0)):
    y = np_conv(x, sd[f"{name}.conv.weight"], stride, pad)
    y = (y - sd[f"{name}.bn.running_mean"]) / np.sqrt(sd[f"{name}.bn.running_var"] + 1e-3)
    return np.maximum(y * sd[f"{name}.bn.weight"] + sd[f"{name}.bn.bias"], 0)

  def block_a(n, x):
    return np.concatenate([
        conv(f"{n}.branch1x1", x),
        conv(f"{n}.branch5x5_2", conv(f"{n}.branch5x5_1", x), pad=(2, 2)),
        conv(f"{n}.branch3x3dbl_3", conv(f"{n}.branch3x3dbl_2", conv(f"{n}.branch3x3dbl_1", x),
                                         pad=(1, 1)), pad=(1, 1)),
        conv(f"{n}.branch_pool", np_avg_pool_no_pad_count(x))], axis=-1)

  def block_c(n, x):
    b7 = conv(f"{n}.branch7x7_1", x)
    b7 = conv(f"{n}.branch7x7_3", conv(f"{n}.branch7x7_2", b7, pad=(0, 3)), pad=(3, 0))
    bd = conv(f"{n}.branch7x7dbl_1", x)
    for i, pad in zip(range(2, 6), ((3, 0), (0, 3), (3, 0), (0, 3))):
      bd = conv(f"{n}.branch7x7dbl_{i}", bd, pad=pad)
    return np.concatenate([conv(f"{n}.branch1x1", x), b7, bd,
                           conv(f"{n}.branch_pool", np_avg_pool_no_pad_count(x))], axis=-1)

  def block_e(n, x, pool):
    b3 = conv(f"{n}.branch3x3_1", x)
    bd = conv(f"{n}.branch3x3dbl_2", conv(f"{n}.branch3x3dbl_1", x), pad=(1, 1))
    return np.concatenate([
        conv(f"{n}.branch1x1", x),
        conv(f"{n}.branch3x3_2a", b3, pad=(0, 1)), conv(f"{n}.branch3x3_2b", b3, pad=(1, 0)),
        conv(f"{n}.branch3x3dbl_3a", bd, pad=(0, 1)), conv(f"{n}.branch3x3dbl_3b", bd, pad=(1, 0)),
        conv(f"{n}.branch_pool", pool(x))], axis=-1)

  x = conv("Conv2d_1a_3x3", x, stride=2)
  x = conv("Conv2d_2b_3x3", conv("Conv2d_2a_3x3", x), pad=(1, 1))
  x = np_max_pool(x, 2, 0)
  x = np_max_pool(conv("Conv2d_4a_3x3", conv("Conv2d_3b_1x1", x)), 2, 0)
  for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):
    x = block_a(name, x)
  bd = conv("Mixed_6a.branch3x3dbl_2", conv("Mixed_6a.branch3x3dbl_1", x), pad=(1, 1))
  x = np.concatenate([conv("Mixed_6a.branch3x3", x, stride=2),
                      conv("Mixed_6a.branch3x3dbl_3", bd, stride=2), np_max_pool(x, 2, 0)], -1)
  x = block_c("Mixed_6c", block_c("Mixed_6b", x))
  spatial = conv("Mixed_6d.branch1x1", x)[:, :, :7].reshape(-1)  # NHWC slice, (h, w, c) order
  x = block_c("Mixed_6e", block_c("Mixed_6d", x))
  b3 = conv("Mixed_7a.branch3x3_2", conv("Mixed_7a.branch3x3_1", x), stride=2)
  b7 = conv("Mixed_7a.branch7x7x3_1", x)
  b7 = conv("Mixed_7a.branch7x7x3_3", conv("Mixed_7a.branch7x7x3_2", b7, pad=(0, 3)), pad=(3, 0))
  b7 = conv("Mixed_7a.branch7x7x3_4", b7, stride=2)
  x = np.concatenate([b3, b7, np_max_pool(x, 2, 0)], axis=-1)
  x = block_e("Mixed_7b", x, np_avg_pool_no_pad_count)
  x = block_e("Mixed_7c", x, lambda x: np_max_pool(x, 1, 1))
  pool = x.mean(axis=(0, 1))
  return pool, spatial, pool @ sd["fc.weight"].T  # logits without fc.bias (ADM)


def test_forward_matches_float64_numpy(checkpoint):
  state, model = checkpoint
  x = np.random.RandomState(1).uniform(-1, 1, (2, 299, 299, 3)).astype(np.float32)
  out = jax.jit(lambda m, x: m(x))(model, x)
  assert out["pool"].shape == (2, 2048) and out["spatial"].shape == (2, 2023)
  assert out["logits"].shape == (2, 1008)
  for i in range(2):
    pool, spatial, logits = np_forward(state, x[i].astype(np.float64))
    assert np.abs(pool).max() > 0.1 and np.abs(pool).max() < 100  # a meaningful comparison
    for got, want in ((out["pool"][i], pool), (out["spatial"][i], spatial),
                      (out["logits"][i], logits)):
      np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())


# ----------------------------------------------------------------------------- preprocessing


def tf1_resize(img, size):
  """TF1 ResizeBilinear, align_corners=False, half_pixel_centers=False (resize_bilinear_op.cc):
  in = out * (in_size / out_size) in float32; lower = floor(in), upper = min(ceil(in), in_size
  - 1), lerp = in - lower; top/bottom lerped along x, then along y."""
  img = img.astype(np.float32)

  def weights(in_size):
    scale = np.float32(in_size) / np.float32(size)
    src = np.arange(size, dtype=np.float32) * scale
    lower = np.floor(src).astype(int)
    upper = np.minimum(np.ceil(src).astype(int), in_size - 1)
    return lower, upper, (src - lower).astype(np.float32)

  ylo, yhi, yl = weights(img.shape[0])
  xlo, xhi, xl = weights(img.shape[1])
  out = np.empty((size, size, img.shape[2]), np.float32)
  for y in range(size):
    top_left, top_right = img[ylo[y], xlo], img[ylo[y], xhi]
    bottom_left, bottom_right = img[yhi[y], xlo], img[yhi[y], xhi]
    top = top_left + (top_right - top_left) * xl[:, None]
    bottom = bottom_left + (bottom_right - bottom_left) * xl[:, None]
    out[y] = top + (bottom - top) * yl[y]
  return out


def torch_bilinear(img, size):
  """F.interpolate(mode='bilinear', align_corners=False) (UpSampleBilinear2d): source index
  max(scale * (dst + 0.5) - 0.5, 0) in float32 with scale = float(in / out), second tap
  clamped, weights (1 - l, l); the blend in float64."""
  def weights(in_size):
    scale = np.float32(in_size / size)
    src = np.maximum(scale * (np.arange(size, dtype=np.float32) + np.float32(0.5))
                     - np.float32(0.5), np.float32(0))
    lo = np.floor(src).astype(int)
    return lo, np.minimum(lo + 1, in_size - 1), (src - lo).astype(np.float64)

  ylo, yhi, yl = weights(img.shape[0])
  xlo, xhi, xl = weights(img.shape[1])
  img = img.astype(np.float64)
  rows = img[ylo] * (1 - yl)[:, None, None] + img[yhi] * yl[:, None, None]
  return rows[:, xlo] * (1 - xl)[None, :, None] + rows[:, xhi] * xl[None, :, None]


def test_adm_preprocessing_is_tf1_resize_then_minus128_over128():
  images = np.random.RandomState(2).randint(0, 256, (2, 37, 53, 3)).astype(np.uint8)
  got = np.asarray(jax.jit(inception.preprocess)(images))
  for i in range(2):
    want = (tf1_resize(images[i], 299) - 128.0) / 128.0
    np.testing.assert_allclose(got[i], want, rtol=0, atol=1e-6)


def test_pytorch_fid_preprocessing_is_half_pixel_then_2x_minus_1():
  images = np.random.RandomState(3).randint(0, 256, (1, 256, 200, 3)).astype(np.uint8)
  got = np.asarray(inception.preprocess(images, "pytorch_fid"))
  want = 2 * torch_bilinear(images[0] / 255.0, 299) - 1
  np.testing.assert_allclose(got[0], want, rtol=0, atol=1e-6)


def test_resize_conventions_on_a_constructed_ramp():
  """2 -> 4 pixels: TF1 samples at 0, .5, 1, 1.5 (the last clamped); half-pixel at -.25
  (clamped to 0), .25, .75, 1.25."""
  row = jnp.asarray([[[[0.0], [8.0]]]])  # [1, 1, 2, 1]
  tf1 = inception.resize_bilinear(jnp.tile(row, (1, 2, 1, 1)), 4, half_pixel=False)
  half = inception.resize_bilinear(jnp.tile(row, (1, 2, 1, 1)), 4, half_pixel=True)
  np.testing.assert_array_equal(tf1[0, 0, :, 0], [0, 4, 8, 8])
  np.testing.assert_array_equal(half[0, 0, :, 0], [0, 2, 6, 8])


def test_preprocess_at_299_is_only_normalisation():
  images = np.random.RandomState(4).randint(0, 256, (1, 299, 299, 3)).astype(np.uint8)
  np.testing.assert_array_equal(inception.preprocess(images), (images - 128.0) / 128.0)


def test_preprocess_refuses_non_uint8_and_unknown_mode():
  with pytest.raises(TesseraxError, match="uint8"):
    inception.preprocess(jnp.zeros((1, 8, 8, 3)))
  with pytest.raises(TesseraxError, match="uint8"):
    inception.preprocess(jnp.zeros((1, 8, 8, 1), jnp.uint8))
  with pytest.raises(TesseraxError, match="mode"):
    inception.preprocess(jnp.zeros((1, 8, 8, 3), jnp.uint8), "clean")


# ---------------------------------------------------------------------------------- quirks


def test_branch_average_pool_excludes_padding():
  """On a constant image every output is the constant (a padded-zero count would give 4/9 at
  corners and 6/9 on edges); on a ramp the corner is the mean of its 4 real pixels."""
  ones = jnp.ones((1, 5, 6, 2))
  np.testing.assert_allclose(inception.avg_pool_exclude_pad(ones), ones, rtol=1e-7)
  ramp = jnp.arange(9.0).reshape(1, 3, 3, 1)
  out = inception.avg_pool_exclude_pad(ramp)[0, :, :, 0]
  np.testing.assert_allclose(out[0, 0], (0 + 1 + 3 + 4) / 4, rtol=1e-7)
  np.testing.assert_allclose(out[1, 1], 4.0, rtol=1e-7)
  np.testing.assert_allclose(out[0, 1], (0 + 1 + 2 + 3 + 4 + 5) / 6, rtol=1e-7)


def test_mixed_7c_branch_pool_is_a_max_pool_with_minus_inf_padding():
  """Mixed_7c pools with a 3x3/1 max (padding never wins, even on all-negative input);
  Mixed_7b averages."""
  abstract = nnx.eval_shape(lambda: inception.InceptionV3(rngs=nnx.Rngs(0)))
  assert abstract.Mixed_7c.max_pool_branch and not abstract.Mixed_7b.max_pool_branch
  x = -1.0 - jnp.arange(12.0).reshape(1, 3, 4, 1)
  out = inception.max_pool(x, 1, 1)[0, :, :, 0]
  np.testing.assert_array_equal(out, np_max_pool(np.asarray(x[0]), 1, 1)[:, :, 0])
  assert float(out.max()) == -1.0


def test_batchnorm_uses_eps_1e3_and_running_statistics():
  """A 1x1 identity conv with BN (mean 0.5, var 0, gamma 2, beta 1): relu(2 (x - .5) /
  sqrt(0 + 1e-3) + 1), whatever the batch statistics."""
  layer = inception.BasicConv2d(2, 2, 1, rngs=nnx.Rngs(0))
  layer.conv.kernel[...] = jnp.eye(2).reshape(1, 1, 2, 2)
  layer.bn.mean[...] = jnp.full((2,), 0.5)
  layer.bn.var[...] = jnp.zeros((2,))
  layer.bn.scale[...] = jnp.full((2,), 2.0)
  layer.bn.bias[...] = jnp.ones((2,))
  x = jnp.linspace(0.4, 0.6, 16).reshape(1, 2, 4, 2)
  want = np.maximum(2 * (np.asarray(x) - 0.5) / np.sqrt(1e-3) + 1, 0)
  np.testing.assert_allclose(layer(x), want, rtol=1e-5)


def test_flops_match_the_appendix():
  """2 x MACs over the appendix convolutions at their documented spatial sizes, plus the
  2048 x 1008 head: about 11.5 GFLOPs per 299x299 image."""
  size = {"Conv2d_1a_3x3": 149, "Conv2d_2a_3x3": 147, "Conv2d_2b_3x3": 147,
          "Conv2d_3b_1x1": 73, "Conv2d_4a_3x3": 71, "Mixed_5": 35, "Mixed_6": 17,
          "Mixed_7": 8}
  stride2_from_17 = ("Mixed_7a.branch3x3_2", "Mixed_7a.branch7x7x3_4")
  total = 2 * 2048 * 1008
  for block, (o, i, kh, kw) in appendix_conv_shapes().items():
    if block.startswith("Mixed_6a") and block not in ("Mixed_6a.branch3x3",
                                                      "Mixed_6a.branch3x3dbl_3"):
      hw = 35  # Mixed_6a reads 35x35 maps and only its stride-2 convs output 17x17
    elif block.startswith("Mixed_7a") and block not in stride2_from_17:
      hw = 17
    else:
      hw = size[block] if block in size else size[block[:7]]
    total += 2 * hw * hw * kh * kw * i * o
  assert inception.inception_flops() == total
  assert 11.4e9 < total < 11.6e9
