"""Training and sampling speed of DiT-XL/2 and LightningDiT-XL/1, with TFLOP/s and MFU.

  python -m tesserax.benchmarks.dit_family                  # CPU: small sizes, a few minutes
  python -m tesserax.benchmarks.dit_family --models dit_xl2,lightningdit_xl1 --batch 64 \\
      --sample_batch 64 --dtype bfloat16 --out bench.jsonl   # an accelerator

Models run their recipes (configs/dit_xl2.py, configs/lightningdit_xl1.py:800ep): objective,
optimizer and sampler settings. On CPU, where XL is skipped by default, `dit_s4` and
`lightningdit_s2` are the same recipes at width 384 and 64 tokens. Data is a fixed random
latent batch already on the devices, so the figures are the compiled step alone.

- Training: images/s per device; TFLOP/s per device from the analytical forward count
  (generators/dit.py `forward_flops`, which reproduces DiT's GMACs; Peebles & Xie
  2023) times 3 per step (model FLOPs: remat's recomputation is not counted); MFU against the
  published dense bf16 peak where known (H100/H200 989 TFLOP/s) and against an in-run matmul
  baseline (benchmarks/throughput.py).
- Sampling at 1, 2, 4, 8, 32 and 250 NFE with the published settings: DiT's DDPM sampler
  respaced to NFE steps with cfg 1.5 on 3 channels; LightningDiT's Euler with shift 1/0.3 and
  cfg 6.7 inside the interval (0, 0.875]. Latency at batch 1, throughput at --sample_batch.
  Guided evaluations run on a doubled batch; the FLOP count includes that.
- Published anchors are printed with the results: DiT-XL/2 ~108 img/s on one A100 (fast-DiT,
  batch 128, fp16), LightningDiT-XL/1 ~285 img/s per H800 (8 GPUs, bf16).
"""
import argparse
import json
import platform

import jax
import numpy as np

import tesserax.tasks  # noqa: F401  (registers the diffusion task)
from tesserax.benchmarks.throughput import matmul_tflops, published_peak, timed
from tesserax.core import config as config_lib, host, sharding
from tesserax.generators import dit
from tesserax.sampling.ddpm_sampler import make_ddpm_sampler
from tesserax.sampling.sample import make_sampler
from tesserax.sampling.timesteps import time_grid
from tesserax.training import task as task_lib

# name: (recipe, model config or None for the recipe's own)
MODELS = {
    "dit_xl2": ("dit_xl2", None),
    "lightningdit_xl1": ("lightningdit_xl1:800ep", None),
    "dit_s4": ("dit_xl2", lambda: dit.dit_config("S/4")),
    "lightningdit_s2": ("lightningdit_xl1:800ep", lambda: dit.lightningdit_config("S/2")),
}
ANCHORS = {
    "dit": "DiT-XL/2: ~108 img/s on 1x A100-80GB, batch 128, fp16 AMP, grad-ckpt, latents "
           "(fast-DiT; ~24% MFU of 312 TF); 26 img/s/GPU on 8x A100 TF32 with online VAE",
    "lightningdit": "LightningDiT-XL/1: ~285 img/s per H800 (8 GPUs, 64 epochs in ~10 h, bf16, "
                    "torch.compile; ~20% MFU of 989 TF); ~166 img/s/GPU in docs/log.txt",
}


def model_config(name: str, dtype: str):
  recipe, model = MODELS[name]
  config = config_lib.load(recipe)
  if model is not None:
    config.model = model()
  config.model.dtype = dtype
  config.data.resolution = config.model.input_size
  return config


def sampler_for(setup, nfe: int):
  """(sample_fn(params, noise, labels), guided network evaluations per sample) with the
  recipe's published sampler at `nfe` evaluations."""
  c = setup.config
  if c.objective.name == "ddpm":
    sample = make_ddpm_sampler(setup.predictions()["epsilon"], method="ddpm", num_steps=nfe,
                               cfg_scale=c.sample.cfg_scale,
                               guided_channels=c.sample.guided_channels,
                               null_label=c.model.num_classes)
    key = jax.random.PRNGKey(0)
    return (lambda p, x, y: sample(p, x, y, key)), nfe
  lo, hi = c.sample.interval
  sample = make_sampler(setup.predictions()["velocity"], solver="euler", num_steps=nfe, shift=c.sample.shift,
                        cfg_scale=c.sample.cfg_scale, interval=(lo, hi),
                        null_label=c.model.num_classes, mesh=setup.mesh)
  times = np.asarray(time_grid(nfe, c.sample.shift))[:-1]
  return sample, int(np.sum((times > lo) & (times <= hi)))


