"""Orbax checkpoints of the full training state, with structural checks before restoring.

A checkpoint under WORKDIR/checkpoints/STEP holds two items: `state` (params, optimizer state,
EMA params, step and RNG key, as one pytree) and `data` (the grain iterator state, JSON), so a
resumed run continues exactly. Saves are asynchronous and atomic (orbax writes to a temporary
directory and renames on commit), so a process killed while saving leaves the previous
checkpoint restorable. The last `keep` checkpoints are kept, plus every `keep_every`-th step.
"""
import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from tesserax.core.errors import TesseraxError


def make_manager(directory: str, checkpoint_config, read_only: bool = False):
  options = ocp.CheckpointManagerOptions(
      max_to_keep=checkpoint_config.keep,
      keep_period=checkpoint_config.keep_every or None,
      enable_async_checkpointing=checkpoint_config.use_async and not read_only,
      create=not read_only,
      read_only=read_only,
      cleanup_tmp_directories=not read_only)
  handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()}
  return ocp.CheckpointManager(os.path.abspath(directory), item_handlers=handlers,
                               options=options)


def save(manager, step: int, state, data_state, force: bool = False) -> None:
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                             data=ocp.args.JsonSave(data_state)),
               force=force)


def _path_name(path) -> str:
  """'a/b/0/c' for a tree path (orbax stores integer dict keys as strings)."""
  return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def _flat_shapes(tree) -> dict:
  return {_path_name(path): (tuple(leaf.shape), np.dtype(leaf.dtype))
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def check_compatible(manager, step: int, abstract_state, what: str) -> None:
  """Refuse a checkpoint whose arrays differ in names, shapes or dtypes from `abstract_state`,
  listing the differences."""
  saved = _flat_shapes(manager.item_metadata(step)["state"].tree)
  expected = _flat_shapes(abstract_state)
  missing = sorted(set(expected) - set(saved))
  extra = sorted(set(saved) - set(expected))
  changed = [f"{k}: {saved[k][0]} in checkpoint vs {expected[k][0]} here"
             for k in sorted(set(saved) & set(expected)) if saved[k] != expected[k]]
  problems = ([f"{len(changed)} arrays differ ({'; '.join(changed[:3])})"] if changed else []) + \
             ([f"missing {', '.join(missing[:3])}"] if missing else []) + \
             ([f"unexpected {', '.join(extra[:3])}"] if extra else [])
  if problems:
    raise TesseraxError(f"{what} (step {step} in {manager.directory}) is of a different model: "
                        + "; ".join(problems))


def restore(manager, step: int, abstract_state, what: str = "checkpoint"):
  """(state, data_state) restored into the shardings carried by `abstract_state`
  (ShapeDtypeStructs with shardings), so a run may resume on a different mesh."""
  check_compatible(manager, step, abstract_state, what)
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
  return restored["state"], restored["data"]


def restore_params(directory: str, abstract_state, checkpoint_config):
  """Params and EMA of the latest checkpoint under `directory` (for --init_from)."""
  if not os.path.isdir(directory):
    raise TesseraxError(f"--init_from directory does not exist: {directory}")
  manager = make_manager(directory, checkpoint_config, read_only=True)
  step = manager.latest_step()
  if step is None:
    raise TesseraxError(f"--init_from directory holds no checkpoint: {directory}")
  state, _ = restore(manager, step, abstract_state, "--init_from checkpoint")
  manager.close()
  return state
