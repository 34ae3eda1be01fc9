"""One writer per workdir: WORKDIR/lock, held by the run that trains there.

The lock is an `fcntl.flock` on WORKDIR/lock, which records the holder's pid and host. The
operating system drops it when its owner exits or dies, so a lock file left behind by a killed
run does not block the next one; a clean exit also removes the file. A second trainer on the
same workdir is refused in one line naming the holder. With several processes, process 0 takes
the lock for all of them and tells the others whether it got it.
"""
import contextlib
import fcntl
import os
import socket

import jax
import numpy as np

from tesserax.core.errors import TesseraxError

LOCK_NAME = "lock"


def _holder(fd) -> str:
  os.lseek(fd, 0, os.SEEK_SET)
  fields = os.read(fd, 4096).decode(errors="replace").split()
  return f"pid {fields[0]} on {fields[1]}" if len(fields) == 2 else "a process starting up"


def _acquire(workdir: str) -> int:
  """An open descriptor of WORKDIR/lock holding the lock (creating the workdir)."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK_NAME)
  while True:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _holder(fd)
      os.close(fd)
      raise TesseraxError(f"workdir {workdir} is in use by another run ({holder}, {path}); "
                          "wait for it to end or stop it") from None
    # The previous holder may have removed the file between our open and flock: retry.
    if os.path.exists(path) and os.path.samestat(os.fstat(fd), os.stat(path)):
      break
    os.close(fd)
  os.ftruncate(fd, 0)
  os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
  return fd


def _release(workdir: str, fd: int) -> None:
  os.remove(os.path.join(workdir, LOCK_NAME))  # before unlocking, so no one locks a dead file
  os.close(fd)


@contextlib.contextmanager
def lock(workdir: str):
  """Holds WORKDIR/lock for the duration of the block (process 0), creating the workdir."""
  fd, error = None, None
  if jax.process_index() == 0:
    try:
      fd = _acquire(workdir)
    except TesseraxError as e:
      error = e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    taken = multihost_utils.broadcast_one_to_all(np.int32(fd is not None))
    if error is None and not taken:
      raise TesseraxError(f"process 0 could not lock workdir {workdir}; see its error")
  if error is not None:
    raise error
  try:
    yield
  finally:
    if fd is not None:
      _release(workdir, fd)
