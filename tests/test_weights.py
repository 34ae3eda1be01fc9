"""Tests of backbones/weights.py (registry, fetch, readers, key maps, cache) and of the DINOv2
and LPIPS backbones it loads.

Every file is written here in the official layout: the official key names and shapes
(eval.md appendix and §5.4, facebookresearch/dinov2's ViT-L/14 state dict) with random
values, as .npz or .safetensors (the safetensors layout written by hand; tensors that only
need their shape are left as sparse zeros). Oracles: the written values themselves, float64
NumPy forward passes written from the documented architectures, and PIL's own bicubic resize.
"""
import hashlib
import io
import json
import struct
import sys
import urllib.error

import jax
import numpy as np
import pytest
import scipy.special
from flax import nnx
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image

from test_inception import official_shapes
from tesserax.backbones import dinov2, vgg_lpips, weights
from tesserax.core.errors import TesseraxError

# ------------------------------------------------------------------------------- helpers

_DTYPES = {np.dtype("<f4"): "F32", np.dtype("<f2"): "F16", np.dtype("<f8"): "F64",
           np.dtype("<i8"): "I64"}


def write_safetensors(path, arrays, zeros=None):
  """The safetensors layout (u64 header size, JSON header, data); `zeros` {key: shape} are
  float32 zeros left as a hole in a sparse file, so full-size files cost nothing."""
  entries = [(k, v.dtype, v.shape) for k, v in arrays.items()]
  entries += [(k, np.dtype("<f4"), s) for k, s in (zeros or {}).items()]
  header, offset = {"__metadata__": {"format": "pt"}}, 0
  for key, dtype, shape in entries:
    size = int(np.prod(shape)) * dtype.itemsize
    header[key] = {"dtype": _DTYPES[dtype], "shape": list(shape),
                   "data_offsets": [offset, offset + size]}
    offset += size
  blob = json.dumps(header).encode()
  blob += b" " * (-len(blob) % 8)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)) + blob)
    for key, value in arrays.items():
      f.seek(8 + len(blob) + header[key]["data_offsets"][0])
      f.write(np.ascontiguousarray(value).tobytes())
    f.truncate(8 + len(blob) + offset)


def ordered(shapes, last):
  """shapes with `last` moved to the end (the key a test breaks)."""
  return {**{k: v for k, v in shapes.items() if k != last}, last: shapes[last]}


# ----------------------------------------------------------------------------- Inception


def test_inception_keys_map_with_transposes(tmp_path):
  """All 472 official tensors load; conv OIHW -> HWIO, fc [out, in] -> [in, out], BN vectors
  as they are; fc.bias is consumed and dropped, num_batches_tracked accepted."""
  rng = np.random.RandomState(0)
  shapes = official_shapes()
  real = {k: rng.standard_normal(shapes[k]).astype(np.float32)
          for k in ("Mixed_6d.branch7x7_2.conv.weight", "fc.weight", "Conv2d_1a_3x3.bn.running_var",
                    "Mixed_7c.branch_pool.bn.weight")}
  real["Conv2d_1a_3x3.bn.num_batches_tracked"] = np.array(7, np.int64)
  path = tmp_path / "pt_inception.safetensors"
  write_safetensors(path, real, {k: s for k, s in shapes.items() if k not in real})
  params = weights.inception_params(path)
  assert len(params) == 94 * 5 + 1 and "fc.bias" not in params
  np.testing.assert_array_equal(params["Mixed_6d.branch7x7_2.conv.kernel"],
                                real["Mixed_6d.branch7x7_2.conv.weight"].transpose(2, 3, 1, 0))
  assert params["Mixed_6d.branch7x7_2.conv.kernel"].shape == (1, 7, 160, 160)
  np.testing.assert_array_equal(params["fc.kernel"], real["fc.weight"].T)
  np.testing.assert_array_equal(params["Conv2d_1a_3x3.bn.var"],
                                real["Conv2d_1a_3x3.bn.running_var"])
  np.testing.assert_array_equal(params["Mixed_7c.branch_pool.bn.scale"],
                                real["Mixed_7c.branch_pool.bn.weight"])
  model = weights.with_params(weights.FACTORIES["inception"], params)
  np.testing.assert_array_equal(model.fc.kernel[...], real["fc.weight"].T)


