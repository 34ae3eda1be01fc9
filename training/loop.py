"""The training loop: one readable loop over a task's pure, jitted, sharded training step.

The task (training/task.py, chosen by `config.task`) builds the train state from shapes and
initialises it directly into its shardings, and compiles the step with the state donated. The
loop resumes (the workdir's latest checkpoint, then --init_from, then scratch) and runs the
steps with metrics, the progress line, sample grids, periodic evaluators (eval/evaluators.py),
checkpoints, the NaN/Inf guard and SIGTERM handling; a finished run calls the task's export.
"""
import json
import os
import signal
import time

import jax

from tesserax.core import checkpoint, config as config_lib, sharding
from tesserax.core.errors import TesseraxError
from tesserax.data import pipeline
from tesserax.eval import evaluators as evaluators_lib
from tesserax.training import task as task_lib


class MetricsLog:
  """metrics.jsonl plus clu writers (TensorBoard), from process 0 only."""

  def __init__(self, workdir: str, resume_step: int):
    self.active = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    if not self.active:
      return
    # A resumed run re-logs the steps after its checkpoint; drop their earlier lines.
    if os.path.exists(self.path):
      with open(self.path) as f:
        kept = [line for line in f if line.strip() and json.loads(line)["step"] <= resume_step]
      with open(self.path + ".tmp", "w") as f:
        f.writelines(kept)
      os.replace(self.path + ".tmp", self.path)
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
    if self.last_time is None:  # the first interval includes compilation
      rate = float("nan")
    else:
      rate = (step - self.last_step) / max(now - self.last_time, 1e-9)
    self.last_step, self.last_time = step, now
    eta = (self.num_steps - step) / rate if rate == rate and rate > 0 else float("nan")
    eta_text = "--" if eta != eta else time.strftime("%H:%M:%S", time.gmtime(eta))
    return (f"step {step}/{self.num_steps} | loss {scalars['loss']:.4f} | "
            f"{rate:.2f} steps/s | {rate * self.batch_size:.0f} images/s | ETA {eta_text}")


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
  bad = int(jax.device_get(state["nonfinite_step"]))
  if bad >= 0:
    raise TesseraxError(f"non-finite loss or gradients at step {bad}; stopping. The last good "
                        "checkpoint is kept; lower the learning rate or enable optim.grad_clip")


def train(config, workdir: str, init_from: str | None = None, log=print):
  """Train `config` in `workdir`; resumes from the workdir's latest checkpoint. Returns
  (task, state) at the end of training."""
  workdir = os.path.abspath(workdir)
  is_main = jax.process_index() == 0
  config_lib.check_or_write_workdir_config(config, workdir, write=False)
  mesh = sharding.make_mesh(config.mesh)
  task = task_lib.build(config, mesh)
  loader = pipeline.make_train_loader(config.data, config.batch_size, config.seed)
  manager = checkpoint.make_manager(os.path.join(workdir, "checkpoints"), config.checkpoint)

  latest = manager.latest_step()
  if latest is not None:
    state, data_state = checkpoint.restore(manager, latest, task.abstract_state)
    loader.set_state(data_state)
    log(f"resumed from {manager.directory}/{latest}")
  elif init_from:
    state = task.init()
    loaded = checkpoint.restore_params(init_from, task.abstract_state, config.checkpoint)
    state = dict(state, params=loaded["params"], ema=loaded["ema"])
    log(f"initialised params and EMA from {init_from}")
  else:
    state = task.init()
  config_lib.check_or_write_workdir_config(config, workdir, write=is_main)
  start = int(jax.device_get(state["step"]))
  metrics_log = MetricsLog(workdir, start)
  progress = Progress(start, config.num_steps, config.batch_size)
  evaluators = evaluators_lib.build_all(config, task.predict)
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
  if int(jax.device_get(state["step"])) == config.num_steps:
    task.export(state, workdir, log)
  return task, state


def save_sample_grid(task, params, path: str):
  """The task's sample grid of `params` as a PNG at `path` (process 0 writes)."""
  from tesserax.eval import grid
  images, nrow, upscale = task.sample_grid(params)
  if jax.process_index() == 0:
    grid.save_grid(path, images, nrow=nrow, upscale=upscale)
