"""Nothing lost, nothing silently wrong: checkpoint digests and the fallback to an intact
checkpoint, one trainer per workdir, a torn metrics line, failing starts that create nothing,
the NaN step as the progress line counts it, a preempted demo, and labels eval cannot score."""
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tesserax import cli
from tesserax.core import checkpoint, config as config_lib
from tesserax.core.errors import TesseraxError
from tesserax.demos import demo
from tesserax.training import loop, task as task_lib
from test_trainer import _snapshot  # every file of a workdir with its bytes

# A restore that hits a deliberately corrupted array leaves orbax's other pending shard reads
# (and their event-loop callbacks) unfinished; Python reports them as unraisable whenever they
# are collected, often during a later test here.
pytestmark = [pytest.mark.xdist_group("integrity"),
              pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")]

QUIET = lambda _: None
HOLD_LOCK = """import sys, time
from tesserax.core import workdir
with workdir.lock(sys.argv[1]):
  print("locked", flush=True)
  time.sleep(300)
"""


def _config(data_dir):
  """digits_dit:tiny for 8 steps, logged every step, checkpoints at 4, 6, 8 (keep 3)."""
  config = config_lib.load("digits_dit:tiny")
  config.data.data_dir = data_dir
  config.num_steps, config.log_every_steps = 8, 1
  return config


def _cli_train(workdir, data_dir):
  return ["train", "--config", "digits_dit:tiny", "--workdir", str(workdir),
          f"--config.data.data_dir={data_dir}", "--config.num_steps=8",
          "--config.log_every_steps=1"]


def _host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def _assert_trees_equal(a, b):
  flat_a, tree_a = jax.tree_util.tree_flatten_with_path(a)
  flat_b, tree_b = jax.tree_util.tree_flatten_with_path(b)
  assert tree_a == tree_b
  for (path, x), (_, y) in zip(flat_a, flat_b):
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


def _read(path):
  with open(path) as f:
    return f.read()


def _run_cli(args, capsys):
  """(exit code, the error line); the error must be one line and the last one printed."""
  code = cli.main(args)
  lines = capsys.readouterr().err.strip().splitlines()
  errors = [line for line in lines if line.startswith("error: ")]
  assert len(errors) == 1 and lines[-1] == errors[0], lines
  return code, errors[0]


class Straight:
  """An uninterrupted 8-step run: its workdir, log lines, task and final state."""

  def __init__(self, workdir, log):
    self.workdir, self.log = workdir, log
    self.task, state = task_lib.load_workdir(workdir, log=QUIET)
    self.state = _host(state)

  def raw(self, workdir, step):
    """Checkpoint `step` of `workdir` as orbax alone reads it (no digest checks)."""
    path = os.path.join(workdir, "checkpoints", str(step), "state")
    with ocp.StandardCheckpointer() as reader:
      return _host(reader.restore(path, self.task.abstract_state))

  def copy(self, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(self.workdir, workdir)
    return workdir


@pytest.fixture(scope="session")
def straight(digits_data_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("straight") / "run")
  log = []
  loop.train(_config(digits_data_dir), workdir, log=log.append)
  return Straight(workdir, log)


def _data_files(workdir, step):
  """The files holding checkpoint `step`'s array chunks, largest first."""
  root = os.path.join(workdir, "checkpoints", str(step), "state")
  paths = [os.path.join(d, name) for d, _, names in os.walk(root) for name in names
           if os.sep.join(("ocdbt.process_0", "d")) in d]
  return sorted(paths, key=os.path.getsize, reverse=True)


def _flip_silently(straight, workdir, step):
  """Flip 4 bytes inside a chunk of checkpoint `step` such that orbax restores it without an
  error but with other values; returns the names of the arrays that changed."""
  before = straight.raw(workdir, step)
  for path in _data_files(workdir, step):
    with open(path, "rb") as f:
      data = f.read()
    middle = len(data) // 2
    with open(path, "wb") as f:
      f.write(data[:middle] + bytes(b ^ 0xFF for b in data[middle:middle + 4]) +
              data[middle + 4:])
    try:
      after = straight.raw(workdir, step)
    except Exception:  # the flip broke the chunk's encoding; try a plain-bytes one
      after = before
    changed = [checkpoint._path_name(p) for (p, x), y in zip(
        jax.tree_util.tree_flatten_with_path(before)[0], jax.tree.leaves(after))
               if not np.array_equal(x, y)]
    if changed:
      return changed
    with open(path, "wb") as f:
      f.write(data)
  pytest.fail("no silent flip found")


def _truncate(path):
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[:len(data) // 2])


def test_a_flipped_byte_is_refused_naming_the_checkpoint_and_the_array(straight, tmp_path):
  workdir = straight.copy(tmp_path)
  changed = _flip_silently(straight, workdir, 8)
  directory = os.path.join(workdir, "checkpoints")
  manager = checkpoint.make_manager(directory, straight.task.config.checkpoint, read_only=True)
  with pytest.raises(checkpoint.CorruptCheckpoint) as error:
    checkpoint.restore(manager, 8, straight.task.abstract_state)
  message = str(error.value)
  match = re.fullmatch(rf"checkpoint 8 in {re.escape(directory)} is corrupt \(array (\S+): "
                       r"digest mismatch\)", message)
  assert match and match[1] in changed, (message, changed)

  # A truncated chunk (a tensorstore error) is one line too.
  _truncate(_data_files(workdir, 6)[0])
  with pytest.raises(checkpoint.CorruptCheckpoint,
                     match=rf"^checkpoint 6 in {re.escape(directory)} is corrupt \(unreadable: "
                           r"[^\n]+\)$"):
    checkpoint.restore(manager, 6, straight.task.abstract_state)
  manager.close()


def test_train_resumes_from_the_newest_intact_checkpoint(straight, digits_data_dir, tmp_path):
  workdir = straight.copy(tmp_path)
  changed = _flip_silently(straight, workdir, 8)
  lines = []
  loop.train(_config(digits_data_dir), workdir, log=lines.append)
  match = re.fullmatch(r"checkpoint 8 is corrupt \(array (\S+): digest mismatch\); resuming "
                       r"from 6; moved 8\.corrupt aside", lines[0])
  assert match and match[1] in changed, lines[0]
  assert lines[1].startswith("resumed from") and lines[1].endswith("checkpoints/6")
  _assert_trees_equal(_host(task_lib.load_workdir(workdir, log=QUIET)[1]), straight.state)
  assert _read(os.path.join(workdir, "metrics.jsonl")) == _read(
      os.path.join(straight.workdir, "metrics.jsonl"))
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "8.corrupt"))


def test_load_workdir_uses_the_newest_intact_checkpoint(straight, tmp_path):
  workdir = straight.copy(tmp_path)
  checkpoints = os.path.join(workdir, "checkpoints")
  # Without digests (a checkpoint written before them) or with a torn iterator file, which
  # sampling does not need, checkpoint 8 restores, and nothing is said.
  shutil.rmtree(os.path.join(checkpoints, "8", "digests"))
  _truncate(os.path.join(checkpoints, "8", "data", "metadata"))
  lines = []
  _assert_trees_equal(_host(task_lib.load_workdir(workdir, log=lines.append)[1]),
                      straight.state)
  assert lines == []

  changed = _flip_silently(straight, workdir, 8)
  shutil.copytree(os.path.join(straight.workdir, "checkpoints", "8", "digests"),
                  os.path.join(checkpoints, "8", "digests"))
  _, state = task_lib.load_workdir(workdir, log=lines.append)
  match = re.fullmatch(r"checkpoint 8 is corrupt \(array (\S+): digest mismatch\); using "
                       r"checkpoint 6", lines[0])
  assert len(lines) == 1 and match and match[1] in changed, lines
  _assert_trees_equal(_host(state), straight.raw(straight.workdir, 6))


def test_with_every_checkpoint_corrupt_one_line_and_nothing_changes(straight, digits_data_dir,
                                                                     tmp_path, capsys):
  workdir = straight.copy(tmp_path)
  _flip_silently(straight, workdir, 8)
  for step in (6, 4):
    _truncate(_data_files(workdir, step)[0])
  before = _snapshot(workdir)
  with pytest.raises(TesseraxError) as error:
    task_lib.load_workdir(workdir, log=QUIET)
  assert re.fullmatch(r"no intact checkpoint in \S+/checkpoints: 8 \(array \S+: digest "
                      r"mismatch\); 6 \(unreadable: [^\n]+\); 4 \(unreadable: [^\n]+\)",
                      str(error.value)), str(error.value)
  code, err = _run_cli(_cli_train(workdir, digits_data_dir), capsys)
  assert code == 2 and err.startswith("error: no intact checkpoint in ")
  assert _snapshot(workdir) == before


def test_a_second_trainer_is_refused_and_a_stale_lock_does_not_block(straight, digits_data_dir,
                                                                      tmp_path, capsys):
  workdir = straight.copy(tmp_path)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "8"))  # the run was stopped at 6
  before = _snapshot(workdir)
  holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, workdir],
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    code, err = _run_cli(_cli_train(workdir, digits_data_dir), capsys)
    assert code == 2
    assert f"in use by another run (pid {holder.pid} on {socket.gethostname()}" in err, err
    assert _snapshot(workdir) == dict(before, lock=f"{holder.pid} {socket.gethostname()}\n"
                                      .encode())
  finally:
    holder.kill()
    holder.wait()
  assert os.path.exists(os.path.join(workdir, "lock"))  # left by a dead owner: stale
  assert cli.main(_cli_train(workdir, digits_data_dir)) == 0
  assert not os.path.exists(os.path.join(workdir, "lock"))
  _assert_trees_equal(_host(task_lib.load_workdir(workdir, log=QUIET)[1]), straight.state)


