"""core/host.py: the `tesserax` command and the benchmarks run under glibc's huge-page malloc
and, where the CPU is jax's only backend, compile at LLVM -O1."""
import os
import subprocess
import sys

import pytest

from tesserax import cli
from tesserax.core import host

needs_glibc = pytest.mark.skipif(host.huge_page_env({}) is None,
                                 reason="glibc >= 2.35 on Linux only")


@needs_glibc
def test_the_tunable_is_added_once_and_a_chosen_one_is_kept():
  assert host.huge_page_env({"PATH": "/bin"}) == {"PATH": "/bin", "GLIBC_TUNABLES": host.HUGE_PAGES}
  assert host.huge_page_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}) == {
      "GLIBC_TUNABLES": "glibc.malloc.arena_max=2:" + host.HUGE_PAGES}
  for chosen in (host.HUGE_PAGES, "glibc.malloc.hugetlb=0", "a=1:glibc.malloc.hugetlb=0"):
    assert host.huge_page_env({"GLIBC_TUNABLES": chosen}) is None


def test_xla_flags_are_appended_once():
  fake = "--xla_force_host_platform_device_count=8"
  assert host.xla_flags_env({}, fake) == {"XLA_FLAGS": fake}
  env = host.xla_flags_env({"XLA_FLAGS": "--a=1", "PATH": "/bin"}, fake, "--a=1")
  assert env == {"XLA_FLAGS": f"--a=1 {fake}", "PATH": "/bin"}


def test_the_cpu_compile_level_only_where_the_cpu_is_the_only_backend(monkeypatch):
  level = {"XLA_FLAGS": host.CPU_COMPILE}
  for platforms in ("cpu", "CPU"):
    assert host.cpu_compile_env({"JAX_PLATFORMS": platforms}) == {"JAX_PLATFORMS": platforms,
                                                                  **level}
  for platforms in ("cuda", "cpu,tpu"):
    assert host.cpu_compile_env({"JAX_PLATFORMS": platforms}) == {"JAX_PLATFORMS": platforms}
  chosen = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_backend_optimization_level=3"}
  assert host.cpu_compile_env(chosen) == chosen
  # JAX_PLATFORMS unset: decided by the installed plugins.
  monkeypatch.setattr(host.importlib.util, "find_spec", lambda name: None)
  monkeypatch.setattr(host.importlib.metadata, "entry_points", lambda group: ())
  assert host.cpu_compile_env({}) == level
  monkeypatch.setattr(host.importlib.metadata, "entry_points",
                      lambda group: ("xla_cuda13",) if group == "jax_plugins" else ())
  assert host.cpu_compile_env({}) == {}


def test_no_tunable_off_glibc(monkeypatch):
  monkeypatch.setattr(sys, "platform", "darwin")
  assert host.huge_page_env({}) is None


@needs_glibc
def test_a_program_starts_again_under_the_tunable(tmp_path):
  (tmp_path / "probe.py").write_text(
      "import os, sys; print(os.environ['GLIBC_TUNABLES'], os.getpid(), *sys.argv[1:])")
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  out = subprocess.run(
      [sys.executable, "-c", "import os; from tesserax.core import host; "
       "print(os.getpid(), flush=True); host.prepare('probe')", "--flag", "x"],
      env=env, cwd=tmp_path, capture_output=True, text=True, check=True).stdout.split()
  # The same process, started again as `python -m probe` with the same arguments.
  assert out[1:] == [host.HUGE_PAGES, out[0], "--flag", "x"]


def test_the_command_starts_again_but_not_when_called(monkeypatch):
  calls = []
  monkeypatch.setattr(host, "prepare", calls.append)
  monkeypatch.setattr(sys, "argv", ["tesserax", "--help"])
  with pytest.raises(SystemExit):
    cli.main()
  assert calls == ["tesserax.cli"]
  with pytest.raises(SystemExit):
    cli.main(["--help"])
  assert len(calls) == 1