def run_model(name, args):
  config = model_config(name, args.dtype)
  config.batch_size = args.batch
  mesh = sharding.make_mesh(config.mesh)
  setup = task_lib.build(config, mesh)
  devices = len(jax.devices())
  shape = (config.model.input_size, config.model.input_size, config.model.in_channels)
  rng = np.random.default_rng(0)
  batch = sharding.global_batch({
      "image": rng.standard_normal((args.batch,) + shape).astype(np.float32),
      "label": rng.integers(0, config.model.num_classes, args.batch).astype(np.int32)}, mesh)
  holder = {"state": setup.init()}

  def step():
    holder["state"], metrics = setup.train_step(holder["state"], batch)
    return metrics["loss"]

  train_seconds = timed(step, args.repeats)
  forward = dit.forward_flops(config.model)
  train_tflops = 3 * forward * args.batch / train_seconds / 1e12 / devices
  peak = published_peak()
  result = {
      "model": name, "recipe": MODELS[name][0], "dtype": args.dtype, "devices": devices,
      "device_kind": jax.devices()[0].device_kind, "params": dit.count_params(config.model),
      "forward_gflop_per_image": forward / 1e9, "train_batch": args.batch,
      "train_images_per_s_per_device": args.batch / train_seconds / devices,
      "train_tflops_per_device": train_tflops,
      "train_mfu_vs_published_peak": train_tflops / peak if peak else None,
      "train_fraction_of_matmul_baseline": train_tflops / args.baseline,
      "published_anchor": ANCHORS["dit" if name.startswith("dit") else "lightningdit"],
      "sampling": []}
  params = holder["state"]["ema"]
  for nfe in args.nfe:
    entry = {"nfe": nfe}
    sample, guided = sampler_for(setup, nfe)
    for label, size in (("latency", 1), ("throughput", args.sample_batch)):
      padded = -(-size // devices) * devices  # the batch is split over the devices
      noise = sharding.sharded_normal(jax.random.PRNGKey(1), (padded,) + shape, mesh)
      labels = sharding.host_to_global(np.arange(padded, dtype=np.int32) % 1000, mesh)
      seconds = timed(lambda: sample(params, noise, labels), 1 if nfe >= 32 else 2)
      evaluations = nfe + guided  # a guided evaluation runs the network on 2x the batch
      if label == "latency":
        entry["latency_s"] = seconds
      else:
        entry.update(batch=size, images_per_s=size / seconds,
                     tflops_per_device=evaluations * forward * size / seconds / 1e12 / devices)
    result["sampling"].append(entry)
    print(f"  {name} NFE {nfe:>3}: latency {entry['latency_s']:.3f} s, "
          f"{entry['images_per_s']:.2f} img/s at batch {entry['batch']}", flush=True)
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  on_cpu = jax.devices()[0].platform == "cpu"
  parser.add_argument("--models", default="dit_s4,lightningdit_s2" if on_cpu
                      else "dit_xl2,lightningdit_xl1",
                      help=f"comma-separated, from {', '.join(MODELS)}")
  parser.add_argument("--batch", type=int, default=4 if on_cpu else 64)
  parser.add_argument("--sample_batch", type=int, default=2 if on_cpu else 64)
  parser.add_argument("--dtype", default="float32" if on_cpu else "bfloat16",
                      choices=("float32", "bfloat16"))
  parser.add_argument("--repeats", type=int, default=3 if on_cpu else 10)
  parser.add_argument("--nfe", type=int, nargs="+", default=[1, 2, 4, 8, 32, 250])
  parser.add_argument("--matmul_size", type=int, default=1024 if on_cpu else 8192)
  parser.add_argument("--out", default=None, help="append the results as JSON lines here")
  args = parser.parse_args()
  args.baseline = matmul_tflops(args.dtype, args.matmul_size)
  print(f"{jax.devices()[0].device_kind} ({platform.machine()}), jax {jax.__version__}, "
        f"{args.dtype}; matmul baseline {args.baseline:.3f} TFLOP/s per device", flush=True)
  for name in args.models.split(","):
    if name not in MODELS:
      raise SystemExit(f"unknown model {name}; choose from {', '.join(MODELS)}")
    result = run_model(name, args)
    result["matmul_baseline_tflops_per_device"] = args.baseline
    print(json.dumps(result, indent=2), flush=True)
    if args.out:
      with open(args.out, "a") as f:
        f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
  host.prepare(__spec__.name)
  main()
