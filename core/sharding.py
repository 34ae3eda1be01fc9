"""Device mesh ("data", "fsdp", "tensor") and logical-axis sharding rules.

Parameters carry logical axis names (nn/ layers); `param_shardings` maps them onto the
mesh with `RULES`, the MaxText/maxdiffusion way. The batch is split over ("data", "fsdp"), so
with `mesh.fsdp = 1` the run is pure data parallel and with `mesh.fsdp = -1` (all devices) it is
FSDP: the same batch split, with every `embed` dimension of the parameters, optimizer state and
EMA sharded over the fsdp axis. `mesh.tensor > 1` adds Megatron-style tensor parallelism over
heads and MLP width.

A dimension that the mesh axis does not divide stays replicated rather than failing, so tiny
test models run on any mesh.
"""
import functools
import math
import warnings

import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from tesserax.core.errors import TesseraxError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical name -> mesh axis (None: replicated).
RULES = (
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", None),
    ("conv_in", None),
    ("conv_out", None),
)


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, int, int]:
  """(data, fsdp, tensor): fsdp and tensor from the config (fsdp -1 = all that tensor leaves),
  data = the rest."""
  tensor = int(mesh_config.tensor)
  fsdp = int(mesh_config.fsdp)
  if tensor < 1 or num_devices % tensor:
    raise TesseraxError(f"mesh.tensor={tensor} does not divide the {num_devices} devices")
  if fsdp == -1:
    fsdp = num_devices // tensor
  if fsdp < 1 or num_devices % (fsdp * tensor):
    raise TesseraxError(
        f"mesh.fsdp={fsdp} x mesh.tensor={tensor} does not divide the {num_devices} devices")
  return num_devices // (fsdp * tensor), fsdp, tensor


def make_mesh(mesh_config, devices=None) -> Mesh:
  """A mesh over all (global) devices with Auto axis types (jax.sharding.AxisType.Auto: the
  compiler propagates shardings, as jax.jit's sharding-in-types guide describes)."""
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_config, len(devices))
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES,
              axis_types=(AxisType.Auto,) * len(MESH_AXES))


def local_mesh() -> Mesh:
  """A data-parallel mesh over this process's devices only (work each process does on its
  own: encoding its shards of a latent cache, reconstructing an evaluation set)."""
  return make_mesh(ml_collections.ConfigDict({"fsdp": 1, "tensor": 1}), jax.local_devices())


def logical_to_spec(names, shape, mesh: Mesh, rules=RULES) -> P:
  """PartitionSpec for an array with logical axis `names` (None or a tuple) and `shape`."""
  if names is None:
    return P()
  table = dict(rules)
  used, spec = set(), []
  for name, dim in zip(names, shape):
    axis = table.get(name)
    if axis is None or axis in used or mesh.shape[axis] == 1 or dim % mesh.shape[axis]:
      spec.append(None)
    else:
      used.add(axis)
      spec.append(axis)
  return P(*spec)


# Activations' logical names -> mesh axes: Megatron's layout under tensor parallelism. The
# residual stream is split over the batch alone (replicated over "tensor"), heads and MLP width
# over "tensor"; the parameters' "embed" (fsdp) is never an activation's.
ACTIVATION_RULES = (
    ("batch", BATCH_AXES),
    ("heads", ("tensor",)),
    ("mlp", ("tensor",)),
)


def constrain(x, names):
  """x held in the layout of its logical `names` (ACTIVATION_RULES) where the mesh of the trace
  (`jax.sharding.use_abstract_mesh`, which the diffusion task sets around its network) has a
  tensor axis over 1; elsewhere x itself. Without these, XLA's sharding propagation carries the
  adaLN and tensor-parallel layouts into the residual stream and all-gathers activations over
  "tensor" at every Linear (benchmarks/pod_memory.py: DiT-B/2 at 8 devices, 16 GiB of
  all-gathers per step). A dimension the axes do not divide stays unconstrained."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or dict(mesh.shape).get("tensor", 1) == 1:
    return x
  table, spec = dict(ACTIVATION_RULES), []
  for name, dim in zip(names, x.shape):
    axes = tuple(a for a in table.get(name, ()) if mesh.shape[a] > 1)
    if not axes:
      spec.append(None)
    else:
      spec.append(P.UNCONSTRAINED if dim % math.prod(mesh.shape[a] for a in axes) else axes)
  return jax.lax.with_sharding_constraint(x, P(*spec))


def logical_names(abstract_state):
  """Pure-dict tree of the logical names (or None) of an NNX state's variables."""
  from flax import nnx
  names = jax.tree.map(lambda v: v.get_metadata().get("out_sharding"), abstract_state,
                       is_leaf=lambda v: isinstance(v, nnx.Variable))
  return nnx.to_pure_dict(names)


def _is_names(n) -> bool:
  return n is None or isinstance(n, tuple)