def test_a_torn_metrics_line_is_dropped_on_resume(straight, digits_data_dir, tmp_path):
  workdir = straight.copy(tmp_path)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "8"))
  metrics = os.path.join(workdir, "metrics.jsonl")
  logged = _read(metrics)
  with open(metrics, "w") as f:  # killed while writing step 8's line
    f.write(logged[:len(logged) - len(logged.splitlines()[-1]) // 2])
  loop.train(_config(digits_data_dir), workdir, log=QUIET)
  assert _read(metrics) == logged
  steps = [int(s) for s in re.findall(r'"step": (\d+)', _read(metrics))]
  assert steps == list(range(1, 9))


def test_a_failing_start_leaves_a_new_workdir_absent(straight, digits_data_dir, tmp_path):
  new = str(tmp_path / "new")
  config = _config(digits_data_dir)
  config.model.hidden_size = 48  # --init_from a checkpoint of another model
  with pytest.raises(TesseraxError, match="different model"):
    loop.train(config, new, init_from=os.path.join(straight.workdir, "checkpoints"), log=QUIET)
  assert not os.path.exists(new)
  config = _config(digits_data_dir)
  config.evals.digits.update(type="nope", every_steps=4)  # an evaluator that cannot be built
  with pytest.raises(TesseraxError, match="nope"):
    loop.train(config, new, log=QUIET)
  assert not os.path.exists(new)
  config = _config(digits_data_dir)
  config.task = "nope"
  with pytest.raises(TesseraxError, match="nope"):
    loop.train(config, new, log=QUIET)
  assert not os.path.exists(new)


def test_the_nan_step_is_the_progress_lines_step(straight, digits_data_dir, tmp_path):
  """A run resumed at 6 whose first step (the 7th, "step 7/8" on the progress line) gives an
  infinite loss."""
  workdir = straight.copy(tmp_path)
  directory = os.path.join(workdir, "checkpoints")
  state = straight.raw(workdir, 6)
  final = state["params"]["final_layer"]["linear"]
  final["kernel"] = np.full_like(final["kernel"], np.inf)
  state = jax.device_put(state, jax.tree.map(lambda a: a.sharding, straight.task.abstract_state))
  for step in (6, 8):
    shutil.rmtree(os.path.join(directory, str(step)))
  manager = checkpoint.make_manager(directory, straight.task.config.checkpoint)
  checkpoint.save(manager, 6, state, {"next_index": 6})
  manager.wait_until_finished()
  manager.close()
  lines = []
  with pytest.raises(TesseraxError, match="non-finite") as error:
    loop.train(_config(digits_data_dir), workdir, log=lines.append)
  bad = int(re.search(r"at step (\d+);", str(error.value))[1])
  assert lines == [f"resumed from {directory}/6"]
  assert straight.log[6].startswith(f"step {bad}/8 |")
  assert checkpoint.all_steps(directory, straight.task.config.checkpoint) == [4, 6]


def _sigterm_once_training():
  """SIGTERM this process as soon as the trainer's preemption handler is installed."""
  deadline = time.time() + 120
  while time.time() < deadline:
    handler = signal.getsignal(signal.SIGTERM)
    if isinstance(getattr(handler, "__self__", None), loop._Preemption):
      os.kill(os.getpid(), signal.SIGTERM)
      return
    time.sleep(0.01)


def test_a_preempted_demo_scores_nothing_and_says_how_to_resume(digits_data_dir, tmp_path,
                                                                capsys):
  config = _config(digits_data_dir)
  config.num_steps = 100
  workdir = str(tmp_path / "demo")
  threading.Thread(target=_sigterm_once_training, daemon=True).start()
  assert demo.run(config, workdir) is None
  out = capsys.readouterr().out.strip().splitlines()
  steps = checkpoint.all_steps(os.path.join(workdir, "checkpoints"), config.checkpoint)
  assert len(steps) == 1 and steps[0] < 100
  assert out[-1] == (f"demo stopped at step {steps[0]}/100 (checkpoint saved); run the same "
                     "`tesserax demo` command again to resume")
  for name in ("metrics.json", "samples_grid.png", "nfe_sweep.png"):
    assert not os.path.exists(os.path.join(workdir, name))


def test_eval_refuses_labels_outside_the_digit_classes(tmp_path, capsys):
  path = str(tmp_path / "samples.npz")
  np.savez(path, arr_0=np.zeros((4, 16, 16, 1), np.uint8), arr_1=np.array([0, 1, 10, 3]))
  code, err = _run_cli(["eval", "--samples", path, "--metrics", "fid_digits,accuracy"], capsys)
  assert code == 2
  assert err == (f"error: {path}: arr_1 labels must be digit classes in [0, 10); 1 of 4 are "
                 "not (e.g. 10)")
