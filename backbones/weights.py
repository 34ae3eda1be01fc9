"""Official weights of the frozen backbones: registry, fetch, readers, key maps and the cache.

Nothing downloads implicitly (DESIGN.md). `fetch(name)` downloads a registered file from its
official address and checks its sha256; `load(name)` finds the official file(s) in the cache
directory ($TESSERAX_CACHE, else ~/.cache/tesserax), converts them once to `NAME.flax.npz`
there, and returns the backbone with those parameters. A missing file raises one line naming
the file, its address and the path to put it at.

Official files are PyTorch pickles (`.pth`, read with torch, an optional extra, imported only
then); the same tensors under the same key names are also read from `.safetensors` (a reader
of the documented format is below, so the `safetensors` package is not needed) and `.npz`.
Each key map consumes every key of the file exactly once: keys the backbone does not use
are listed and dropped explicitly, and a missing, unexpected or misshapen key is refused
with the key's name.

The readers never run code from a file (`np.load(allow_pickle=False)`,
`torch.load(weights_only=True)`), and a malformed file (truncated, corrupt, text, pickled, a
safetensors header that is not JSON or points past the end) is one TesseraxError naming it.
Files are read through core/files.py's guarded `read_npz` (never unpickling).
"""
import functools
import hashlib
import json
import os
import pathlib
import re
import struct
import urllib.error
import urllib.request
from typing import Callable, NamedTuple, Optional

import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax import traverse_util

from tesserax.backbones import convnext
from tesserax.backbones.dinov2 import DinoV2
from tesserax.backbones.inception import InceptionV3
from tesserax.backbones.vgg_lpips import LPIPS, TORCH_CONV_INDICES
from tesserax.core.errors import TesseraxError
from tesserax.core.files import PICKLED, atomic_output, one_line, read_npz


class WeightFile(NamedTuple):
  filename: str
  url: str
  sha256: Optional[str]  # None where no checksum is published


REGISTRY = {
    # pytorch-fid inception.py: FID_WEIGHTS_URL. The sha256 is the one given for the
    # torch-fidelity copy, which shares the torch-hub prefix 6726825d and is said to be the
    # same file.
    "inception": (WeightFile(
        "pt_inception-2015-12-05-6726825d.pth",
        "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
        "pt_inception-2015-12-05-6726825d.pth",
        "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"),),
    # dinov2 hub/backbones.py: _DINOV2_BASE_URL/{model}/{model}_pretrain.pth; no checksum.
    "dinov2_vitl14": (WeightFile(
        "dinov2_vitl14_pretrain.pth",
        "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth",
        None),),
    # lpips pretrained_networks.py: torchvision's VGG16; v0.1 linear heads (lpips/weights/v0.1).
    "lpips_vgg": (
        WeightFile("vgg16-397923af.pth", "https://download.pytorch.org/models/vgg16-397923af.pth",
                   "397923af8e79cdbb6a7127f12361acd7a2f83e06b05044ddf496e83de57a5bf0"),
        WeightFile("vgg.pth", "https://github.com/richzhang/PerceptualSimilarity/raw/master/"
                   "lpips/weights/v0.1/vgg.pth",
                   "a78928a0af1e5f0fcb1f3b9e8f8c3a2a5a3de244d830ad5c1feddc79b8432868"),
    ),
    # torchvision ConvNeXt_Small_Weights.IMAGENET1K_V1 (TiTok's ConvNeXt-S logit loss); the name
    # carries the first 8 hex digits of its sha256 (torch hub), the full one is not published.
    "convnext_small": (WeightFile(
        "convnext_small-0c510722.pth",
        "https://download.pytorch.org/models/convnext_small-0c510722.pth", None),),
    # Tokenizers (Hugging Face model repos; no checksums published): fetched here, then
    # `tesserax convert --kind vavae-f16d32|sd-vae-ft-ema|sd-vae-ft-mse --src FILE`.
    "vavae_f16d32": (
        WeightFile("vavae-imagenet256-f16d32-dinov2.pt",
                   "https://huggingface.co/hustvl/vavae-imagenet256-f16d32-dinov2/resolve/main/"
                   "vavae-imagenet256-f16d32-dinov2.pt", None),
        WeightFile("latents_stats.pt",
                   "https://huggingface.co/hustvl/vavae-imagenet256-f16d32-dinov2/resolve/main/"
                   "latents_stats.pt", None),
    ),
    "sd_vae_ft_ema": (WeightFile(
        "sd-vae-ft-ema/diffusion_pytorch_model.safetensors",
        "https://huggingface.co/stabilityai/sd-vae-ft-ema/resolve/main/"
        "diffusion_pytorch_model.safetensors", None),),
    "sd_vae_ft_mse": (WeightFile(
        "sd-vae-ft-mse/diffusion_pytorch_model.safetensors",
        "https://huggingface.co/stabilityai/sd-vae-ft-mse/resolve/main/"
        "diffusion_pytorch_model.safetensors", None),),
}

