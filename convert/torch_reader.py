"""Official checkpoint files as NumPy arrays, and back.

`.pt` / `.pth` / `.bin` go through PyTorch, which is optional and imported only for them
(backbones/weights.py `torch_load`: `torch.load(weights_only=True)`, tensors and plain
containers, no code execution), keeping nested dicts such as {"ema": state_dict, ...}.
`.safetensors` and `.npz` are read by backbones/weights.py `read_tensors` (its NumPy
safetensors reader; no safetensors package). A malformed file is one TesseraxError naming it.
Floating-point tensors arrive as float32. `write` saves a flat state_dict as `.safetensors`
with the small NumPy writer below (an 8-byte little-endian header length N, N bytes of JSON
mapping each name to {dtype, shape, data_offsets: [begin, end]} into the data that follows, the
raw bytes in the host's order, little-endian on x86 and ARM), or as a PyTorch file.
"""
import json
import os
import pathlib
import struct

import ml_dtypes
import numpy as np

from tesserax.backbones import weights
from tesserax.core.errors import TesseraxError
from tesserax.core.files import atomic_output

# What backbones/weights.py reads back.
SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
                      "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32}
TORCH_SUFFIXES = (".pt", ".pth", ".bin")


def read(path: str) -> dict:
  """The file's contents: {name: np.ndarray}, or for a PyTorch file whatever (nested) dict of
  tensors it holds, with the tensors as NumPy arrays."""
  if path.endswith(TORCH_SUFFIXES):
    if not os.path.isfile(path):
      raise TesseraxError(f"checkpoint file not found: {path}")
    return _read_torch(path)
  tensors = weights.read_tensors(path)
  return {key: tensors.read(key) for key in tensors.shapes}


def write(path: str, state_dict: dict) -> None:
  """Write {name: np.ndarray} as .safetensors, or with PyTorch as .pt / .pth / .bin, under a
  temporary name renamed to `path` when complete."""
  if path.endswith(".safetensors"):
    with atomic_output(path) as tmp:
      _write_safetensors(tmp, state_dict)
  elif path.endswith(TORCH_SUFFIXES):
    torch = weights.import_torch(path)
    with atomic_output(path) as tmp:
      torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state_dict.items()},
                 tmp)
  else:
    raise TesseraxError(f"unknown checkpoint format: {path} (expected .safetensors or "
                        f"{', '.join(TORCH_SUFFIXES)})")


def _write_safetensors(path, state_dict):
  names = {np.dtype(v): k for k, v in SAFETENSORS_DTYPES.items()}
  header, offset, arrays = {}, 0, []
  for name, value in state_dict.items():
    value = np.ascontiguousarray(value)
    if value.dtype not in names:
      raise TesseraxError(f"cannot write {name} of dtype {value.dtype} to safetensors")
    header[name] = {"dtype": names[value.dtype], "shape": list(value.shape),
                    "data_offsets": [offset, offset + value.nbytes]}
    offset += value.nbytes
    arrays.append(value)
  text = json.dumps(header, separators=(",", ":")).encode()
  text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(text)))
    f.write(text)
    for value in arrays:
      f.write(value.tobytes())


def _read_torch(path):
  torch = weights.import_torch(path)
  content = weights.torch_load(path)
  if not isinstance(content, dict):
    raise TesseraxError(f"{path} holds a {type(content).__name__}, not a dict of tensors")

  def to_numpy(value):
    if isinstance(value, dict):
      return {k: to_numpy(v) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
      value = value.detach().cpu()
      return (value.to(torch.float32) if value.is_floating_point() else value).numpy()
    return value

  return to_numpy(content)


def read_state_dict(src) -> weights.Tensors:
  """The flat state dict of `src`: .safetensors / .npz directly, a PyTorch file (needs torch)
  through its "state_dict" entry where it has one."""
  src = pathlib.Path(src)
  if src.suffix in (".safetensors", ".npz"):
    return weights.read_tensors(src)
  content = read(str(src))
  if isinstance(content.get("state_dict"), dict):
    content = content["state_dict"]
  tensors = {k: v for k, v in content.items() if isinstance(v, np.ndarray)}
  if len(tensors) != len(content):
    raise TesseraxError(f"{src}: not a state dict of tensors (entries "
                        f"{', '.join(k for k in content if k not in tensors)[:200]})")
  return weights.Tensors(src, {k: tuple(v.shape) for k, v in tensors.items()},
                         lambda k: np.asarray(tensors[k], np.float32))