def unsplit_dimensions(abstract_params, names, mesh, rules=RULES) -> dict[str, list[int]]:
  """{mesh axis: sorted sizes of the parameter dimensions `rules` give it but that it does not
  divide}, over axes of more than one device and the arrays that axis then splits nowhere: they
  stay whole on every device of the axis (DiT-XL/2's width 1,152 under fsdp=256; LightningDiT-
  1p6B's SwiGLU width 4,778 under tensor=4: BENCHMARKS.md, "Pod scale on paper")."""
  table, found = dict(rules), {}

  def check(n, x):
    if n is None:
      return
    spec = logical_to_spec(n, x.shape, mesh, rules)
    for name, dim in zip(n, x.shape):
      axis = table.get(name)
      if axis and mesh.shape[axis] > 1 and dim % mesh.shape[axis] and axis not in spec:
        found.setdefault(axis, set()).add(dim)

  jax.tree.map(check, names, abstract_params, is_leaf=_is_names)
  return {axis: sorted(sizes) for axis, sizes in found.items()}


def param_shardings(abstract_params, names, mesh: Mesh):
  """NamedShardings for a pure-dict tree of ShapeDtypeStructs given its logical names; warns
  once per mesh axis that leaves parameters whole (`unsplit_dimensions`)."""
  for axis, sizes in unsplit_dimensions(abstract_params, names, mesh).items():
    warnings.warn(
        f"mesh.{axis}={mesh.shape[axis]} does not divide parameter dimensions of size "
        f"{', '.join(map(str, sizes))}: those parameters stay whole on every device of the axis; "
        f"a mesh.{axis} that divides them shards them", stacklevel=2)
  return jax.tree.map(
      lambda n, x: NamedSharding(mesh, logical_to_spec(n, x.shape, mesh)),
      names, abstract_params, is_leaf=_is_names)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Leading (batch) dimension split over ("data", "fsdp"), the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """Assemble a global batch from each process's contiguous slice of it."""
  return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), v)
          for k, v in local_batch.items()}


def host_to_global(array: np.ndarray, mesh: Mesh) -> jax.Array:
  """A host array, identical on every process, as a global array split along the batch."""
  array = np.asarray(array)
  return jax.make_array_from_callback(array.shape, batch_sharding(mesh, array.ndim),
                                      lambda index: array[index])


def global_to_host(array: jax.Array) -> np.ndarray:
  """The full value of a (possibly multi-process) global array on every process."""
  if array.is_fully_addressable:
    return np.asarray(jax.device_get(array))
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def sharded_normal(key, shape, mesh: Mesh) -> jax.Array:
  """Standard normal noise generated directly in the batch sharding (the same values on any
  mesh, with jax_threefry_partitionable)."""
  return _normal_draw(tuple(shape), batch_sharding(mesh, len(shape)))(key)


@functools.lru_cache(maxsize=None)
def _normal_draw(shape, sharding):
  """One compiled draw per (shape, sharding): a fresh jit per call recompiled each batch of
  every sampling call (0.7 s each on 2 CPU cores)."""
  return jax.jit(lambda k: jax.random.normal(k, shape), out_shardings=sharding)


def batch_shards(mesh: Mesh | None) -> int:
  """How many ways a batch is split over `mesh` (1 without a mesh)."""
  return 1 if mesh is None else mesh.shape[BATCH_AXES[0]] * mesh.shape[BATCH_AXES[1]]


def pad_rows(x: np.ndarray, size: int) -> np.ndarray:
  """x with its leading dimension padded to `size` rows by repeating its last row."""
  x = np.asarray(x)
  return np.concatenate([x, np.repeat(x[-1:], size - len(x), 0)]) if len(x) < size else x


def map_batched(fn, arrays, batch_size: int, mesh: Mesh | None, *, fixed_shape: bool = True,
                with_index: bool = False):
  """fn over host `arrays` (a tuple, equal leading sizes) in batches, on the host again.

  The one "pad the batch to the mesh, run, unpad" helper. Batches hold `batch_size` rows
  rounded up to a multiple of the mesh's batch shards; a short last batch is padded by
  repeating its last row, to the full batch (`fixed_shape`, one compiled shape) or to the next
  multiple of the shards (its own shape: a sampler whose noise is drawn at the batch's shape).
  Each batch is split along ("data", "fsdp") of `mesh` (every process holds all of `arrays`)
  or, with mesh None, passed as host arrays. `fn(*batch)`, or `fn(index, *batch)` with
  `with_index`, returns an array or a tuple of arrays, gathered, unpadded and concatenated.
  """
  shards = batch_shards(mesh)
  batch_size = -(-batch_size // shards) * shards
  total = len(arrays[0])
  outputs = []
  for index, start in enumerate(range(0, total, batch_size)):
    rows = min(batch_size, total - start)
    size = batch_size if fixed_shape else -(-rows // shards) * shards
    batch = [pad_rows(x[start:start + rows], size) for x in arrays]
    if mesh is not None:
      batch = [host_to_global(x, mesh) for x in batch]
    out = fn(index, *batch) if with_index else fn(*batch)
    to_host = global_to_host if mesh is not None else np.asarray
    outputs.append(jax.tree.map(lambda y: to_host(y)[:rows], out))
  return jax.tree.map(lambda *ys: np.concatenate(ys), *outputs)
