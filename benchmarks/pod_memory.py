"""Pod scale on paper: per-device memory and collective traffic of one training step.

  python -m tesserax.benchmarks.pod_memory                       # the BENCHMARKS.md table
  python -m tesserax.benchmarks.pod_memory --models dit_xl2 --devices 8,64 --meshes dp,fsdp

Each (model, device count, mesh) compiles the recipe's jitted training step (forward,
backward, AdamW, EMA, NaN guard) on fake CPU devices (`--xla_force_host_platform_device_count`)
at the recipe's published global batch, without running it, and reads:
  - XLA's memory analysis of the compiled step per device: arguments (params, EMA, optimizer
    state, batch), temporaries (activations and workspaces), outputs not aliased to the
    donated arguments;
  - the collectives of the partitioned HLO (all-reduce, all-gather, reduce-scatter,
    all-to-all, collective-permute) and the bytes each moves per device per step (its result
    size; an all-reduce counted twice, the reduce-scatter + all-gather ring);
  - a direct count: each state leaf's bytes divided by the number of devices its sharding
    splits it over (core/sharding.py's logical-axis rules), which the argument bytes must
    match within 5% (the rest is the batch).
Meshes: dp (data parallel), fsdp (parameters, EMA and optimizer state sharded over all
devices), fsdp_tp (FSDP x 4-way tensor parallel). Chips: a layout fits when arguments +
temporaries + outputs fit the chip's HBM; the communication time is the collective bytes over
the chip's interconnect bandwidth (published per-chip figures, CHIPS), a lower bound that
ignores overlap with compute. The CPU compiler's buffer assignment and fusion differ from the
TPU/GPU compilers', so temporaries are an estimate; parameter and optimizer figures are exact.
"""
import argparse
import os
import re
import sys

from tesserax.core import host

# name: (recipe, model size override or None)
MODELS = {
    "dit_xl2": ("dit_xl2", None),
    "lightningdit_xl1": ("lightningdit_xl1:800ep", None),
    "lightningdit_1p6b": ("lightningdit_xl1:800ep", "1p6B/1"),
    "dit_s2": ("dit_xl2", "S/2"),
}
MESHES = {"dp": dict(fsdp=1, tensor=1), "fsdp": dict(fsdp=-1, tensor=1),
          "fsdp_tp": dict(fsdp=-1, tensor=4)}
# name: (HBM bytes, interconnect bytes/s per chip, one direction), from the vendors' specs:
# TPU v5e 16 GiB HBM2e, 1,600 Gbps ICI; TPU v5p 95 GiB HBM2e, 4,800 Gbps ICI; H100 SXM
# 80 GiB HBM3, 900 GB/s NVLink (both directions) inside a node.
CHIPS = {"TPU v5e": (16 * 2**30, 1600e9 / 8), "TPU v5p": (95 * 2**30, 4800e9 / 8),
         "H100": (80 * 2**30, 450e9)}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
               "collective-permute")
DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1,
               "f64": 8, "s64": 8, "u64": 8}


def collective_bytes(hlo_text: str) -> dict:
  """{collective: bytes per device per step} over a partitioned HLO module: each op's result
  size (an all-reduce twice: a reduce-scatter and an all-gather), times the trip counts of
  the while loops it runs in (the scanned blocks)."""
  text = re.sub(r"/\*.*?\*/", "", hlo_text)
  op = re.compile(r"=\s*(\(?[^=]*?\)?)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(")
  computations, calls, current, entry = {}, {}, None, None
  for line in text.splitlines():
    if line and not line.startswith(" ") and line.rstrip().endswith("{"):
      current = line.split()[1] if line.startswith("ENTRY") else line.split()[0]
      entry = current if line.startswith("ENTRY") else entry
      computations[current], calls[current] = dict.fromkeys(COLLECTIVES, 0), []
      continue
    if current is None:
      continue
    match = op.search(line)
    if match:
      size = sum(DTYPE_BYTES[dtype] * product(dims)
                 for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", match.group(1))
                 if dtype in DTYPE_BYTES)
      computations[current][match.group(2)] += size * (2 if match.group(2) == "all-reduce" else 1)
    trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
    for kind, callee in re.findall(r"(body|to_apply|calls)=(%[\w.\-]+)", line):
      calls[current].append((callee, int(trips.group(1)) if kind == "body" and trips else 1))
    for group in re.findall(r"branch_computations=\{([^}]*)\}", line):
      calls[current].extend((callee.strip(), 1) for callee in group.split(","))

  def total(name, times):
    sums = {k: v * times for k, v in computations.get(name, {}).items()}
    for callee, trips in calls.get(name, []):
      for k, v in total(callee, times * trips).items():
        sums[k] = sums.get(k, 0) + v
    return sums

  return {k: v for k, v in total(entry, 1).items() if k in COLLECTIVES}


def product(dims: str) -> int:
  result = 1
  for d in filter(None, dims.split(",")):
    result *= int(d)
  return result