FACTORIES = {
    "inception": lambda: InceptionV3(rngs=nnx.Rngs(0)),
    "dinov2_vitl14": lambda: DinoV2(rngs=nnx.Rngs(0)),
    "lpips_vgg": lambda: LPIPS(rngs=nnx.Rngs(0)),
    "convnext_small": lambda: convnext.ConvNeXt(rngs=nnx.Rngs(0)),
}


def cache_dir() -> pathlib.Path:
  default = pathlib.Path.home() / ".cache" / "tesserax"
  return pathlib.Path(os.environ.get("TESSERAX_CACHE", default))


def _entry(name):
  if name not in REGISTRY:
    raise TesseraxError(f"unknown weights {name!r}; known: {', '.join(REGISTRY)}")
  return REGISTRY[name]


def _place_message(name, files, directory):
  places = "; ".join(
      f"download {f.url} and put it at {pathlib.Path(directory) / f.filename}" for f in files)
  return f"weights {name!r} not found: {places}"


def _sha256(path):
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def fetch(name: str, dest_dir=None) -> list:
  """Downloads the files of `name` from their official addresses into dest_dir (default: the
  cache directory), checking each sha256 where one is published. Files already there with
  the right checksum are kept. Returns the paths."""
  files = _entry(name)
  dest = pathlib.Path(dest_dir) if dest_dir is not None else cache_dir()
  dest.mkdir(parents=True, exist_ok=True)
  paths = []
  for f in files:
    path = dest / f.filename
    path.parent.mkdir(parents=True, exist_ok=True)
    if not (path.exists() and f.sha256 in (None, _sha256(path))):
      tmp = path.with_name(f"{path.name}.part{os.getpid()}")
      try:
        with urllib.request.urlopen(f.url, timeout=60) as response, open(tmp, "wb") as out:
          for chunk in iter(lambda: response.read(1 << 20), b""):
            out.write(chunk)
      except (urllib.error.URLError, OSError) as e:
        tmp.unlink(missing_ok=True)
        raise TesseraxError(
            f"{_place_message(name, [f], dest)} (the download failed: {e})") from None
      got = _sha256(tmp)
      if f.sha256 is not None and got != f.sha256:
        tmp.unlink()
        raise TesseraxError(f"{f.url}: sha256 {got} does not match the published {f.sha256}")
      os.replace(tmp, path)
    paths.append(path)
  return paths


def load(name: str, directory=None) -> nnx.Module:
  """The backbone `name` with its official weights, from the cache directory (default
  cache_dir()): its converted NAME.flax.npz, else the official files (or their .safetensors /
  .npz copies under the same stem), converted once."""
  files = _entry(name)
  directory = pathlib.Path(directory) if directory is not None else cache_dir()
  converted = directory / f"{name}.flax.npz"
  if converted.exists():
    params = read_npz(converted, "converted weights")
  else:
    sources = [_find_source(directory, f.filename) for f in files]
    missing = [f for f, path in zip(files, sources) if path is None]
    if missing:
      raise TesseraxError(f"{_place_message(name, missing, directory)} (or run "
                          f"`tesserax weights fetch {name}`)")
    params = CONVERTERS[name](*sources)
    # Atomic: concurrent processes never read a partial file.
    with atomic_output(converted) as tmp, open(tmp, "wb") as f:
      np.savez(f, **params)
  return with_params(FACTORIES[name], params,
                     source=f"{converted} (stale: delete it to convert the official files again)")