@pytest.mark.parametrize("change, message", [
    ("missing", "missing key 'Mixed_6d.branch1x1.bn.running_var'"),
    ("extra", "unexpected key 'Mixed_6d.branch1x1.extra.weight'"),
    ("misshapen", r"key 'Mixed_5b.branch5x5_2.conv.weight' has shape \(64, 48, 3, 3\), "
                  r"expected \(64, 48, 5, 5\)"),
    ("no_fc_bias", "missing key 'fc.bias'"),
])
def test_inception_file_with_a_bad_key_is_refused(tmp_path, change, message):
  shapes = official_shapes()
  if change == "missing":
    del shapes["Mixed_6d.branch1x1.bn.running_var"]
  elif change == "extra":
    shapes["Mixed_6d.branch1x1.extra.weight"] = (3,)
  elif change == "misshapen":
    shapes["Mixed_5b.branch5x5_2.conv.weight"] = (64, 48, 3, 3)
  else:
    del shapes["fc.bias"]
  path = tmp_path / "bad.safetensors"
  write_safetensors(path, {}, shapes)
  with pytest.raises(TesseraxError, match=message):
    weights.inception_params(path)


# -------------------------------------------------------------------------------- DINOv2


def dinov2_shapes(width=1024, depth=24, patch=14, grid=37):
  """facebookresearch/dinov2 dinov2_vitl14_pretrain.pth (vit_large, img_size 518, patch 14,
  LayerScale, MLP FFN, block_chunks 0), at other sizes for small tests."""
  shapes = {"cls_token": (1, 1, width), "pos_embed": (1, 1 + grid * grid, width),
            "mask_token": (1, width), "patch_embed.proj.weight": (width, 3, patch, patch),
            "patch_embed.proj.bias": (width,)}
  for i in range(depth):
    b = f"blocks.{i}"
    shapes.update({
        f"{b}.norm1.weight": (width,), f"{b}.norm1.bias": (width,),
        f"{b}.attn.qkv.weight": (3 * width, width), f"{b}.attn.qkv.bias": (3 * width,),
        f"{b}.attn.proj.weight": (width, width), f"{b}.attn.proj.bias": (width,),
        f"{b}.ls1.gamma": (width,), f"{b}.norm2.weight": (width,), f"{b}.norm2.bias": (width,),
        f"{b}.mlp.fc1.weight": (4 * width, width), f"{b}.mlp.fc1.bias": (4 * width,),
        f"{b}.mlp.fc2.weight": (width, 4 * width), f"{b}.mlp.fc2.bias": (width,),
        f"{b}.ls2.gamma": (width,)})
  shapes.update({"norm.weight": (width,), "norm.bias": (width,)})
  return shapes


def test_full_size_vitl14_key_table_is_accepted_up_to_the_broken_key(tmp_path):
  """A full-size ViT-L/14 file (sparse zeros, ~304M parameters) whose last key is misshapen:
  the refusal names that key, so every other official name and shape was accepted."""
  shapes = dinov2_shapes()
  assert len(shapes) == 7 + 24 * 14
  shapes = ordered(shapes, "norm.bias")
  shapes["norm.bias"] = (1023,)
  path = tmp_path / "dinov2_vitl14_pretrain.safetensors"
  write_safetensors(path, {}, shapes)
  with pytest.raises(TesseraxError, match=r"key 'norm.bias' has shape \(1023,\)"):
    weights.dinov2_params(path)
  del shapes["mask_token"]
  write_safetensors(path, {}, shapes)
  with pytest.raises(TesseraxError, match="missing key 'mask_token'"):
    weights.dinov2_params(path)


SMALL = dict(width=32, depth=2, heads=4, grid=3)


@pytest.fixture(scope="session")
def small_dinov2(tmp_path_factory):
  """A small DINOv2 (official key names) loaded from an .npz, and its state dict."""
  rng = np.random.RandomState(1)
  state = {}
  for key, shape in dinov2_shapes(SMALL["width"], SMALL["depth"], grid=SMALL["grid"]).items():
    scale = 1.0 if key.endswith(("norm1.weight", "norm2.weight", "norm.weight")) else 0.0
    fan_in = shape[-1] if key.endswith("weight") and len(shape) == 2 else 1
    state[key] = (scale + rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)
  path = tmp_path_factory.mktemp("dinov2") / "small.npz"
  np.savez(path, **state)
  params = weights.dinov2_params(path, **SMALL)
  return state, weights.with_params(lambda: dinov2.DinoV2(rngs=nnx.Rngs(0), **SMALL), params)


