"""Configs are checked before a run creates anything, and what a person reads is one line: bad
values, unknown recipe arguments, a damaged config.json, a full disk, a missing accelerator
and an out-of-memory. A bug keeps its traceback."""
import errno
import importlib.util
import os
import shutil
import subprocess
import sys

import pytest

from tesserax import cli
from tesserax.core import config as config_lib
from tesserax.core.errors import TesseraxError

ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")


def _tiny(name="digits_dit"):
  return config_lib.load(f"{name}:tiny")


def _set(config, key, value):
  *parents, leaf = key.split(".")
  for name in parents:
    config = config[name]
  config[leaf] = value


def _recipes():
  return sorted(f[:-3] for f in os.listdir(config_lib.CONFIGS_DIR)
                if f.endswith(".py") and f[0] != "_")


def _one_error_line(capsys):
  """The single line on stderr; it must start with `error: ` (no traceback)."""
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), lines
  return lines[0]


BAD = [
    ("num_steps", -1, "a positive integer"),
    ("num_steps", 0, "a positive integer"),
    ("batch_size", 0, "a positive integer"),
    ("log_every_steps", 0, "a positive integer"),
    ("checkpoint.every_steps", 0, "a positive integer"),
    ("checkpoint.keep", 0, "a positive integer"),
    ("sample.every_steps", -1, ">= 0"),
    ("evals.digits.every_steps", -5, ">= 0"),
    ("sample.num_steps", 0, "a positive integer"),
    ("sample.shift", 0.0, "> 0"),
    ("sample.cfg_scale", -1.0, ">= 0"),
    ("sample.interval", (0.5, 0.5), "0 <= lo < hi <= 1"),
    ("sample.interval", (-0.1, 1.0), "0 <= lo < hi <= 1"),
    ("sample.interval", (0.0, 1.5), "0 <= lo < hi <= 1"),
    ("model.dtype", "float17", "float32, bfloat16, float16"),
    ("ema_decay", 1.5, "[0, 1]"),
    ("ema_decay", -0.1, "[0, 1]"),
    ("optim.lr", 0.0, "> 0"),
    ("optim.lr", float("nan"), "> 0"),
    ("optim.schedule", "cosin", "constant or cosine"),
]


@pytest.mark.parametrize("key,value,rule", BAD, ids=[f"{k}={v}" for k, v, _ in BAD])
def test_validate_names_the_key_and_the_rule(key, value, rule):
  config = _tiny()
  _set(config, key, value)
  with pytest.raises(TesseraxError) as info:
    config_lib.validate(config, num_devices=1, num_processes=1)
  message = str(info.value)
  assert f"config {key}=" in message and rule in message and "\n" not in message


def test_validate_accepts_the_edges_and_every_recipe():
  config = _tiny()
  for key, value in [("sample.cfg_scale", 0.0), ("sample.every_steps", 0), ("ema_decay", 0.0),
                     ("sample.interval", (0.0, 0.9)), ("model.dtype", "bfloat16")]:
    _set(config, key, value)
  config_lib.validate(config, num_devices=1, num_processes=1)
  for name in _recipes():
    config_lib.validate(config_lib.load(name), num_devices=8, num_processes=2)
  tokenizer = _tiny("digits_kl")
  tokenizer.disc_optim.lr = -1.0
  with pytest.raises(TesseraxError, match=r"disc_optim\.lr=-1\.0: must be a number > 0"):
    config_lib.validate(tokenizer, num_devices=1, num_processes=1)


def test_batch_size_must_split_over_the_mesh_and_the_processes():
  config = _tiny()
  config.batch_size = 6
  with pytest.raises(TesseraxError, match=r"batch_size=6: .*4 batch shards .*data 4 x fsdp 1"):
    config_lib.validate(config, num_devices=4, num_processes=1)
  config.mesh.tensor = 2  # 4 devices: data 2 x fsdp 1 x tensor 2; 6 splits in 2
  config_lib.validate(config, num_devices=4, num_processes=1)
  with pytest.raises(TesseraxError, match=r"batch_size=6: must be divisible by the 4 processes"):
    config_lib.validate(config, num_devices=4, num_processes=4)