def _find_source(directory, filename):
  """The official file, or the same tensors saved as .safetensors / .npz under its stem (for
  machines without torch); None if there is none."""
  stem = pathlib.Path(filename).stem
  for candidate in (filename, f"{stem}.safetensors", f"{stem}.npz"):
    if (directory / candidate).exists():
      return directory / candidate
  return None


def with_params(factory: Callable[[], nnx.Module], params: dict, source="params"):
  """The module built by `factory` (shape-only, no initialisation) holding `params`, a flat
  {"a.b.kernel": array} dict that must match the module's parameters exactly."""
  graphdef, state = nnx.split(nnx.eval_shape(factory))
  expected = _flat_shapes(state)
  for key in sorted(set(expected) | set(params)):
    if key not in params or key not in expected or tuple(params[key].shape) != expected[key]:
      got = tuple(params[key].shape) if key in params else "missing"
      raise TesseraxError(f"{source}: parameter {key!r} is {got}, expected "
                          f"{expected.get(key, 'no such parameter')}")
    if not np.issubdtype(params[key].dtype, np.floating):
      raise TesseraxError(f"{source}: parameter {key!r} has dtype {params[key].dtype}, "
                          "expected floats")
  pure = traverse_util.unflatten_dict(
      {tuple(k.split(".")): jnp.asarray(v, jnp.float32) for k, v in params.items()})
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(graphdef, state)


def _flat_shapes(state):
  return {".".join(map(str, path)): tuple(v.shape) for path, v in nnx.to_flat_state(state)}


# ----------------------------------------------------------------------------------- readers


class Tensors(NamedTuple):
  """The tensors of one file: shapes known up front, data read on request."""
  path: pathlib.Path
  shapes: dict  # key -> shape tuple
  read: Callable  # key -> float32 np.ndarray


def read_tensors(path) -> Tensors:
  """Reads a state dict from .pth (needs torch), .safetensors or .npz."""
  path = pathlib.Path(path)
  if not path.exists():
    raise TesseraxError(f"weight file {path} does not exist")
  readers = {".pth": _read_pth, ".pt": _read_pth, ".safetensors": _read_safetensors,
             ".npz": _read_npz}
  if path.suffix not in readers:
    raise TesseraxError(f"{path}: unsupported weight format {path.suffix!r}; use "
                        ".pth, .safetensors or .npz")
  return readers[path.suffix](path)


