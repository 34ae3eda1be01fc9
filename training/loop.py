"""The training loop: one readable loop over a task's pure, jitted, sharded training step.

The task (training/task.py, chosen by `config.task`) builds the train state from shapes and
initialises it directly into its shardings, and compiles the step with the state donated. The
loop takes the workdir's lock (core/workdir.py), resumes (the workdir's newest intact
checkpoint, then --init_from, then scratch) and runs the steps with metrics, the progress line,
sample grids, periodic evaluators (eval/evaluators.py), checkpoints, the NaN/Inf guard and
SIGTERM handling; a finished run calls the task's export.
"""
import json
import os
import signal
import time

import jax

from tesserax.core import checkpoint, config as config_lib, files, sharding
from tesserax.core import workdir as workdir_lib
from tesserax.core.errors import TesseraxError
from tesserax.data import pipeline
from tesserax.eval import evaluators as evaluators_lib
from tesserax.training import task as task_lib


def _records(path: str) -> list:
  """(line, record) of each line of a metrics.jsonl. A torn last line (a run killed while
  writing it) is dropped; a damaged line before it is refused."""
  with open(path) as f:
    lines = [line.rstrip("\n") for line in f if line.strip()]
  records = []
  for i, line in enumerate(lines):
    try:
      records.append((line, json.loads(line)))
    except ValueError:
      if i < len(lines) - 1:
        raise TesseraxError(f"{path} line {i + 1} is not JSON; repair or remove it") from None
  return records


class MetricsLog:
  """metrics.jsonl plus clu writers (TensorBoard), from process 0 only."""

  def __init__(self, workdir: str, resume_step: int):
    self.active = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    if not self.active:
      return
    # A resumed run re-logs the steps after its checkpoint; drop their earlier lines.
    if os.path.exists(self.path):
      kept = [line + "\n" for line, record in _records(self.path) if record["step"] <= resume_step]
      with files.atomic_output(self.path) as tmp, open(tmp, "w") as f:
        f.writelines(kept)
    import tensorflow as tf  # clu's TensorBoard writer; TF must not take the accelerators
    tf.config.set_visible_devices([], "GPU")
    from clu import metric_writers
    self.writer = metric_writers.create_default_writer(os.path.join(workdir, "tensorboard"),
                                                       asynchronous=True)

  def write(self, step: int, scalars: dict) -> None:
    if not self.active:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": step, **scalars}) + "\n")
    self.writer.write_scalars(step, scalars)

  def close(self):
    if self.active:
      self.writer.flush()
      self.writer.close()


class Progress:
  """The progress line: step, loss, steps/s, images/s and ETA."""

  def __init__(self, start_step: int, num_steps: int, batch_size: int):
    self.num_steps, self.batch_size = num_steps, batch_size
    self.last_step, self.last_time = start_step, None

  def line(self, step: int, scalars: dict) -> str:
    now = time.time()
    head = f"step {step}/{self.num_steps} | loss {scalars['loss']:.4f} | "
    first = self.last_time is None  # no rate for the first interval: it includes compilation
    rate = 0.0 if first else (step - self.last_step) / max(now - self.last_time, 1e-9)
    self.last_step, self.last_time = step, now
    if rate <= 0:
      return head + "-- steps/s | -- images/s | ETA --"
    eta = time.strftime("%H:%M:%S", time.gmtime((self.num_steps - step) / rate))
    return head + f"{rate:.2f} steps/s | {rate * self.batch_size:.0f} images/s | ETA {eta}"


class _Preemption:
  """SIGTERM sets a flag; the loop saves a checkpoint and exits cleanly."""

  def __init__(self):
    self.requested = False
    self.previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    self.requested = True

  def restore(self):
    signal.signal(signal.SIGTERM, self.previous)


def _check_finite(state):
  """Stop at the first non-finite step, numbered as the progress line counts steps (the
  state records its 0-based index)."""
  bad = int(jax.device_get(state["nonfinite_step"]))
  if bad >= 0:
    raise TesseraxError(f"non-finite loss or gradients at step {bad + 1}; stopping. The last "
                        "good checkpoint is kept; lower the learning rate or enable "
                        "optim.grad_clip")


