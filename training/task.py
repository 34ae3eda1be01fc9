"""The Task interface: all the training loop knows of a recipe (DESIGN.md, "Interfaces").

A task is built from `(config, mesh)` by the constructor registered under `config.task` in
core/registry.py TASKS (tasks/ holds the built-in ones). It gives:

  abstract_state      ShapeDtypeStructs of its train state (core/train_state.py) carrying the
                      state's shardings (what checkpoints restore into)
  init()              the initial state, built directly in those shardings
  train_step(state, batch) -> (state, metrics)
                      jitted, the state donated; `batch` is {"image", "label"} of config.data,
                      global arrays split along the batch
  predict             {name: function} for evaluators and commands, e.g.
                        generate(params, labels, key, settings=None, batch_size=None) -> images
                        reconstruct(params, images) -> images
                        encode(params, images) -> latents or token ids
                      (host arrays in, host float32 NHWC images in [-1, 1] out)
  sample_grid(params) -> (images, nrow, upscale): the PNG grid of `sample.every_steps`
  export(state, workdir, log)
                      what a finished run leaves beside its checkpoints (a tokenizer
                      directory); nothing for most tasks
"""
import os
from typing import Callable, Mapping, Protocol

import jax

from tesserax.core import checkpoint, config as config_lib, registry, sharding
from tesserax.core.errors import TesseraxError


class Task(Protocol):
  config: object
  mesh: object
  abstract_state: object
  predict: Mapping[str, Callable]

  def init(self): ...

  def train_step(self, state, batch): ...

  def sample_grid(self, params): ...

  def export(self, state, workdir: str, log) -> None: ...


def build(config, mesh) -> Task:
  """The task `config.task` for `config` over `mesh`."""
  return registry.TASKS.get(config.task)(config, mesh)


def workdir_config(workdir: str):
  """The config a training workdir was written with, refused in one line without one."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise TesseraxError(f"not a training workdir (no config.json): {workdir}")
  return config_lib.from_json(path)


def _no_checkpoint(directory):
  return TesseraxError(f"workdir has no checkpoint yet: {directory}")


def newest_step(workdir: str) -> int:
  """The newest committed checkpoint step of a training workdir (without reading it)."""
  directory = os.path.join(workdir, "checkpoints")
  steps = checkpoint.all_steps(directory, workdir_config(workdir).checkpoint)
  if not steps:
    raise _no_checkpoint(directory)
  return max(steps)


def load_workdir(workdir: str, log=print):
  """(task, state) of the newest intact checkpoint of a training workdir, on all devices.

  Only the state is read (not the data iterator's position). A newer corrupt checkpoint is
  skipped with one line through `log` (process 0); with none intact, one TesseraxError."""
  config = workdir_config(workdir)
  task = build(config, sharding.make_mesh(config.mesh))
  directory = os.path.join(workdir, "checkpoints")
  found = checkpoint.restore_newest(directory, task.abstract_state, config.checkpoint, data=False)
  if found is None:
    raise _no_checkpoint(directory)
  step, state, _, corrupt = found
  if corrupt and jax.process_index() == 0:
    log(checkpoint.describe_fallback(corrupt, step, "using checkpoint"))
  return task, state