def torch_bicubic_weights(n_in, n_out, scale_factor):
  """upsample_bicubic2d (align_corners=False, explicit scale_factor) along one axis, by
  loops: real = (1 / sf) * (i + 0.5) - 0.5 in float32, taps floor(real) - 1 .. + 2 clamped,
  Keys cubic convolution with A = -0.75."""
  a = -0.75
  w = np.zeros((n_out, n_in))
  scale = np.float32(1.0 / scale_factor)
  for i in range(n_out):
    real = np.float32(scale * np.float32(i + 0.5) - np.float32(0.5))
    base = int(np.floor(real))
    t = float(real - base)
    for k, d in enumerate((1 + t, t, 1 - t, 2 - t)):
      if d <= 1:
        c = ((a + 2) * d - (a + 3)) * d * d + 1
      else:
        c = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
      w[i, min(max(base - 1 + k, 0), n_in - 1)] += c
  return w


def test_bicubic_position_interpolation():
  """37 -> 16 at scale (16 + 0.1) / 37 matches the loop oracle; rows sum to 1; scale 1 is
  the identity."""
  m = dinov2.bicubic_matrix(37, 16, 16.1 / 37)
  np.testing.assert_allclose(m, torch_bicubic_weights(37, 16, 16.1 / 37), atol=1e-6)
  np.testing.assert_allclose(m.sum(axis=1), 1, atol=1e-6)
  np.testing.assert_allclose(dinov2.bicubic_matrix(5, 5, 1.0), np.eye(5), atol=1e-7)


def np_layer_norm(x, w, b):
  mu = x.mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 1e-6) * w + b


def np_dinov2(sd, x, heads):
  """DinoVisionTransformer.forward (eval): patch conv, CLS, interpolated pos_embed, pre-norm
  LayerScale blocks, final norm, CLS token; float64. x [H, W, 3]."""
  sd = {k: v.astype(np.float64) for k, v in sd.items()}
  width, _, p, _ = sd["patch_embed.proj.weight"].shape
  g = x.shape[0] // p
  patches = x.reshape(g, p, g, p, 3).transpose(0, 2, 4, 1, 3).reshape(g * g, -1)
  kernel = sd["patch_embed.proj.weight"].reshape(width, -1)
  tokens = patches @ kernel.T + sd["patch_embed.proj.bias"]
  grid = int(np.sqrt(sd["pos_embed"].shape[1] - 1))
  w = torch_bicubic_weights(grid, g, (g + 0.1) / grid)
  pos = np.einsum("yi,xj,ijd->yxd", w, w, sd["pos_embed"][0, 1:].reshape(grid, grid, width))
  h = np.concatenate([sd["cls_token"][0], tokens]) + np.concatenate(
      [sd["pos_embed"][0, :1], pos.reshape(g * g, width)])
  hd = width // heads
  for i in range(len([k for k in sd if k.endswith("ls1.gamma")])):
    b = lambda n: sd[f"blocks.{i}.{n}"]  # noqa: E731
    y = np_layer_norm(h, b("norm1.weight"), b("norm1.bias"))
    qkv = (y @ b("attn.qkv.weight").T + b("attn.qkv.bias")).reshape(len(h), 3, heads, hd)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    att = scipy.special.softmax(np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd), axis=-1)
    o = np.einsum("hqk,khd->qhd", att, v).reshape(len(h), width)
    h = h + b("ls1.gamma") * (o @ b("attn.proj.weight").T + b("attn.proj.bias"))
    y = np_layer_norm(h, b("norm2.weight"), b("norm2.bias"))
    y = y @ b("mlp.fc1.weight").T + b("mlp.fc1.bias")
    y = 0.5 * y * (1 + scipy.special.erf(y / np.sqrt(2)))
    h = h + b("ls2.gamma") * (y @ b("mlp.fc2.weight").T + b("mlp.fc2.bias"))
  return np_layer_norm(h, sd["norm.weight"], sd["norm.bias"])[0]


def test_dinov2_forward_matches_float64_numpy(small_dinov2):
  state, model = small_dinov2
  x = np.random.RandomState(2).standard_normal((2, 28, 28, 3)).astype(np.float32)
  got = np.asarray(model(x))
  for i in range(2):
    want = np_dinov2(state, x[i].astype(np.float64), SMALL["heads"])
    np.testing.assert_allclose(got[i], want, rtol=0, atol=2e-5 * np.abs(want).max())