def test_sample_settings_follow_the_sample_rules():
  settings = _tiny().sample
  config_lib.validate_sample(settings)
  settings.interval = (0.9, 0.1)
  with pytest.raises(TesseraxError, match=r"^sample\.interval=\(0\.9, 0\.1\): must be \(lo, hi\)"):
    config_lib.validate_sample(settings)


def test_recipe_arguments_are_declared_and_checked():
  for name in _recipes():
    for arg in _declared_args(name):
      config_lib.validate(config_lib.load(f"{name}:{arg}"), num_devices=8, num_processes=2)
  with pytest.raises(TesseraxError, match=r"^config digits_dit has no argument 'tny'; it takes "
                                          r"tiny$"):
    config_lib.load("digits_dit:tny")
  with pytest.raises(TesseraxError, match=r"dit_xl2 has no argument '1024'; it takes 256 or 512"):
    config_lib.load("dit_xl2:1024")
  with pytest.raises(TesseraxError, match=r"sit_xl2 has no argument '512'; it takes no argument"):
    config_lib.load("sit_xl2:512")
  assert config_lib.load("dit_xl2:512").model.input_size == 64
  assert config_lib.load("lightningdit_xl1:800ep").sample.cfg_scale == 6.7


def _declared_args(name):
  """The recipe's ARGS; every packaged recipe declares them."""
  spec = importlib.util.spec_from_file_location("recipe", config_lib.resolve_path(name))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  assert isinstance(module.ARGS, tuple), name
  return module.ARGS


@pytest.mark.parametrize("text,what", [("{not json", "is not valid JSON"),
                                       ("[1, 2]", "holds a JSON list, not a config object"),
                                       ('{"seed": 0}', "is not a tesserax config"),
                                       (b"\xff\xfe\x00", "is not valid JSON")])
def test_damaged_config_json_is_one_line_naming_the_file(tmp_path, text, what):
  path = tmp_path / "config.json"
  path.write_bytes(text if isinstance(text, bytes) else text.encode())
  for read in (lambda: config_lib.from_json(str(path)),
               lambda: config_lib.check_or_write_workdir_config(_tiny(), str(tmp_path), True)):
    with pytest.raises(TesseraxError) as info:
      read()
    assert str(path) in str(info.value) and what in str(info.value)
    assert "\n" not in str(info.value)
  assert path.read_bytes() == (text if isinstance(text, bytes) else text.encode())


CLI_BAD = [
    (["--config", "digits_dit:tiny", "--config.num_steps=-1"], "num_steps=-1"),
    (["--config", "digits_dit:tiny", "--config.batch_size=0"], "batch_size=0"),
    (["--config", "digits_dit:tiny", "--config.log_every_steps=0"], "log_every_steps=0"),
    (["--config", "digits_dit:tiny", "--config.checkpoint.every_steps=0"],
     "checkpoint.every_steps=0"),
    (["--config", "digits_dit:tiny", "--config.model.dtype=float17"], "'float17'"),
    (["--config", "digits_dit:tiny", "--config.sample.interval=(0.9,0.1)"], "sample.interval"),
    (["--config", "digits_dit:tny"], "it takes tiny"),
    (["--config", "dit_xl2:1024"], "it takes 256 or 512"),
]


@pytest.mark.parametrize("args,expected", CLI_BAD, ids=[a[-1] for a, _ in CLI_BAD])
def test_bad_train_values_exit_2_in_one_line_and_create_nothing(tmp_path, capsys, args,
                                                                 expected):
  workdir = tmp_path / "w"
  assert cli.main(["train", "--workdir", str(workdir), *args]) == 2
  assert expected in _one_error_line(capsys)
  assert not workdir.exists()


def test_bad_demo_values_exit_2_and_create_nothing(tmp_path, capsys):
  workdir = tmp_path / "demo"
  assert cli.main(["demo", "--workdir", str(workdir), "--config.num_steps=-1"]) == 2
  assert "num_steps=-1" in _one_error_line(capsys)
  assert not workdir.exists()


def test_damaged_config_json_on_the_command_line(tmp_path, capsys):
  (tmp_path / "config.json").write_text("{trunc")
  for args in (["train", "--config", "digits_dit:tiny"],
               ["sample", "--num", "1", "--out", str(tmp_path / "s.npz")]):
    assert cli.main([*args, "--workdir", str(tmp_path)]) == 2
    assert f"{tmp_path / 'config.json'} is not valid JSON" in _one_error_line(capsys)
  assert sorted(os.listdir(tmp_path)) == ["config.json"]


