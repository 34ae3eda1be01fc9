"""Shared fixtures: the digits dataset prepared once per session, and the tiny recipe."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest

from tesserax.core import host

# The xdist workers and every subprocess start under glibc's huge-page malloc, as the `tesserax`
# command does (core/host.py).
os.environ.update(host.huge_page_env(os.environ) or {})
# XLA:CPU settings for the suite, which compiles some hundreds of small programs and runs most of
# them a few times: LLVM at -O0 and XLA's classic fusion emitters instead of the MLIR ones.
# digits_dit:tiny's training step compiles in 1.7-2.3 s instead of 4.7-5.4 s at the `tesserax`
# command's settings (core/host.py) and runs 3-4x slower; the whole suite took 16:29 at those and
# 11:28 at these on 2 cores (BENCHMARKS.md, "The test suite's compile settings"). A test that runs
# one program thousands of times asks for faster code through jax.jit's `compiler_options`
# (test_gmm_students.py). Subprocesses inherit XLA_FLAGS, and the `tesserax` command keeps an
# optimisation level it is given. jaxlib 0.11 has only the MLIR emitters, and an XLA_FLAGS
# naming the old flag stops the process there ("Unknown flag in XLA_FLAGS").
import jaxlib.version  # noqa: E402  (no backend starts: XLA_FLAGS is read later)

CLASSIC_EMITTERS = jaxlib.version.__version_info__ < (0, 11)
TEST_COMPILE = ("--xla_backend_optimization_level=0",) + (
    ("--xla_cpu_use_fusion_emitters=false",) if CLASSIC_EMITTERS else ())
os.environ.update(host.xla_flags_env(os.environ, *TEST_COMPILE))

import tesserax.tasks  # noqa: F401  (registers every built-in task, network, sampler, ...)
from tesserax.core import config as config_lib
from tesserax.data import pipeline


def pytest_collection_modifyitems(items):
  """Longest first: tests marked `long` go to the workers before the rest, so that the two
  workers finish together rather than one running a long test alone at the end."""
  items.sort(key=lambda item: item.get_closest_marker("long") is None)


@pytest.fixture(scope="session")
def digits_data_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  pipeline.build("digits", data_dir)
  return data_dir


@pytest.fixture
def tiny_config(digits_data_dir):
  """configs/digits_dit.py:tiny reading the session's digits copy."""
  config = config_lib.load("digits_dit:tiny")
  config.data.data_dir = digits_data_dir
  return config


@pytest.fixture(scope="session", autouse=True)
def _compile_once(tmp_path_factory):
  """The many runs of the tiny recipes build the same programs: compile each once for the
  whole session (both xdist workers and the subprocesses started with os.environ), through
  jax's persistent compilation cache."""
  import jax
  cache = tmp_path_factory.getbasetemp().parent / "xla_cache"
  cache.mkdir(exist_ok=True)
  settings = {"jax_compilation_cache_dir": str(cache),
              "jax_persistent_cache_min_compile_time_secs": 0,
              "jax_persistent_cache_min_entry_size_bytes": -1}
  for name, value in settings.items():
    jax.config.update(name, value)
    os.environ[name.upper()] = str(value)


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory):
  """One cache (the digits feature network, written atomically) for the whole session, both
  xdist workers and their subprocesses, outside $HOME."""
  cache = tmp_path_factory.getbasetemp().parent / "tesserax_cache"
  cache.mkdir(exist_ok=True)
  os.environ["TESSERAX_CACHE"] = str(cache)


@pytest.fixture(scope="session")
def tiny_teacher_workdir(tmp_path_factory, digits_data_dir):
  """A finished digits_dit:tiny run whose output layer has moved off its zero init: the frozen
  teacher of the distillation tests."""
  from tesserax.training import loop
  config = config_lib.load("digits_dit:tiny")
  config.data.data_dir = digits_data_dir
  config.optim.update(lr=1e-2, warmup_steps=0)  # moves the zero-initialised output layer
  workdir = str(tmp_path_factory.mktemp("teacher"))
  loop.train(config, workdir, log=lambda *_: None)
  return workdir