def test_dinov2_preprocessing_is_pil_bicubic_then_imagenet_normalisation():
  """Against PIL itself (dgm-eval's Resize((224, 224), BICUBIC)): equal up to float32 vs
  fixed-point rounding at exact .5 ties. Square inputs and this upsampling case take the
  width pass first in every Pillow; recent Pillow reorders the passes for some strongly
  non-square downscales, which is not reproduced."""
  rng = np.random.RandomState(3)
  for h, w in ((256, 256), (512, 512), (64, 80)):
    images = rng.randint(0, 256, (2, h, w, 3)).astype(np.uint8)
    got = np.asarray(jax.jit(dinov2.preprocess)(images))
    assert got.shape == (2, 224, 224, 3)
    as_uint8 = np.round((got * dinov2.IMAGENET_STD + dinov2.IMAGENET_MEAN) * 255)
    pil = np.stack([np.asarray(Image.fromarray(im).resize((224, 224), Image.BICUBIC))
                    for im in images])
    diff = np.abs(as_uint8 - pil)
    assert diff.max() <= 1 and np.mean(diff) < 1e-3, (h, w, diff.max(), np.mean(diff))


# --------------------------------------------------------------------------------- LPIPS


def vgg16_shapes():
  """torchvision vgg16-397923af.pth: features.{i} convs and the classifier."""
  shapes, cin = {}, 3
  for index, cout in zip((0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28),
                         (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)):
    shapes[f"features.{index}.weight"] = (cout, cin, 3, 3)
    shapes[f"features.{index}.bias"] = (cout,)
    cin = cout
  shapes.update({"classifier.0.weight": (4096, 25088), "classifier.0.bias": (4096,),
                 "classifier.3.weight": (4096, 4096), "classifier.3.bias": (4096,),
                 "classifier.6.weight": (1000, 4096), "classifier.6.bias": (1000,)})
  return shapes


LIN_SHAPES = {f"lin{k}.model.1.weight": (1, c, 1, 1)
              for k, c in enumerate((64, 128, 256, 512, 512))}


@pytest.fixture(scope="session")
def lpips_files(tmp_path_factory):
  """(directory, vgg16 state, lin state): the official pair under their stems, as
  .safetensors (classifier left sparse) and .npz."""
  rng = np.random.RandomState(4)
  directory = tmp_path_factory.mktemp("cache")
  vgg = {}
  for key, shape in vgg16_shapes().items():
    if key.startswith("features"):
      std = np.sqrt(2.0 / np.prod(shape[1:])) if len(shape) == 4 else 0.1
      vgg[key] = (std * rng.standard_normal(shape)).astype(np.float32)
  lins = {k: rng.uniform(0, 1, s).astype(np.float32) for k, s in LIN_SHAPES.items()}
  classifier = {k: s for k, s in vgg16_shapes().items() if k.startswith("classifier")}
  write_safetensors(directory / "vgg16-397923af.safetensors", vgg, classifier)
  np.savez(directory / "vgg.npz", **lins)
  return directory, vgg, lins


