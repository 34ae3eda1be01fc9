"""Orbax checkpoints of the full training state, with structural and integrity checks.

A checkpoint under WORKDIR/checkpoints/STEP holds three items: `state` (params, optimizer state,
EMA params, step and RNG key, as one pytree), `data` (the grain iterator state, JSON), so a
resumed run continues exactly, and `digests` (JSON), a 64-bit digest of every array of the state
and of the iterator state, taken when saving. Saves are asynchronous and atomic (orbax writes
the three items to a temporary directory and renames it on commit), so a process killed while
saving leaves the previous checkpoint restorable. The last `keep` checkpoints are kept, plus
every `keep_every`-th step.

Digests are computed on the arrays' own devices by one jitted reduction: every element's bits,
as uint32 words, are mixed with the element's position by murmur3's finaliser (a bijection) and
summed modulo 2^32, in two lanes with different seeds. Changing any one element changes both
lanes. Integer sums are exact in any order, so an array has the same digest under any sharding,
mesh or number of processes, and no process gathers the arrays: a checkpoint saved on a pod
verifies on one CPU. `save` takes the digests of the very arrays it hands to orbax, before it
returns (the next step donates them). The iterator state's digest is a sha256 of its JSON.
`restore` recomputes the digests of what it read and refuses a mismatch, naming the array; an
unreadable checkpoint (tensorstore or JSON error) is refused as well, in one line
(`CorruptCheckpoint`). Checkpoints written before digests existed restore unverified.
"""
import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from tesserax.core.errors import TesseraxError

_SEEDS = (0x9E3779B9, 0x7F4A7C15)


class CorruptCheckpoint(TesseraxError):
  """A checkpoint that does not restore to what was saved: unreadable, or a digest mismatch."""

  def __init__(self, step: int, directory, reason: str):
    super().__init__(f"checkpoint {step} in {directory} is corrupt ({reason})")
    self.step, self.directory, self.reason = step, os.fspath(directory), reason


def make_manager(directory: str, checkpoint_config, read_only: bool = False):
  options = ocp.CheckpointManagerOptions(
      max_to_keep=checkpoint_config.keep,
      keep_period=checkpoint_config.keep_every or None,
      enable_async_checkpointing=checkpoint_config.use_async and not read_only,
      create=not read_only,
      read_only=read_only,
      cleanup_tmp_directories=not read_only)
  handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
              "digests": ocp.JsonCheckpointHandler()}
  return ocp.CheckpointManager(os.path.abspath(directory), item_handlers=handlers,
                               options=options)


def all_steps(directory: str, checkpoint_config) -> list:
  """The committed checkpoint steps under `directory` (none when it does not exist)."""
  if not os.path.isdir(directory):
    return []
  manager = make_manager(directory, checkpoint_config, read_only=True)
  steps = manager.all_steps()
  manager.close()
  return list(steps)


