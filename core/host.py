"""Settings of the host process that make XLA:CPU faster and never slower.

XLA:CPU allocates each execution's temporaries afresh (the digits DiT's training step: 98 MiB).
glibc serves blocks above its mmap threshold (at most 32 MiB) with new mmap'd memory, which the
kernel faults in 4 KiB page by page on every step. With glibc's `glibc.malloc.hugetlb=1`
tunable (glibc >= 2.35) such blocks are backed by transparent huge pages: on 2 CPU cores the
digits DiT's jitted training step went from 104 to 79 ms (6.3 million page faults in 400 steps
to 0.3 million) and the FID Inception's batch of 16 from 1.12 to 1.05 s. Tunables are read
when a process starts, so the `tesserax` command and the benchmarks start again under them
(`reexec_with_huge_pages`); a GLIBC_TUNABLES that already sets glibc.malloc.hugetlb (say =0)
is left alone.
"""
import os
import sys

HUGE_PAGES = "glibc.malloc.hugetlb=1"


def _glibc_version() -> tuple[int, ...]:
  try:
    name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
  except (AttributeError, OSError, ValueError):
    return ()
  return tuple(int(part) for part in version.split(".")[:2]) if name == "glibc" else ()


def huge_page_env(environ) -> dict | None:
  """`environ` with HUGE_PAGES added to GLIBC_TUNABLES, or None where nothing changes: not
  glibc >= 2.35 on Linux, or the tunable already set either way."""
  tunables = environ.get("GLIBC_TUNABLES", "")
  if not sys.platform.startswith("linux") or _glibc_version() < (2, 35):
    return None
  if "glibc.malloc.hugetlb=" in tunables:
    return None
  return dict(environ, GLIBC_TUNABLES=":".join(filter(None, (tunables, HUGE_PAGES))))


def xla_flags_env(environ, *flags: str) -> dict:
  """`environ` with `flags` appended to its XLA_FLAGS (read when a process starts its first
  backend; e.g. "--xla_force_host_platform_device_count=8" for 8 fake CPU devices); those
  already there are not repeated."""
  present = environ.get("XLA_FLAGS", "").split()
  return dict(environ, XLA_FLAGS=" ".join(present + [f for f in flags if f not in present]))


def reexec_with_huge_pages(module: str) -> None:
  """Replace this process by `python -m module` with the same arguments under HUGE_PAGES,
  unless it runs under them already (then return). Call first thing in a program's entry
  point."""
  env = huge_page_env(os.environ)
  if env is not None:
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, "-m", module, *sys.argv[1:]], env)