def import_torch(path):
  """The torch module; without it, one line saying how to read or write `path` instead."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise TesseraxError(
        f"{path} needs PyTorch: pip install 'tesserax[torch]', or use .safetensors or .npz "
        "with the same keys") from None
  return torch


def torch_load(path):
  """The content of a PyTorch file, loaded on the CPU with `weights_only=True` (tensors and
  plain containers; nothing in the file runs)."""
  torch = import_torch(path)
  try:
    return torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except  (torch raises many types for this)
    if "Weights only load failed" in str(e):  # an object that only unpickling would build
      what = re.search(r"[^\n.]*unsupported[^\n.]*", str(e), re.IGNORECASE)
      raise TesseraxError(f"{path} {PICKLED}" + (f" ({what[0].strip()})" if what else "")) \
          from None
    raise TesseraxError(f"{path} is not a PyTorch file that torch.load(weights_only=True) "
                        f"reads: truncated, corrupt or another format ({one_line(e)})") from None


def _read_pth(path):
  torch = import_torch(path)
  state = torch_load(path)
  if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
    raise TesseraxError(f"{path} is not a flat state dict of tensors")
  return Tensors(path, {k: tuple(v.shape) for k, v in state.items()},
                 lambda k: state[k].detach().to(torch.float32).numpy())


_SAFETENSORS_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8",
                       "I32": "<i4"}


def _safetensors_header(path, size):
  """(header length N, {key: entry}) of a safetensors file of `size` bytes, checked to be one."""
  if size < 8:
    raise TesseraxError(f"{path}: not a safetensors file ({size} bytes, shorter than the "
                        "8-byte header length)")
  with open(path, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    if n > size - 8:
      raise TesseraxError(f"{path}: not a safetensors file (its header length {n} goes past "
                          f"the end of the {size}-byte file; truncated?)")
    try:
      header = json.loads(f.read(n))
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
      raise TesseraxError(f"{path}: not a safetensors file (its header is not JSON: "
                          f"{one_line(e)})") from None
  if not isinstance(header, dict):
    raise TesseraxError(f"{path}: not a safetensors file (its header is not a JSON object)")
  header.pop("__metadata__", None)
  return n, header


def _read_safetensors(path):
  """The safetensors layout: u64 little-endian header size N, N bytes of JSON
  {key: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": ...}, then the
  data, offsets counted from the end of the header."""
  size = path.stat().st_size
  n, header = _safetensors_header(path, size)
  data = np.memmap(path, np.uint8, "r") if size > 8 + n else np.zeros(0, np.uint8)
  shapes, spans = {}, {}
  for key, info in header.items():
    name, shape, offsets = (info.get(field) if isinstance(info, dict) else None
                            for field in ("dtype", "shape", "data_offsets"))
    if not (isinstance(shape, list) and isinstance(offsets, list) and len(offsets) == 2
            and all(isinstance(v, int) and v >= 0 for v in shape + offsets)):
      raise TesseraxError(f"{path}: tensor {key!r} is not described by dtype, shape and "
                          "data_offsets [begin, end]")
    if name not in _SAFETENSORS_DTYPES:
      raise TesseraxError(f"{path}: tensor {key!r} has unsupported dtype {name}")
    dtype = np.dtype(_SAFETENSORS_DTYPES[name])
    shape, (begin, end) = tuple(shape), offsets
    if end - begin != int(np.prod(shape)) * dtype.itemsize or 8 + n + end > size:
      raise TesseraxError(f"{path}: tensor {key!r} has inconsistent data offsets")
    shapes[key], spans[key] = shape, (8 + n + begin, 8 + n + end, dtype, name)

  def read(key):
    begin, end, dtype, name = spans[key]
    x = np.frombuffer(data[begin:end].tobytes(), dtype).reshape(shapes[key])
    if name == "BF16":  # the top 16 bits of a float32
      return (x.astype(np.uint32) << 16).view(np.float32)
    return x.astype(np.float32)

  return Tensors(path, shapes, read)


def _read_npz(path):
  arrays = read_npz(path, "weight file")
  for key, value in arrays.items():
    if not np.issubdtype(value.dtype, np.number):
      raise TesseraxError(f"{path}: array {key!r} has dtype {value.dtype}, not numbers")
  return Tensors(path, {k: v.shape for k, v in arrays.items()},
                 lambda k: np.asarray(arrays[k], np.float32))


# ------------------------------------------------------------------------------- key maps


def convert(tensors: Tensors, rules: dict, dropped: dict = None, optional: dict = None) -> dict:
  """Flax params {flax_key: array} from a file's tensors.

  rules: {source_key: (flax_key, flax_shape, perm)}, the Flax array being
  source.transpose(perm) (perm None: as is); dropped: {source_key: shape}, keys the file must
  have that the backbone does not use; optional: the same for keys the file may have. Every
  key and shape is checked before any tensor is converted.
  """
  dropped, optional = dropped or {}, optional or {}
  name = tensors.path.name
  for key in tensors.shapes:
    if key not in rules and key not in dropped and key not in optional:
      raise TesseraxError(f"{name}: unexpected key {key!r}")
  for key in list(rules) + list(dropped):
    if key not in tensors.shapes:
      raise TesseraxError(f"{name}: missing key {key!r}")
  for key, shape in tensors.shapes.items():
    if key in rules:
      want = source_shape(*rules[key][1:])
    else:
      want = dropped.get(key, optional.get(key))
    if shape != tuple(want):
      raise TesseraxError(f"{name}: key {key!r} has shape {shape}, expected {tuple(want)}")
  params = {}
  for key, (flax_key, _, perm) in rules.items():
    x = tensors.read(key)
    params[flax_key] = np.ascontiguousarray(x if perm is None else x.transpose(perm))
  return params


def source_shape(flax_shape, perm) -> tuple:
  """The shape of the file's array whose transpose(perm) is a Flax array of `flax_shape`."""
  if perm is None:
    return tuple(flax_shape)
  return tuple(flax_shape[perm.index(i)] for i in range(len(perm)))


def _torch_rule(flax_key, shape):
  """The PyTorch key of a Flax parameter whose module path mirrors the state dict, and the
  permutation taking the torch array to the Flax one (Linear [out, in] -> [in, out], Conv
  OIHW -> HWIO)."""
  *path, leaf = flax_key.split(".")
  leaf, perm = {"kernel": ("weight", {2: (1, 0), 4: (2, 3, 1, 0)}.get(len(shape))),
                "scale": ("weight", None), "mean": ("running_mean", None),
                "var": ("running_var", None)}.get(leaf, (leaf, None))
  return ".".join(path + [leaf]), (flax_key, shape, perm)


@functools.cache
def _expected(factory):
  """{flax_key: shape} of the module `factory` builds."""
  return _flat_shapes(nnx.state(nnx.eval_shape(factory)))


def inception_rules() -> dict:
  """{torch key: (flax key, flax shape, perm)} of pt_inception-2015-12-05 (besides `fc.bias`)."""
  return dict(_torch_rule(k, s) for k, s in _expected(FACTORIES["inception"]).items())


def inception_params(path) -> dict:
  """pt_inception-2015-12-05-6726825d.pth -> InceptionV3 params. `fc.bias` is dropped (the
  ADM Inception Score uses pool3 @ W without it, ADM evaluator.py); BatchNorm
  `num_batches_tracked` counters are dropped if present (torch BatchNorm buffers)."""
  rules = inception_rules()
  optional = {k.replace(".running_mean", ".num_batches_tracked"): ()
              for k in rules if k.endswith(".running_mean")}
  return convert(read_tensors(path), rules, dropped={"fc.bias": (1008,)}, optional=optional)


def dinov2_params(path, **config) -> dict:
  """dinov2_vitl14_pretrain.pth -> DinoV2 params (config: DinoV2's keyword arguments, ViT-L/14
  by default). `mask_token`, used only by masked-image training, is dropped."""
  expected = _expected(lambda: DinoV2(rngs=nnx.Rngs(0), **config))
  rules = dict(_torch_rule(k, s) for k, s in expected.items())
  return convert(read_tensors(path), rules,
                 dropped={"mask_token": (1, expected["cls_token"][-1])})


def lpips_vgg_params(vgg16_path, lin_path) -> dict:
  """torchvision vgg16-397923af.pth + lpips v0.1 vgg.pth -> LPIPS params. LPIPS uses only
  VGG16's `features`; its classifier is dropped."""
  expected = _expected(FACTORIES["lpips_vgg"])
  vgg, lins = {}, {}
  for key, shape in expected.items():
    group, index, leaf = key.split(".")
    if group == "convs":
      torch_key = f"features.{TORCH_CONV_INDICES[int(index)]}.{leaf.replace('kernel', 'weight')}"
      vgg[torch_key] = (key, shape, (2, 3, 1, 0) if leaf == "kernel" else None)
    else:
      lins[f"lin{index}.model.1.weight"] = (key, shape, (2, 3, 1, 0))
  classifier = {"classifier.0.weight": (4096, 25088), "classifier.0.bias": (4096,),
                "classifier.3.weight": (4096, 4096), "classifier.3.bias": (4096,),
                "classifier.6.weight": (1000, 4096), "classifier.6.bias": (1000,)}
  return {**convert(read_tensors(vgg16_path), vgg, dropped=classifier),
          **convert(read_tensors(lin_path), lins)}


def convnext_params(path, **config) -> dict:
  """torchvision convnext_small-0c510722.pth -> ConvNeXt params (config: ConvNeXt's keyword
  arguments, ConvNeXt-S by default); every key is used, the classifier included."""
  expected = _expected(lambda: convnext.ConvNeXt(rngs=nnx.Rngs(0), **config))
  return convert(read_tensors(path), convnext.torchvision_rules(expected))


CONVERTERS = {"inception": inception_params, "dinov2_vitl14": dinov2_params,
              "lpips_vgg": lpips_vgg_params, "convnext_small": convnext_params}
