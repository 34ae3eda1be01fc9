"""Training and sampling throughput of the DiT trainer, with TFLOP/s and MFU.

  python -m tesserax.benchmarks.throughput --model digits --out BENCH.json
  python -m tesserax.benchmarks.throughput --model dit_b2_latent --batch 256 --dtype bfloat16

Models: `digits` (configs/digits_dit.py, 16x16x1 pixels) and `dit_b2_latent` (DiT-B/2 on
32x32x4 latents, 256px ImageNet through SD-VAE; 1000 classes, learned sigma off). Data is a
fixed random batch already on the devices, so the figures are the compiled step alone.

FLOPs come from the analytical count (generators/dit.py `forward_flops`; a training step is 3x
the forward pass). MFU is given against the device's published dense peak where known (H100/H200
bf16 989 TFLOP/s) and always against a baseline measured in the same run: the TFLOP/s of a
large matmul in the same dtype on the same devices, a practical peak.
"""
import argparse
import json
import platform
import time

import jax
import numpy as np

import tesserax.tasks  # noqa: F401  (registers the diffusion task)
from tesserax.core import config as config_lib, host, sharding
from tesserax.generators import dit
from tesserax.training import task as task_lib

PUBLISHED_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def model_config(name: str, dtype: str):
  if name == "digits":
    config = config_lib.load("digits_dit")
  elif name == "dit_b2_latent":
    config = config_lib.load("digits_dit")
    config.model = dit.dit_config("B/2", input_size=32, in_channels=4, learn_sigma=False)
    config.data.resolution = 32
    config.data.num_classes = 1000
    config.optim.lr = 1e-4
  else:
    raise SystemExit(f"unknown --model {name}")
  config.model.dtype = dtype
  return config


def clock():
  """Seconds: wall-clock on an accelerator, this process's CPU time (all threads) on CPU, which
  other processes sharing the cores do not inflate; per-second figures there are per
  CPU-second, the in-run matmul baseline included, so ratios to it stay comparable."""
  return time.process_time() if jax.devices()[0].platform == "cpu" else time.perf_counter()


def timed(fn, repeats: int) -> float:
  """Median seconds (`clock`) of fn() after one warm-up (compilation) call."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = clock()
    jax.block_until_ready(fn())
    times.append(clock() - start)
  return float(np.median(times))


def matmul_tflops(dtype: str, size: int) -> float:
  """Achieved TFLOP/s of a size^3 matmul per device (the in-run baseline)."""
  mesh = sharding.make_mesh(config_lib.base_config().mesh)
  n = len(jax.devices())
  a = sharding.sharded_normal(jax.random.PRNGKey(0), (n * size, size), mesh).astype(dtype)
  b = jax.random.normal(jax.random.PRNGKey(1), (size, size)).astype(dtype)
  matmul = jax.jit(lambda a, b: a @ b)
  seconds = timed(lambda: matmul(a, b), 5)
  return 2 * size ** 3 / seconds / 1e12


def published_peak():
  kind = jax.devices()[0].device_kind
  return next((v for k, v in PUBLISHED_PEAK_TFLOPS.items() if k in kind), None)


def report(result: dict, out: str | None) -> None:
  """Print a result and append it as one JSON line to `out`."""
  print(json.dumps(result, indent=2))
  if out:
    with open(out, "a") as f:
      f.write(json.dumps(result) + "\n")


def run(args):
  config = model_config(args.model, args.dtype)
  config.batch_size = args.batch
  mesh = sharding.make_mesh(config.mesh)
  setup = task_lib.build(config, mesh)
  rng = np.random.default_rng(0)
  res, ch = config.data.resolution, config.model.in_channels
  batch = sharding.global_batch({
      "image": rng.standard_normal((args.batch, res, res, ch)).astype(np.float32),
      "label": rng.integers(0, config.model.num_classes, args.batch).astype(np.int32)}, mesh)
  holder = {"state": setup.init()}

  def step():
    holder["state"], metrics = setup.train_step(holder["state"], batch)
    return metrics["loss"]

  devices = len(jax.devices())
  train_seconds = timed(step, args.repeats)
  forward = dit.forward_flops(config.model)
  train_tflops = 3 * forward * args.batch / train_seconds / 1e12 / devices
  baseline = matmul_tflops(args.dtype, args.matmul_size)
  peak = published_peak()
  result = {
      "model": args.model, "dtype": args.dtype, "batch": args.batch, "devices": devices,
      "device_kind": jax.devices()[0].device_kind, "platform": platform.processor() or platform.machine(),
      "jax": jax.__version__, "params": dit.count_params(config.model),
      "forward_gflop_per_image": forward / 1e9,
      "train_images_per_s": args.batch / train_seconds,
      "train_tflops_per_device": train_tflops,
      "matmul_baseline_tflops_per_device": baseline,
      "train_fraction_of_matmul_baseline": train_tflops / baseline,
      "train_mfu_vs_published_peak": train_tflops / peak if peak else None,
      "sampling": []}
  from tesserax.sampling.sample import make_sampler
  labels = sharding.host_to_global(np.arange(args.batch, dtype=np.int32) % 10, mesh)
  noise = sharding.sharded_normal(jax.random.PRNGKey(0), (args.batch, res, res, ch), mesh)
  for nfe in args.nfe:
    sampler = make_sampler(setup.predictions()["velocity"], solver="euler", num_steps=nfe,
                           null_label=config.model.num_classes, mesh=mesh)
    ema = holder["state"]["ema"]
    seconds = timed(lambda: sampler(ema, noise, labels), max(1, args.repeats // 2))
    result["sampling"].append({
        "nfe": nfe, "images_per_s": args.batch / seconds, "seconds_per_batch": seconds,
        "tflops_per_device": nfe * forward * args.batch / seconds / 1e12 / devices})
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", default="digits", choices=("digits", "dit_b2_latent"))
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--nfe", type=int, nargs="+", default=[1, 8, 32])
  parser.add_argument("--matmul_size", type=int, default=2048)
  parser.add_argument("--out", default=None, help="append the result as a JSON line here")
  args = parser.parse_args()
  report(run(args), args.out)


if __name__ == "__main__":
  host.prepare(__spec__.name)
  main()