def direct_state_bytes(abstract_state) -> int:
  """Bytes per device of the train state from its shardings: each leaf's size divided by the
  number of devices it is split over."""
  import jax
  import numpy as np
  total = 0
  for leaf in jax.tree.leaves(abstract_state):
    shard = leaf.sharding.shard_shape(leaf.shape)
    total += int(np.prod(shard, dtype=np.int64)) * leaf.dtype.itemsize
  return total


def measure(name: str, devices: int, mesh_name: str, batch_size: int | None) -> dict:
  import jax
  import numpy as np
  from tesserax.core import config as config_lib, sharding
  from tesserax.generators import dit
  from tesserax.training import task as task_lib
  recipe, size = MODELS[name]
  config = config_lib.load(recipe)
  if size is not None:
    config.model = (dit.lightningdit_config(size) if "lightningdit" in name
                    else dit.dit_config(size))
    config.model.dtype = "bfloat16" if "lightningdit" in name else "float32"
  config.mesh = MESHES[mesh_name]
  config.batch_size = batch_size or config.batch_size
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:devices])
  task = task_lib.build(config, mesh)
  shape = (config.data.resolution, config.data.resolution, config.model.in_channels)
  batch = {"image": jax.ShapeDtypeStruct((config.batch_size, *shape), np.float32,
                                         sharding=sharding.batch_sharding(mesh, 4)),
           "label": jax.ShapeDtypeStruct((config.batch_size,), np.int32,
                                         sharding=sharding.batch_sharding(mesh, 1))}
  rep = sharding.replicated(mesh)
  step = jax.jit(task._train_step,
                 in_shardings=(task.state_shardings, {k: v.sharding for k, v in batch.items()},
                               None, None),
                 out_shardings=(task.state_shardings, rep), donate_argnums=(0,))
  compiled = step.lower(task.abstract_state, batch, None, None).compile()
  memory = compiled.memory_analysis()
  params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(task.abstract_state["params"]))
  batch_bytes = sum(int(np.prod(v.sharding.shard_shape(v.shape))) * v.dtype.itemsize
                    for v in batch.values())
  return {"model": name, "devices": devices, "mesh": mesh_name,
          "mesh_shape": dict(zip(mesh.axis_names, mesh.devices.shape)),
          "global_batch": config.batch_size, "params": params,
          "argument_bytes": memory.argument_size_in_bytes,
          "temp_bytes": memory.temp_size_in_bytes,
          "output_bytes": memory.output_size_in_bytes - memory.alias_size_in_bytes,
          "direct_state_bytes": direct_state_bytes(task.abstract_state),
          "batch_bytes": batch_bytes,
          "collectives": collective_bytes(compiled.as_text())}


def report(row: dict) -> str:
  gib = lambda b: b / 2**30
  total = row["argument_bytes"] + row["temp_bytes"] + row["output_bytes"]
  comm = sum(row["collectives"].values())
  direct = row["direct_state_bytes"] + row["batch_bytes"]
  fits = ", ".join(f"{chip} {'fits' if total <= hbm else 'no'} "
                   f"({1e3 * comm / bandwidth:.0f} ms comm)"
                   for chip, (hbm, bandwidth) in CHIPS.items())
  return (f"| {row['model']} | {row['devices']} | {row['mesh']} | {row['global_batch']} | "
          f"{gib(row['argument_bytes']):.2f} | {gib(direct):.2f} | {gib(row['temp_bytes']):.2f} | "
          f"{gib(total):.2f} | {comm / 2**20:.0f} | {fits} |")


HEADER = ("| model | devices | mesh | global batch | arguments GiB/device | direct count GiB | "
          "temporaries GiB | total GiB | collectives MiB/step | per chip |\n"
          "|---|---|---|---|---|---|---|---|---|---|")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--models", default="dit_xl2,lightningdit_xl1,lightningdit_1p6b",
                      help=f"comma-separated, from {', '.join(MODELS)}")
  parser.add_argument("--devices", default="8,64,256", help="comma-separated device counts")
  parser.add_argument("--meshes", default="dp,fsdp,fsdp_tp",
                      help=f"comma-separated, from {', '.join(MESHES)}")
  parser.add_argument("--batch", type=int, default=None,
                      help="global batch (default: each recipe's published one)")
  args = parser.parse_args(argv)
  counts = [int(n) for n in args.devices.split(",")]
  os.environ.update(host.xla_flags_env(
      os.environ, f"--xla_force_host_platform_device_count={max(counts)}"))
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import tesserax.tasks  # noqa: F401  (registers the diffusion task)
  print(HEADER, flush=True)
  for name in args.models.split(","):
    if name not in MODELS:
      sys.exit(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    for devices in counts:
      for mesh_name in args.meshes.split(","):
        row = measure(name, devices, mesh_name, args.batch)
        direct = row["direct_state_bytes"] + row["batch_bytes"]
        agreement = abs(row["argument_bytes"] - direct) / direct
        print(report(row) + ("" if agreement <= 0.05 else
                             f" (arguments differ from the direct count by {100 * agreement:.0f}%)"),
              flush=True)


if __name__ == "__main__":
  main()