def _raise_in_command(monkeypatch, fn):
  """Make `tesserax eval` run fn instead."""
  monkeypatch.setitem(cli.COMMANDS, "eval", lambda args, overrides: fn())


def _full_disk():
  with open("/dev/full", "w") as f:  # every write: ENOSPC
    f.write("x")
    f.flush()


def _orbax_full_disk():
  """A save that fails the way a tensorstore write in an async checkpoint does."""
  try:
    raise ValueError('Error writing local file "/w/checkpoints/4/d/0": [OS error: No space '
                     'left on device]')
  except ValueError as e:
    raise ExceptionGroup("checkpoint save failed", [RuntimeError("commit")]) from e


def _enospc_in_group():
  raise ExceptionGroup("async", [OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/w/x")])


@pytest.mark.parametrize("fail", [_full_disk, _orbax_full_disk, _enospc_in_group])
def test_a_full_disk_is_one_line(monkeypatch, capsys, fail):
  if fail is _full_disk and not os.path.exists("/dev/full"):
    pytest.skip("no /dev/full")
  _raise_in_command(monkeypatch, fail)
  assert cli.main(["eval", "--samples", "s.npz"]) == 1
  line = _one_error_line(capsys)
  assert "no space left on device" in line and "free some disk space" in line
  assert "last checkpoint is kept" in line and "resumes" in line


def test_an_out_of_memory_is_one_line(monkeypatch, capsys):
  import jax.numpy as jnp
  _raise_in_command(monkeypatch, lambda: jnp.zeros(1 << 50, jnp.uint8).block_until_ready())
  assert cli.main(["eval", "--samples", "s.npz"]) == 1
  line = _one_error_line(capsys)
  assert "out of memory (RESOURCE_EXHAUSTED" in line
  assert "batch_size" in line and "bfloat16" in line and "model.remat" in line


def test_an_uninitialisable_backend_is_one_line(monkeypatch, capsys):
  def fail():
    raise RuntimeError("Unable to initialize backend 'tpu': INTERNAL: Failed to open libtpu.so "
                       "(set JAX_PLATFORMS='' to automatically choose an available backend)")
  _raise_in_command(monkeypatch, fail)
  assert cli.main(["eval", "--samples", "s.npz"]) == 1
  line = _one_error_line(capsys)
  assert "tpu backend" in line and "pip install 'tesserax[tpu]'" in line
  assert "JAX_PLATFORMS=cpu" in line


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU may be present")
def test_jax_platforms_cuda_without_a_gpu(tmp_path):
  """The real thing: jax asked for CUDA on a machine without it."""
  out = subprocess.run([sys.executable, "-m", "tesserax.cli", "train", "--config",
                        "digits_dit:tiny", "--workdir", str(tmp_path / "w")],
                       env=dict(ENV, JAX_PLATFORMS="cuda"), capture_output=True, text=True,
                       timeout=120)
  lines = out.stderr.strip().splitlines()
  assert out.returncode == 1 and len(lines) == 1, out.stderr
  assert "cuda backend" in lines[0] and "pip install 'tesserax[cuda]'" in lines[0]
  assert not (tmp_path / "w").exists()


def test_a_bug_keeps_its_traceback(monkeypatch):
  def bug():
    raise AssertionError("a bug")
  _raise_in_command(monkeypatch, bug)
  with pytest.raises(AssertionError, match="a bug"):
    cli.main(["eval", "--samples", "s.npz"])
  _raise_in_command(monkeypatch, lambda: {}["missing"])
  with pytest.raises(KeyError):
    cli.main(["eval", "--samples", "s.npz"])


def test_an_option_added_at_its_off_value_keeps_a_workdir_resumable(tmp_path):
  """False, None, 0 and "" are off: a workdir written before the key existed resumes."""
  config_lib.check_or_write_workdir_config(_tiny(), str(tmp_path), True)
  for value in (False, None, 0, ""):
    config = _tiny()
    config.teacher = dict(pairs_workdir=value)
    config_lib.check_or_write_workdir_config(config, str(tmp_path), False)
  config.teacher.pairs_workdir = "workdirs/digits"
  with pytest.raises(TesseraxError, match="teacher.pairs_workdir"):
    config_lib.check_or_write_workdir_config(config, str(tmp_path), False)
