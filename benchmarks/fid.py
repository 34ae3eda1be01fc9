"""Speed of FID: Inception feature extraction and an end-to-end FID against a reference.

  python -m tesserax.benchmarks.fid --num 200 --batch 50 --out BENCH.jsonl      # CPU
  python -m tesserax.benchmarks.fid --num 50000 --batch 500                     # accelerator

Random-weight InceptionV3 at the real shapes (speed does not depend on the values) unless the
official weights are in the cache. Measured: feature extraction images/s (compiled forward at
HIGHEST precision, median over batches after warm-up), the float64 Frechet distance at D=2048,
and the end-to-end time of `eval.metrics.generation_metrics(..., ("fid",))` on --num 256x256
uint8 images, which is extrapolated to 50,000 samples when --num is smaller. TFLOP/s use
`backbones.inception.inception_flops()` (11.43 GFLOP per 299x299 image); the in-run baseline is
a 2048^3 float32 matmul at HIGHEST precision on the same device.
"""
import argparse
import time

import jax
import numpy as np
from flax import nnx

from tesserax.backbones import inception, weights
from tesserax.benchmarks.throughput import matmul_tflops, report, timed
from tesserax.core import host
from tesserax.eval import metrics
from tesserax.eval.frechet import frechet_distance
from tesserax.core.errors import TesseraxError


def load_inception():
  try:
    return weights.load("inception"), "official"
  except TesseraxError:
    return inception.InceptionV3(rngs=nnx.Rngs(0)), "random"


def run(args):
  model, which = load_inception()
  rng = np.random.default_rng(0)
  batch = rng.integers(0, 256, (args.batch, 256, 256, 3), dtype=np.uint8)
  forward = metrics.batched(metrics.inception_outputs, model, batch_size=args.batch)
  seconds = timed(lambda: forward(batch), args.repeats)
  flops = inception.inception_flops()
  dim = 2048
  a = rng.standard_normal((4 * dim, dim))
  sigma = np.cov(a, rowvar=False)
  start = time.perf_counter()
  frechet_distance(np.zeros(dim), sigma, np.ones(dim), sigma + np.eye(dim) * 1e-3)
  frechet_seconds = time.perf_counter() - start
  ref = {"mu": np.zeros(dim), "sigma": sigma}
  images = rng.integers(0, 256, (args.num, 256, 256, 3), dtype=np.uint8)
  start = time.perf_counter()
  metrics.generation_metrics(images, ref, ("fid",), inception=model, batch_size=args.batch)
  end_to_end = time.perf_counter() - start
  extraction = end_to_end - frechet_seconds
  with jax.default_matmul_precision("highest"):
    baseline = matmul_tflops("float32", 2048)
  devices = len(jax.devices())
  return {
      "weights": which, "device_kind": jax.devices()[0].device_kind, "devices": devices,
      "jax": jax.__version__, "batch": args.batch,
      "inception_gflop_per_image": flops / 1e9,
      "extract_images_per_s": args.batch / seconds,
      "extract_tflops_per_device": flops * args.batch / seconds / 1e12 / devices,
      "matmul_baseline_tflops_per_device": baseline,
      "frechet_seconds_d2048": frechet_seconds,
      "num_samples": args.num, "fid_end_to_end_seconds": end_to_end,
      "fid_50k_seconds_estimate": frechet_seconds + extraction * 50_000 / args.num}


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--num", type=int, default=200)
  parser.add_argument("--batch", type=int, default=50)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  report(run(args), args.out)


if __name__ == "__main__":
  host.prepare(__spec__.name)
  main()