def np_lpips(vgg, lins, x0, x1):
  """lpips.LPIPS(net='vgg', version='0.1') on float64 images [H, W, 3] in [-1, 1]."""
  shift, scale = np.array([-.030, -.088, -.188]), np.array([.458, .448, .450])

  def taps(x):
    x, out = (x - shift) / scale, []
    for index in (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28):
      if index in (5, 10, 17, 24):
        h, w = x.shape[0] // 2 * 2, x.shape[1] // 2 * 2
        x = x[:h, :w].reshape(h // 2, 2, w // 2, 2, -1).max(axis=(1, 3))
      w = vgg[f"features.{index}.weight"].astype(np.float64)
      cols = sliding_window_view(np.pad(x, ((1, 1), (1, 1), (0, 0))), (3, 3), axis=(0, 1))
      x = cols.reshape(-1, w[0].size) @ w.reshape(len(w), -1).T
      x = np.maximum(x.reshape(cols.shape[0], cols.shape[1], -1)
                     + vgg[f"features.{index}.bias"], 0)
      if index in (2, 7, 14, 21, 28):  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
        out.append(x / (np.sqrt((x ** 2).sum(-1, keepdims=True)) + 1e-10))
    return out

  return sum(((a - b) ** 2 @ lins[f"lin{k}.model.1.weight"].reshape(-1)).mean()
             for k, (a, b) in enumerate(zip(taps(x0), taps(x1))))


def test_lpips_loads_from_the_cache_and_matches_numpy(lpips_files, monkeypatch):
  directory, vgg, lins = lpips_files
  monkeypatch.setenv("TESSERAX_CACHE", str(directory))
  model = weights.load("lpips_vgg")
  assert (directory / "lpips_vgg.flax.npz").exists()
  again = weights.load("lpips_vgg")  # from the converted cache file
  np.testing.assert_array_equal(again.lins[2].kernel[...], model.lins[2].kernel[...])
  rng = np.random.RandomState(5)
  x0, x1 = rng.uniform(-1, 1, (2, 2, 36, 40, 3)).astype(np.float32)
  got = np.asarray(jax.jit(lambda m, a, b: m(a, b))(model, x0, x1))
  for i in range(2):
    want = np_lpips(vgg, lins, x0[i].astype(np.float64), x1[i].astype(np.float64))
    np.testing.assert_allclose(got[i], want, rtol=1e-5)


def test_lpips_vgg16_without_classifier_is_refused(lpips_files, tmp_path):
  directory, vgg, _ = lpips_files
  shapes = {k: s for k, s in vgg16_shapes().items() if k != "classifier.6.bias"}
  write_safetensors(tmp_path / "vgg16.safetensors", {}, shapes)
  with pytest.raises(TesseraxError, match="missing key 'classifier.6.bias'"):
    weights.lpips_vgg_params(tmp_path / "vgg16.safetensors", directory / "vgg.npz")
  np.savez(tmp_path / "lin.npz", **{k: np.zeros(s, np.float32) for k, s in LIN_SHAPES.items()
                                    if k != "lin4.model.1.weight"})
  write_safetensors(tmp_path / "vgg16.safetensors", {}, vgg16_shapes())
  with pytest.raises(TesseraxError, match="missing key 'lin4.model.1.weight'"):
    weights.lpips_vgg_params(tmp_path / "vgg16.safetensors", tmp_path / "lin.npz")


def test_stale_cache_file_is_refused_naming_the_parameter(tmp_path, monkeypatch):
  np.savez(tmp_path / "lpips_vgg.flax.npz", **{"convs.0.kernel": np.zeros((3, 3, 3, 64))})
  with pytest.raises(TesseraxError, match="parameter 'convs.0.bias' is missing"):
    weights.load("lpips_vgg", tmp_path)


# ------------------------------------------------------------------------- fetch and load


def test_load_without_files_says_which_file_to_put_where(tmp_path, monkeypatch):
  monkeypatch.setenv("TESSERAX_CACHE", str(tmp_path))
  with pytest.raises(TesseraxError) as e:
    weights.load("inception")
  message = str(e.value)
  assert "\n" not in message
  assert weights.REGISTRY["inception"][0].url in message
  assert str(tmp_path / "pt_inception-2015-12-05-6726825d.pth") in message
  assert "tesserax weights fetch inception" in message
  with pytest.raises(TesseraxError, match="unknown weights 'inceptionv3'"):
    weights.load("inceptionv3")


def test_fetch_offline_fails_with_the_same_instruction(tmp_path, monkeypatch):
  def offline(*args, **kwargs):
    raise urllib.error.URLError("no network")

  monkeypatch.setattr(weights.urllib.request, "urlopen", offline)
  with pytest.raises(TesseraxError) as e:
    weights.fetch("lpips_vgg", tmp_path)
  message = str(e.value)
  assert "\n" not in message and "no network" in message
  assert f"put it at {tmp_path / 'vgg16-397923af.pth'}" in message
  assert "https://download.pytorch.org/models/vgg16-397923af.pth" in message
  assert not list(tmp_path.iterdir())


def test_fetch_checks_sha256(tmp_path, monkeypatch):
  payload = b"official bytes"
  calls = []

  def serve(url, timeout):
    calls.append(url)
    return io.BytesIO(payload)

  monkeypatch.setattr(weights.urllib.request, "urlopen", serve)
  entry = weights.WeightFile("w.pth", "https://example.org/w.pth", "0" * 64)
  monkeypatch.setitem(weights.REGISTRY, "test", (entry,))
  with pytest.raises(TesseraxError, match="does not match the published 0000"):
    weights.fetch("test", tmp_path)
  assert not list(tmp_path.iterdir())  # the bad download is not kept
  good = entry._replace(sha256=hashlib.sha256(payload).hexdigest())
  monkeypatch.setitem(weights.REGISTRY, "test", (good,))
  assert weights.fetch("test", tmp_path) == [tmp_path / "w.pth"]
  assert (tmp_path / "w.pth").read_bytes() == payload
  weights.fetch("test", tmp_path)  # present with the right checksum: no second download
  assert len(calls) == 2


def test_tokenizer_files_are_fetched_from_their_official_addresses(tmp_path, monkeypatch):
  """The released tokenizers land where `tesserax convert --src` expects them; the two SD-VAE
  files of the same name in their own folders."""
  served = []

  def serve(url, timeout):
    served.append(url)
    return io.BytesIO(url.encode())

  monkeypatch.setattr(weights.urllib.request, "urlopen", serve)
  hub = "https://huggingface.co/"
  paths = weights.fetch("vavae_f16d32", tmp_path)
  assert paths == [tmp_path / "vavae-imagenet256-f16d32-dinov2.pt",
                   tmp_path / "latents_stats.pt"]
  assert served == [hub + "hustvl/vavae-imagenet256-f16d32-dinov2/resolve/main/"
                    "vavae-imagenet256-f16d32-dinov2.pt",
                    hub + "hustvl/vavae-imagenet256-f16d32-dinov2/resolve/main/latents_stats.pt"]
  for name in ("sd_vae_ft_ema", "sd_vae_ft_mse"):
    repo = name.replace("_", "-")
    (path,) = weights.fetch(name, tmp_path)
    assert path == tmp_path / repo / "diffusion_pytorch_model.safetensors"
    assert path.read_bytes() == (f"{hub}stabilityai/{repo}/resolve/main/"
                                 "diffusion_pytorch_model.safetensors").encode()


# ------------------------------------------------------------------------------- readers


def test_pth_without_torch_is_a_clear_error(tmp_path, monkeypatch):
  (tmp_path / "w.pth").write_bytes(b"")
  monkeypatch.setitem(sys.modules, "torch", None)
  with pytest.raises(TesseraxError, match=r"needs PyTorch: pip install 'tesserax\[torch\]'"):
    weights.read_tensors(tmp_path / "w.pth")


def test_pth_with_torch(tmp_path):
  torch = pytest.importorskip("torch")
  torch.save({"a.weight": torch.arange(6.0).reshape(2, 3)}, tmp_path / "w.pth")
  tensors = weights.read_tensors(tmp_path / "w.pth")
  assert tensors.shapes == {"a.weight": (2, 3)}
  np.testing.assert_array_equal(tensors.read("a.weight"), np.arange(6.0).reshape(2, 3))


def test_safetensors_reader_decodes_dtypes_and_checks_offsets(tmp_path):
  x = np.linspace(-2, 2, 12).reshape(3, 4)
  write_safetensors(tmp_path / "a.safetensors", {"f16": x.astype("<f2"), "f64": x,
                                                 "i64": np.arange(5, dtype="<i8")})
  tensors = weights.read_tensors(tmp_path / "a.safetensors")
  np.testing.assert_array_equal(tensors.read("f16"), x.astype(np.float16).astype(np.float32))
  np.testing.assert_array_equal(tensors.read("f64"), x.astype(np.float32))
  np.testing.assert_array_equal(tensors.read("i64"), np.arange(5))
  header = json.dumps({"bf16": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]}}).encode()
  bf16 = (np.array([1.5, -3.0], np.float32).view(np.uint32) >> 16).astype("<u2")
  (tmp_path / "b.safetensors").write_bytes(
      struct.pack("<Q", len(header)) + header + bf16.tobytes())
  np.testing.assert_array_equal(weights.read_tensors(tmp_path / "b.safetensors").read("bf16"),
                                [1.5, -3.0])
  header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}).encode()
  (tmp_path / "c.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(12))
  with pytest.raises(TesseraxError, match="'w' has inconsistent data offsets"):
    weights.read_tensors(tmp_path / "c.safetensors")
  (tmp_path / "d.ckpt").write_bytes(b"")
  with pytest.raises(TesseraxError, match="unsupported weight format '.ckpt'"):
    weights.read_tensors(tmp_path / "d.ckpt")
