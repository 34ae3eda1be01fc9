"""User files in and out: outputs that are complete or absent (written under a temporary
name, then renamed), and the one guarded .npz reader, which never unpickles and turns a
malformed file into one line naming it."""
import contextlib
import os
import zipfile
import zlib

import numpy as np

from tesserax.core.errors import TesseraxError


@contextlib.contextmanager
def atomic_output(path):
  """Yields a temporary path beside `path`; on a clean exit it is renamed to `path` (atomic on
  POSIX), on an error it is removed. A process killed while writing never leaves a partial
  file at `path`."""
  path = os.fspath(path)
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


PICKLED = "holds Python objects (pickled); refusing to load"


def one_line(error) -> str:
  """`Type: first sentence of the message` of an exception, on one line."""
  name = type(error).__qualname__
  if name.islower():  # zlib.error, struct.error
    name = f"{type(error).__module__}.{name}"
  lines = str(error).strip().splitlines()
  return f"{name}: {lines[0].split('. ')[0][:300]}" if lines else name


def _not_a_zip(head: bytes) -> str:
  """What a file starting with `head` (not a zip archive) is, as the end of a sentence."""
  if not head:
    return "is empty"
  if head.startswith(b"\x80"):  # the PROTO opcode every pickle since protocol 2 starts with
    return PICKLED
  if head.startswith(b"\x93NUMPY"):
    return "is a single .npy array (np.save), not an .npz archive"
  if all(32 <= b < 127 or b in b"\t\n\r" for b in head[:64]):
    return "is a text file, not an .npz archive"
  return "is not an .npz archive (a zip of .npy arrays)"


def read_npz(path, what: str, keys=None) -> dict:
  """{name: array} of an .npz file, read whole, never unpickling: every array, or those that
  `keys(names)` picks from the file's array names (it may raise for one that is missing).

  A file that is missing, not an .npz, truncated, corrupt, or holding Python objects
  (pickles, object arrays) is one TesseraxError: `{what} {path} ...`.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise TesseraxError(f"{what} {path} " + ("is not a file" if os.path.exists(path)
                                             else "does not exist"))
  with open(path, "rb") as f:
    head = f.read(64)
  if not head.startswith(b"PK"):
    raise TesseraxError(f"{what} {path} {_not_a_zip(head)}")
  try:
    with np.load(path, allow_pickle=False) as npz:
      names = npz.files if keys is None else keys(npz.files)
      return {name: npz[name] for name in names}
  except ValueError as e:  # an object array, or a malformed .npy header
    problem = PICKLED if "allow_pickle" in str(e) else f"is corrupt ({one_line(e)})"
  except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
    problem = f"is truncated or corrupt ({one_line(e)})"
  raise TesseraxError(f"{what} {path} {problem}")
