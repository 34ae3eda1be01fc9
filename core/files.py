"""Output files that are complete or absent: written under a temporary name, then renamed."""
import contextlib
import os


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
