"""Settings of the host process that make XLA:CPU faster and never slower.

XLA:CPU allocates each execution's temporaries afresh (the digits DiT's training step: 98 MiB).
glibc serves blocks above its mmap threshold (at most 32 MiB) with new mmap'd memory, which the
kernel faults in 4 KiB page by page on every step. With glibc's `glibc.malloc.hugetlb=1`
tunable (glibc >= 2.35) such blocks are backed by transparent huge pages: on 2 CPU cores the
digits DiT's jitted training step went from 104 to 79 ms (6.3 million page faults in 400 steps
to 0.3 million) and the FID Inception's batch of 16 from 1.12 to 1.05 s. Tunables are read
when a process starts, so the `tesserax` command and the benchmarks start again under them
(`prepare`); a GLIBC_TUNABLES that already sets glibc.malloc.hugetlb (say =0)
is left alone.

XLA:CPU compiles its own kernels with LLVM at -O2 by default; at -O1
(`--xla_backend_optimization_level=1`) compiling takes about a third less (all 90 programs of a
one-student few-step demo 46 -> 31 s) and the programs ran as fast or faster in every case
measured, with the same figures to the printed three decimals but one (BENCHMARKS.md,
"Compiling at LLVM -O1"): matmuls and convolutions are library calls at any level. The flag is
also read by GPU code generation, so it is added only where jax will find no backend but the
CPU.
"""
import importlib.metadata
import importlib.util
import os
import pkgutil
import sys

HUGE_PAGES = "glibc.malloc.hugetlb=1"
CPU_COMPILE = "--xla_backend_optimization_level=1"


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


def cpu_only(environ) -> bool:
  """Whether jax will use the CPU alone: JAX_PLATFORMS=cpu, or unset with no accelerator plugin
  installed (the `jax_plugins` namespace package or entry points, libtpu)."""
  platforms = environ.get("JAX_PLATFORMS", "")
  if platforms:
    return {name.strip().lower() for name in platforms.split(",")} == {"cpu"}
  namespace = importlib.util.find_spec("jax_plugins")
  if namespace and any(pkgutil.iter_modules(namespace.submodule_search_locations)):
    return False
  return not (importlib.metadata.entry_points(group="jax_plugins")
              or importlib.util.find_spec("libtpu"))


def cpu_compile_env(environ) -> dict:
  """`environ` with CPU_COMPILE added to XLA_FLAGS where jax will use the CPU alone and no
  optimisation level is chosen already."""
  if not cpu_only(environ) or "--xla_backend_optimization_level=" in environ.get("XLA_FLAGS", ""):
    return dict(environ)
  return xla_flags_env(environ, CPU_COMPILE)


def prepare(module: str) -> None:
  """Call first thing in a program's entry point: compile for the CPU at CPU_COMPILE where it is
  the only backend (XLA_FLAGS is read by the first backend, later), then replace this process by
  `python -m module` with the same arguments under HUGE_PAGES, unless it runs under them
  already (then return)."""
  os.environ.update(cpu_compile_env(os.environ))
  env = huge_page_env(os.environ)
  if env is not None:
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, "-m", module, *sys.argv[1:]], env)
