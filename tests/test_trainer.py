"""Trainer invariants: sharded == single device, 2 processes == 1, resume == uninterrupted,
crash safety of checkpoints, the NaN guard, and one-line errors that leave the workdir intact."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tesserax import cli
from tesserax.core.errors import TesseraxError
from tesserax.core import checkpoint, host
from tesserax.training import loop, task as task_lib

HERE = os.path.dirname(os.path.abspath(__file__))


def _env():
  """The subprocesses' environment, read when they start (conftest.py's compilation cache)."""
  return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu")


def _state_of(workdir):
  _, state = task_lib.load_workdir(workdir)
  return jax.tree.map(np.asarray, jax.device_get(state))


def _assert_trees_equal(a, b, atol=0.0):
  flat_a, tree_a = jax.tree_util.tree_flatten_with_path(a)
  flat_b, tree_b = jax.tree_util.tree_flatten_with_path(b)
  assert tree_a == tree_b
  for (path, x), (_, y) in zip(flat_a, flat_b):
    np.testing.assert_allclose(x, y, rtol=0, atol=atol, err_msg=jax.tree_util.keystr(path))


def _snapshot(workdir):
  """Every file of a workdir with its bytes (except TensorBoard's event files)."""
  out = {}
  for root, _, files in os.walk(workdir):
    for name in files:
      path = os.path.join(root, name)
      if "tensorboard" not in path:
        with open(path, "rb") as f:
          out[os.path.relpath(path, workdir)] = f.read()
  return out


def test_resume_equals_uninterrupted_run(tiny_config, tmp_path):
  tiny_config.num_steps = 8
  tiny_config.log_every_steps = 1
  tiny_config.checkpoint.every_steps = 100
  loop.train(tiny_config, str(tmp_path / "straight"), log=lambda _: None)

  def stop_at_4(line):
    if line.startswith("step 4/"):
      os.kill(os.getpid(), signal.SIGTERM)  # handled by the trainer: save and exit

  resumed = str(tmp_path / "resumed")
  loop.train(tiny_config, resumed, log=stop_at_4)
  manager = checkpoint.make_manager(os.path.join(resumed, "checkpoints"), tiny_config.checkpoint,
                                    read_only=True)
  assert manager.all_steps() == [5]  # stopped after the signal, mid-run
  loop.train(tiny_config, resumed, log=lambda _: None)

  straight, again = _state_of(str(tmp_path / "straight")), _state_of(resumed)
  assert int(again["step"]) == 8
  _assert_trees_equal(straight, again)  # params, EMA, optimizer state, RNG: bit for bit
  with open(tmp_path / "straight" / "metrics.jsonl") as f1, open(os.path.join(resumed, "metrics.jsonl")) as f2:
    assert f1.read() == f2.read()


@pytest.mark.long
def test_one_step_on_8_devices_matches_1_device(digits_data_dir):
  out = subprocess.run([sys.executable, os.path.join(HERE, "_sharded_step_worker.py"),
                        digits_data_dir], capture_output=True, text=True, env=_env(), timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  results = json.loads(out.stdout.split("RESULT ")[-1])
  for name, r in results.items():
    assert r["loss"] <= 1e-6 * r["ref_loss"], (name, r)
    assert r["state"] <= 1e-5, (name, r)
  assert results["data_parallel"]["sharded_params"] == 0
  assert results["fsdp"]["sharded_params"] > 10  # FSDP really shards the parameters
  assert results["fsdp_x_tensor"]["sharded_params"] > results["fsdp"]["sharded_params"] // 2
  # Megatron's activation layout (core/sharding.py `constrain`): the tensor-parallel step gathers
  # parameters, about as many bytes as FSDP's, not activations (1.29x FSDP's here; 1.75x before
  # the layout was constrained, and 43x on DiT-B/2 at batch 256).
  assert results["fsdp_x_tensor"]["all_gather"] <= 1.5 * results["fsdp"]["all_gather"], results


def test_a_mesh_axis_that_divides_no_width_warns():
  """FSDP over 256 devices splits nothing of DiT-XL/2 (width 1,152 = 9 x 128) and 4-way tensor
  parallelism leaves LightningDiT-1p6B's SwiGLU width 4,778 whole; both warn, while fsdp 128 and
  tensor 2 split every such dimension and stay quiet. Abstract meshes: no devices needed."""
  import warnings
  from flax import nnx
  from jax.sharding import AbstractMesh
  from tesserax.core import sharding
  from tesserax.generators import dit
  from tesserax.tasks.diffusion import build_network

  def shardings(model_config, mesh_shape):
    params = nnx.split(nnx.eval_shape(lambda: build_network(model_config)), nnx.Param, ...)[1]
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      specs = sharding.param_shardings(nnx.to_pure_dict(params), sharding.logical_names(params),
                                       AbstractMesh(mesh_shape, sharding.MESH_AXES))
    axes = {axis for s in jax.tree.leaves(specs) for axis in s.spec if axis}
    return axes, [str(w.message) for w in caught]

  xl2, lightning_1p6b = dit.dit_config("XL/2"), dit.lightningdit_config("1p6B/1")
  axes, messages = shardings(xl2, (1, 256, 1))
  assert axes == set() and len(messages) == 1 and "mesh.fsdp=256" in messages[0], messages
  assert "size 1152:" in messages[0], messages
  axes, messages = shardings(lightning_1p6b, (1, 2, 4))
  assert "tensor" in axes and len(messages) == 1 and "size 4778:" in messages[0], messages
  for config, mesh_shape, split in ((xl2, (1, 128, 1), {"fsdp"}),
                                    (xl2, (2, 64, 2), {"fsdp", "tensor"}),
                                    (lightning_1p6b, (1, 4, 2), {"fsdp", "tensor"})):
    assert shardings(config, mesh_shape) == (split, []), mesh_shape


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _train_cmd(workdir, data_dir, *extra):
  return [sys.executable, "-m", "tesserax.cli", "train", "--config", "digits_dit:tiny",
          "--workdir", workdir, f"--config.data.data_dir={data_dir}", *extra]


@pytest.mark.long
def test_two_processes_match_one_process(tiny_config, digits_data_dir, tmp_path):
  loop.train(tiny_config, str(tmp_path / "one"), log=lambda _: None)  # one process, one device
  port = _free_port()
  env2 = host.xla_flags_env(_env(), "--xla_force_host_platform_device_count=2")
  procs = [subprocess.Popen(
      _train_cmd(str(tmp_path / "two"), digits_data_dir, "--coordinator_address",
                 f"localhost:{port}", "--num_processes", "2", "--process_id", str(i)),
      env=env2, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outputs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  assert "step 4/4" in outputs[0][0] and "step 4/4" not in outputs[1][0]  # process 0 logs
  _assert_trees_equal(_state_of(str(tmp_path / "one")), _state_of(str(tmp_path / "two")),
                      atol=1e-6)


@pytest.mark.long
def test_sigkill_while_saving_keeps_the_previous_checkpoint(digits_data_dir, tmp_path):
  workdir = tmp_path / "run"
  ckpt_dir = workdir / "checkpoints"
  settings = ["--config.checkpoint.every_steps=1", "--config.checkpoint.keep=2",
              "--config.model.hidden_size=128", "--config.model.num_heads=4"]
  cmd = _train_cmd(str(workdir), digits_data_dir, "--config.num_steps=400", *settings)
  proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  killed_during_save = False
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    names = os.listdir(ckpt_dir) if ckpt_dir.exists() else []
    committed = [n for n in names if n.isdigit()]
    if committed and any("tmp" in n for n in names):
      proc.send_signal(signal.SIGKILL)
      killed_during_save = True
      break
    time.sleep(0.001)
  proc.wait(timeout=60)
  assert killed_during_save, "the run never got to a save in progress"
  state = _state_of(str(workdir))  # the latest committed checkpoint restores
  step = int(state["step"])
  assert step >= 1 and np.all(np.isfinite(state["params"]["final_layer"]["linear"]["kernel"]))
  rerun = subprocess.run(
      _train_cmd(str(workdir), digits_data_dir, f"--config.num_steps={step + 2}", *settings),
      env=_env(), capture_output=True, text=True, timeout=300)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert "resumed from" in rerun.stdout


def test_nan_guard_stops_with_the_step_and_keeps_the_last_good_checkpoint(tiny_config, tmp_path):
  tiny_config.optim.lr = 1e30
  tiny_config.optim.grad_clip = 0.0
  tiny_config.optim.warmup_steps = 0
  tiny_config.num_steps = 6
  tiny_config.log_every_steps = 1
  tiny_config.checkpoint.every_steps = 1
  # The second step is the first non-finite one: the progress line's "step 2".
  with pytest.raises(TesseraxError, match=r"non-finite loss or gradients at step 2\b"):
    loop.train(tiny_config, str(tmp_path), log=lambda _: None)
  state = _state_of(str(tmp_path))
  assert int(state["step"]) == 1


def _run_cli(args, capsys):
  """(exit code, the error line); the error must be a single line and the last one printed
  (progress bars of tfds may come before it)."""
  code = cli.main(args)
  lines = capsys.readouterr().err.strip().splitlines()
  errors = [line for line in lines if line.startswith("error: ")]
  assert len(errors) == 1 and lines[-1] == errors[0], lines
  return code, errors[0]


def test_unknown_config_key_is_one_line_and_creates_nothing(digits_data_dir, tmp_path, capsys):
  code, err = _run_cli(["train", "--config", "digits_dit:tiny", "--workdir", str(tmp_path / "w"),
                        "--config.model.hiden_size=3"], capsys)
  assert code == 2
  assert "unknown config key 'model.hiden_size'" in err and "hidden_size" in err
  assert not (tmp_path / "w").exists()


def test_missing_dataset_directory(tmp_path, capsys):
  code, err = _run_cli(["data", "build", "image_folder", "--manual_dir", str(tmp_path / "nope"),
                        "--resolution", "16"], capsys)
  assert code == 2 and str(tmp_path / "nope") in err


def test_corrupt_image_in_image_folder(tmp_path, capsys):
  from PIL import Image
  root = tmp_path / "folder"
  (root / "cat").mkdir(parents=True)
  Image.new("RGB", (20, 24), (10, 20, 30)).save(root / "cat" / "ok.png")
  (root / "cat" / "broken.png").write_bytes(b"not a png")
  code, err = _run_cli(["data", "build", "image_folder", "--manual_dir", str(root),
                        "--resolution", "16", "--data_dir", str(tmp_path / "tfds")], capsys)
  assert code == 2 and "broken.png" in err


def test_different_model_and_different_config_are_refused_intact(digits_data_dir, tmp_path,
                                                                  capsys):
  base = ["train", "--config", "digits_dit:tiny", f"--config.data.data_dir={digits_data_dir}"]
  first = str(tmp_path / "first")
  assert cli.main(base + ["--workdir", first]) == 0
  capsys.readouterr()
  before = _snapshot(first)

  # A checkpoint of a different model passed as --init_from.
  second = str(tmp_path / "second")
  code, err = _run_cli(base + ["--workdir", second, "--init_from", first + "/checkpoints",
                               "--config.model.hidden_size=48"], capsys)
  assert code == 2
  assert "different model" in err and "(32," in err and "(48," in err
  assert not os.path.exists(os.path.join(second, "checkpoints", "4"))

  # The same workdir resumed with a different config.
  code, err = _run_cli(base + ["--workdir", first, "--config.model.depth=3"], capsys)
  assert code == 2
  assert "different config" in err and "model.depth" in err
  assert _snapshot(first) == before


def test_help_of_every_command(capsys):
  out = subprocess.run([sys.executable, "-m", "tesserax.cli", "--help"], env=_env(),
                       capture_output=True, text=True, timeout=120)  # the program's entry point
  assert out.returncode == 0 and "usage: tesserax" in out.stdout
  for args in (["train"], ["demo"], ["sample"], ["eval"], ["data", "build"]):
    with pytest.raises(SystemExit) as exit_info:
      cli.main([*args, "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: tesserax {' '.join(args)}"), args


def test_every_recipe_has_the_trainer_keys():
  """Each packaged config overrides base_config's keys, never drops one."""
  from tesserax.core import config as config_lib

  def paths(tree, prefix=""):
    out = set()
    for key, value in tree.items():
      out |= paths(value, f"{prefix}{key}.") if hasattr(value, "items") else {prefix + key}
    return out

  required = paths(config_lib.base_config())
  names = [f[:-3] for f in os.listdir(config_lib.CONFIGS_DIR) if f.endswith(".py") and f[0] != "_"]
  assert len(names) >= 5
  for name in names:
    missing = required - paths(config_lib.load(name))
    assert not missing, (name, sorted(missing))


def test_a_workdir_of_the_layout_before_tasks_resumes(tiny_config, tmp_path):
  """A config.json written before `task` and `evals` (one `eval` section holding the demo's
  nfe/cfg_scale, no sample.final_correction) loads as a diffusion task and resumes to the
  state of an uninterrupted run."""
  quiet = lambda _: None
  tiny_config.checkpoint.every_steps = 2
  tiny_config.num_steps = 4
  loop.train(tiny_config, str(tmp_path / "straight"), log=quiet)
  old = str(tmp_path / "old")
  tiny_config.num_steps = 2
  loop.train(tiny_config, old, log=quiet)
  path = os.path.join(old, "config.json")
  with open(path) as f:
    saved = json.load(f)
  evals, demo = saved.pop("evals")["digits"], saved.pop("demo")
  del saved["task"], saved["sample"]["final_correction"], evals["type"]
  saved["eval"] = dict(evals, kind="digits", ref="", metrics=["fid"], **demo)
  with open(path, "w") as f:
    json.dump(saved, f)
  task, _ = task_lib.load_workdir(old)
  assert task.config.task == "diffusion" and task.config.evals.digits.type == "digits"
  assert tuple(task.config.demo.nfe) == (1, 2) and task.config.sample.final_correction
  tiny_config.num_steps = 4
  loop.train(tiny_config, old, log=quiet)
  _assert_trees_equal(_state_of(str(tmp_path / "straight")), _state_of(old))


def test_progress_line_has_no_rate_until_the_second_interval(monkeypatch):
  clock = iter([100.0, 110.0])
  monkeypatch.setattr(loop.time, "time", lambda: next(clock))
  progress = loop.Progress(start_step=0, num_steps=300, batch_size=64)
  assert progress.line(100, {"loss": 0.5}) == (
      "step 100/300 | loss 0.5000 | -- steps/s | -- images/s | ETA --")  # includes compilation
  assert progress.line(200, {"loss": 0.25}) == (
      "step 200/300 | loss 0.2500 | 10.00 steps/s | 640 images/s | ETA 00:00:10")