def train(config, workdir: str, init_from: str | None = None, log=print):
  """Train `config` in `workdir`; resumes from the workdir's newest intact checkpoint. Returns
  (task, state) at the end of training, or at the preemption's checkpoint.

  Everything that can refuse the run (the config, the task, the data, the evaluators,
  --init_from) is checked before anything is written, so a failing start leaves a new workdir
  absent. The run then holds WORKDIR/lock (core/workdir.py) until it returns."""
  workdir = os.path.abspath(workdir)
  config_lib.validate(config)
  config_lib.check_or_write_workdir_config(config, workdir, write=False)
  mesh = sharding.make_mesh(config.mesh)
  task = task_lib.build(config, mesh)
  loader = pipeline.make_train_loader(config.data, config.batch_size, config.seed)
  evaluators = evaluators_lib.build_all(config, task.predict)
  directory = os.path.join(workdir, "checkpoints")
  init = None
  if init_from and not checkpoint.all_steps(directory, config.checkpoint):
    init = checkpoint.restore_params(init_from, task.abstract_state, config.checkpoint, log)
  with workdir_lib.lock(workdir):
    state = _resume(task, loader, directory, log)
    if state is None and init is not None:
      state = dict(task.init(), params=init["params"], ema=init["ema"])
      log(f"initialised params and EMA from {init_from}")
    elif state is None:
      state = task.init()
    config_lib.check_or_write_workdir_config(config, workdir, write=jax.process_index() == 0)
    state = _run(config, workdir, task, loader, evaluators, state, log)
    if int(jax.device_get(state["step"])) == config.num_steps:
      task.export(state, workdir, log)
  return task, state


def _resume(task, loader, directory: str, log):
  """The state of the newest intact checkpoint (the loader set to its position), or None.
  Newer corrupt checkpoints are renamed STEP.corrupt, so that their steps can be saved again."""
  found = checkpoint.restore_newest(directory, task.abstract_state, task.config.checkpoint)
  if found is None:
    return None
  step, state, data_state, corrupt = found
  loader.set_state(data_state)
  if corrupt:
    moved = checkpoint.set_aside(corrupt) if jax.process_index() == 0 else []
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("tesserax: corrupt checkpoints set aside")
    log(checkpoint.describe_fallback(corrupt, step, "resuming from")
        + "".join(f"; moved {os.path.basename(path)} aside" for path in moved))
  log(f"resumed from {directory}/{step}")
  return state


def _run(config, workdir: str, task, loader, evaluators: dict, state, log):
  """The training steps from `state` to config.num_steps (or a preemption)."""
  is_main = jax.process_index() == 0
  mesh = task.mesh
  manager = checkpoint.make_manager(os.path.join(workdir, "checkpoints"), config.checkpoint)
  start = int(jax.device_get(state["step"]))
  metrics_log = MetricsLog(workdir, start)
  progress = Progress(start, config.num_steps, config.batch_size)
  preemption = _Preemption()
  try:
    step = start
    while step < config.num_steps:
      batch = sharding.global_batch(next(loader), mesh)
      state, metrics = task.train_step(state, batch)
      step += 1
      preempted = preemption.requested or manager.reached_preemption(step)
      if step % config.log_every_steps == 0 or step == config.num_steps:
        _check_finite(state)
        scalars = jax.device_get(metrics)
        metrics_log.write(step, scalars)
        if is_main:
          log(progress.line(step, scalars))
      for name, evaluator in evaluators.items():
        if step % evaluator.every_steps == 0:
          scores = {f"eval/{name}/{k}": v for k, v in evaluator.evaluate(state["ema"]).items()}
          metrics_log.write(step, scores)
          if is_main:
            log(f"step {step} | " + " | ".join(f"{k} {v:.4f}" for k, v in scores.items()))
      if config.sample.every_steps and step % config.sample.every_steps == 0:
        save_sample_grid(task, state["ema"], os.path.join(workdir, "samples", f"{step:08d}.png"))
      if step % config.checkpoint.every_steps == 0 or step == config.num_steps or preempted:
        _check_finite(state)
        checkpoint.save(manager, step, state, loader.get_state(), force=preempted)
      if preempted:
        manager.wait_until_finished()
        log(f"preempted at step {step}: checkpoint saved, exiting")
        break
  finally:
    preemption.restore()
    manager.wait_until_finished()
    manager.close()
    metrics_log.close()
  return state


def save_sample_grid(task, params, path: str):
  """The task's sample grid of `params` as a PNG at `path` (process 0 writes)."""
  from tesserax.eval import grid
  images, nrow, upscale = task.sample_grid(params)
  if jax.process_index() == 0:
    with files.atomic_output(path) as tmp:  # save_grid makes the folder
      grid.save_grid(tmp, images, nrow=nrow, upscale=upscale)