def _fmix(x):
  """murmur3's 32-bit finaliser: a bijection of uint32 that spreads every input bit."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x85EBCA6B)
  x = x ^ (x >> 13)
  x = x * jnp.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


def _words(x):
  """The bits of every element of `x` as uint32 (a trailing axis of 2 for 64-bit types)."""
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  bits = 8 * x.dtype.itemsize
  if bits >= 32:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  return jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{bits}")).astype(jnp.uint32)


def _positions(shape):
  """The row-major index of every element of an array of `shape`, modulo 2^32."""
  index, stride = jnp.zeros(shape, jnp.uint32), 1
  for axis in reversed(range(len(shape))):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride % 2**32)
    stride *= shape[axis]
  return index


@jax.jit
def _array_digest(x):
  words = _words(x)
  positions = _positions(words.shape)
  return jnp.stack([jnp.sum(_fmix(words ^ _fmix(positions ^ jnp.uint32(seed))), dtype=jnp.uint32)
                    for seed in _SEEDS])


def state_digests(state) -> dict:
  """{array path: 16 hex digits} of every array of a (possibly sharded) state. One program per
  array shape, dtype and sharding: the parameters, EMA and optimizer moments share them, and so
  do the states of different runs of one network (a whole-state program compiled in 2-3 s for
  every new state layout)."""
  leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  lanes = jax.device_get([_array_digest(x) for _, x in leaves])
  return {_path_name(path): "".join(f"{int(v):08x}" for v in value)
          for (path, _), value in zip(leaves, lanes)}


def data_digest(data_state) -> str:
  return hashlib.sha256(json.dumps(data_state, sort_keys=True).encode()).hexdigest()[:16]


def save(manager, step: int, state, data_state, force: bool = False) -> None:
  digests = {"state": state_digests(state), "data": data_digest(data_state)}
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                             data=ocp.args.JsonSave(data_state),
                                             digests=ocp.args.JsonSave(digests)),
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
  metadata = manager.item_metadata(step)["state"]
  if metadata is None:
    raise FileNotFoundError(f"no state/_METADATA in {manager.directory}/{step}")
  saved = _flat_shapes(metadata.tree)
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


def _damaged(error: BaseException) -> bool:
  """Whether `error` reads as damaged checkpoint bytes rather than a failure of the machine
  (out of memory, an accelerator, disk I/O), which keeps its own error."""
  while error is not None:
    machine = isinstance(error, OSError) and not isinstance(error, FileNotFoundError)
    if machine or isinstance(error, (MemoryError, RuntimeError)):
      return False
    error = error.__cause__
  return True


def _first_line(error: BaseException) -> str:
  """The first line of the innermost cause of `error` (tensorstore's own message)."""
  while error.__cause__ is not None:
    error = error.__cause__
  line = (str(error).strip().splitlines() or [""])[0]
  return f"{type(error).__name__}: {line if len(line) <= 160 else line[:157] + '...'}"


def restore(manager, step: int, abstract_state, what: str = "checkpoint", data: bool = True):
  """(state, data_state) restored into the shardings carried by `abstract_state`
  (ShapeDtypeStructs with shardings), so a run may resume on a different mesh. With
  `data=False` the iterator state is neither read nor checked (None). An unreadable checkpoint
  or a digest mismatch raises CorruptCheckpoint."""
  directory = manager.directory
  items = {"state": ocp.args.StandardRestore(abstract_state)}
  if data:
    items["data"] = ocp.args.JsonRestore()
  verify = os.path.isdir(os.path.join(directory, str(step), "digests"))
  if verify:
    items["digests"] = ocp.args.JsonRestore()
  try:
    check_compatible(manager, step, abstract_state, what)
    restored = manager.restore(step, args=ocp.args.Composite(**items))
    mismatch = _mismatch(restored["digests"], restored, data) if verify else None
  except Exception as e:  # tensorstore, JSON and file errors of damaged bytes
    if isinstance(e, TesseraxError) or not _damaged(e):
      raise
    raise CorruptCheckpoint(step, directory, f"unreadable: {_first_line(e)}") from None
  if mismatch:
    raise CorruptCheckpoint(step, directory, f"{mismatch}: digest mismatch")
  return restored["state"], restored["data"] if data else None


def _mismatch(saved: dict, restored: dict, data: bool):
  """The first restored array (or the iterator state) whose digest differs from `saved`."""
  for name, digest in state_digests(restored["state"]).items():
    if saved["state"].get(name) != digest:
      return f"array {name}"
  if data and saved["data"] != data_digest(restored["data"]):
    return "data iterator state"
  return None


def restore_newest(directory: str, abstract_state, checkpoint_config, data: bool = True,
                   what: str = "checkpoint"):
  """(step, state, data_state, corrupt) of the newest intact checkpoint under `directory`,
  where `corrupt` lists the CorruptCheckpoint errors of the newer ones; None when there is no
  checkpoint. With none intact, one TesseraxError says what was found."""
  if not os.path.isdir(directory):
    return None
  manager = make_manager(directory, checkpoint_config, read_only=True)
  corrupt = []
  try:
    for step in sorted(manager.all_steps(), reverse=True):
      try:
        state, data_state = restore(manager, step, abstract_state, what, data=data)
        return step, state, data_state, corrupt
      except CorruptCheckpoint as e:
        corrupt.append(e)
  finally:
    manager.close()
  if corrupt:
    found = "; ".join(f"{e.step} ({e.reason})" for e in corrupt)
    raise TesseraxError(f"no intact {what} in {manager.directory}: {found}")
  return None


def describe_fallback(corrupt, step: int, action: str) -> str:
  """'checkpoint 8 is corrupt (...); resuming from 6': one line about a fallback."""
  return "; ".join([f"checkpoint {e.step} is corrupt ({e.reason})" for e in corrupt]
                   + [f"{action} {step}"])


def set_aside(corrupt) -> list:
  """Rename corrupt checkpoints STEP to STEP.corrupt (STEP.corrupt2, ...) beside them, where
  orbax neither lists nor deletes them, so the run may save those steps again. Returns the
  new paths."""
  moved = []
  for e in corrupt:
    path = os.path.join(e.directory, str(e.step))
    target, n = path + ".corrupt", 1
    while os.path.exists(target):
      n += 1
      target = f"{path}.corrupt{n}"
    os.rename(path, target)
    moved.append(target)
  return moved


def restore_params(directory: str, abstract_state, checkpoint_config, log=print):
  """Params and EMA of the newest intact checkpoint under `directory` (for --init_from)."""
  if not os.path.isdir(directory):
    raise TesseraxError(f"--init_from directory does not exist: {directory}")
  found = restore_newest(directory, abstract_state, checkpoint_config, data=False,
                         what="--init_from checkpoint")
  if found is None:
    raise TesseraxError(f"--init_from directory holds no checkpoint: {directory}")
  step, state, _, corrupt = found
  if corrupt:
    log(describe_fallback(corrupt, step, "initialising from"))
  return state
