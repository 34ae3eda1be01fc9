"""Official checkpoint files as NumPy arrays, and back.

`.pt` / `.pth` / `.bin` go through PyTorch, which is optional and imported only for them
(`torch.load(weights_only=True)`: tensors and plain containers, no code execution).
`.safetensors` goes through the small NumPy reader and writer below, so the safetensors package
is not needed. The format: an 8-byte little-endian header length N, N bytes of JSON mapping each
name to {dtype, shape, data_offsets: [begin, end]} (offsets into the data after the header, plus
an optional "__metadata__" entry), then the raw little-endian bytes.
"""
import json
import os
import struct

import ml_dtypes
import numpy as np

from tesserax.errors import TesseraxError

SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
TORCH_SUFFIXES = (".pt", ".pth", ".bin")


def read(path: str) -> dict:
  """The file's contents: {name: np.ndarray}, or for a PyTorch file whatever (nested) dict of
  tensors it holds, with the tensors as NumPy arrays."""
  if not os.path.isfile(path):
    raise TesseraxError(f"checkpoint file not found: {path}")
  if path.endswith(".safetensors"):
    return _read_safetensors(path)
  if path.endswith(TORCH_SUFFIXES):
    return _read_torch(path)
  raise TesseraxError(f"unknown checkpoint format: {path} (expected .safetensors or "
                      f"{', '.join(TORCH_SUFFIXES)})")


def write(path: str, state_dict: dict) -> None:
  """Write {name: np.ndarray} as .safetensors, or with PyTorch as .pt / .pth / .bin."""
  if path.endswith(".safetensors"):
    _write_safetensors(path, state_dict)
  elif path.endswith(TORCH_SUFFIXES):
    torch = _import_torch(path)
    torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state_dict.items()},
               path)
  else:
    raise TesseraxError(f"unknown checkpoint format: {path} (expected .safetensors or "
                        f"{', '.join(TORCH_SUFFIXES)})")


def _read_safetensors(path):
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    header_size = struct.unpack("<Q", f.read(8))[0] if size >= 8 else size
    if 8 + header_size > size:
      raise TesseraxError(f"{path} is not a safetensors file (header runs past the end)")
    try:
      header = json.loads(f.read(header_size))
    except ValueError:
      raise TesseraxError(f"{path} is not a safetensors file (unreadable header)") from None
  data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_size)
  out = {}
  for name, entry in header.items():
    if name == "__metadata__":
      continue
    if entry["dtype"] not in SAFETENSORS_DTYPES:
      raise TesseraxError(f"{path}: {name} has unsupported dtype {entry['dtype']}")
    begin, end = entry["data_offsets"]
    dtype = np.dtype(SAFETENSORS_DTYPES[entry["dtype"]])
    if end > data.size or end - begin != dtype.itemsize * int(np.prod(entry["shape"])):
      raise TesseraxError(f"{path}: {name} has inconsistent offsets (truncated file?)")
    out[name] = np.array(data[begin:end]).view(dtype).reshape(entry["shape"])
  return out


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
      f.write(value.astype(value.dtype.newbyteorder("<"), copy=False).tobytes())


def _import_torch(path):
  try:
    import torch
  except ImportError:
    raise TesseraxError(f"{path}: PyTorch files need PyTorch (pip install torch); or save the "
                        "state_dict as .safetensors") from None
  return torch


def _read_torch(path):
  torch = _import_torch(path)
  try:
    content = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises several types for a file it cannot read
    raise TesseraxError(f"{path}: not a PyTorch file of tensors ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})") from None

  def to_numpy(value):
    if isinstance(value, dict):
      return {k: to_numpy(v) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
      value = value.detach().cpu()
      if value.dtype == torch.bfloat16:
        return value.float().numpy().astype(ml_dtypes.bfloat16)
      return value.numpy()
    return value

  return to_numpy(content)
