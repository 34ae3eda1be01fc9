"""Autoregressive token generation and FlexTok decoding speed, in one run.

  python -m tesserax.benchmarks.ar_speed                       # CPU: the digits recipe sizes
  python -m tesserax.benchmarks.ar_speed --hidden 768 --depth 12 --heads 12 \\
      --codebook_size 64000 --seq_len 256 --batch 32         # an accelerator (LlamaGen-B)

- Autoregressive: tokens/s of the LlamaGen-style generator (generators/autoregressive.py,
  configs/digits_ar.py at width 128, depth 4 on CPU) sampled by sampling/autoregressive_decode.py
  with the KV cache and with full recomputation of the prefix at every position (kv_cache
  False), through the token generator task's sampler, at each --seq_len (16, the digits
  recipe's, and 256, FlexTok's most tokens, by default). Both paths share the weights, labels
  and key; their tokens are compared before timing and the speed-up is printed only where every
  token agrees. Guidance as the recipe samples (cfg 2: each step runs the class and the null
  class, a doubled batch). The weights are the task's initialisation with the zero-initialised
  head redrawn N(0, 1 / width), so that the logits, and the tokens drawn, depend on the network.
- FlexTok: images/s of the digits FlexTok's rectified-flow decoder (configs/digits_flextok.py,
  tokenizers/flextok.py, sampling/flextok_decode.py) at each number of Euler steps, decoding
  --tokens tokens, without guidance and with FlexTok's APG at scale 7.5 (a doubled batch), on
  fresh random weights (the cost does not depend on them). The decoder always runs all its
  registers, those past K replaced by the mask token, so K does not change the cost either.

FLOPs (2 per multiply-add). The autoregressive network on K positions of width d, depth L,
SwiGLU width h and codebook V: per position L (8 d^2 + 6 d h) + 2 d V (twice the matmul
parameters), and attention 4 d (p + 1) per layer for the query at position p. Model FLOPs of a
sequence count the causal attention; executed FLOPs count what the paths compute: the cached
path attends over all K cache slots (masked), the recomputing one runs K full forward passes of
K positions with the whole K x K attention. The FlexTok decoder on N patches and R registers
(T = N + R tokens, width d, depth L, SwiGLU width h, adaLN expansion E): per evaluation
L (8 T d^2 + 6 T d h + 4 T^2 d + 12 E d^2) plus the patch, register, time and output layers.
TFLOP/s are given against a matmul measured in the same run (benchmarks/throughput.py), and
against the device's published bf16 peak (MFU) where known and the dtype is bfloat16. Matmuls
run at --precision ("highest" by default: under TF32 or bfloat16 the two decoding paths round
differently, draws at near-ties flip, and the speed-up is withheld).
Seconds are wall-clock on an accelerator; on CPU they are this process's CPU seconds (all
threads), which other processes sharing the cores do not inflate, so per-second figures there
are per CPU-second.
"""
import argparse
import datetime
import platform

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

import tesserax.tasks  # noqa: F401  (registers the token generator task and its sampler)
from tesserax.benchmarks.throughput import matmul_tflops, published_peak, timed
from tesserax.core import config as config_lib, host, sharding
from tesserax.generators import autoregressive
from tesserax.tokenizers import flextok, fsq
from tesserax.training import task as task_lib

FLEXTOK_GUIDANCE_SCALE = 7.5  # FlexTok's released decoding (APG, sampling/flextok_decode.py)


def ar_config(args, seq_len):
  """configs/digits_ar.py at the benchmark's sizes."""
  config = config_lib.load("digits_ar")
  config.model.update(codebook_size=args.codebook_size, num_classes=args.num_classes,
                      seq_len=seq_len, hidden_size=args.hidden, depth=args.depth,
                      num_heads=args.heads, dtype=args.dtype)
  config.data.num_classes = args.num_classes
  config.sample.cfg_scale = args.cfg_scale
  return config


def ar_flops(model, rows) -> dict:
  """FLOPs {"dense": of one position's matmuls; "model": of a drawn sequence with causal
  attention; "kv_cache", "recompute": executed for a drawn sequence by each path}, a drawn
  sequence running `rows` sequences (2 with guidance)."""
  k, d, depth = model.seq_len, model.hidden_size, model.depth
  h, v = autoregressive.mlp_hidden(model), model.codebook_size
  dense = depth * (8 * d * d + 6 * d * h) + 2 * d * v
  return {"dense": dense,
          "model": rows * (k * dense + depth * 2 * d * k * (k + 1)),
          "kv_cache": rows * (k * dense + depth * 4 * d * k * k),
          "recompute": rows * k * (k * dense + depth * 4 * d * k * k)}


def ar_params(task, config):
  """The task's initial parameters with the zero-initialised head redrawn N(0, 1 / width)."""
  params = task.init()["params"]
  kernel = params["output"]["kernel"]
  params["output"]["kernel"] = (jax.random.normal(jax.random.PRNGKey(1), kernel.shape)
                                * config.model.hidden_size ** -0.5).astype(kernel.dtype)
  return params


def bench_ar(args):
  """[dict per (seq_len, path)]: tokens/s, seconds, FLOPs, and whether the paths' tokens agree
  (`tokens_equal`, `equal_fraction`); the KV-cache row carries the speed-up where they do."""
  rows = []
  mesh = sharding.make_mesh(config_lib.base_config().mesh)
  for seq_len in args.seq_len:
    config = ar_config(args, seq_len)
    task = task_lib.build(config, mesh)
    params = ar_params(task, config)
    labels = jnp.arange(args.batch, dtype=jnp.int32) % args.num_classes
    key = jax.random.PRNGKey(0)
    sample = {}
    for kv_cache in (True, False):
      settings = ml_collections.ConfigDict(config.sample.to_dict())
      settings.kv_cache = kv_cache
      sample[kv_cache] = task._sampler(settings.to_json())  # noqa: SLF001
    tokens = {kv: np.asarray(fn(params, labels, key)) for kv, fn in sample.items()}
    equal = float(np.mean(tokens[True] == tokens[False]))
    flops = ar_flops(config.model, 2 if args.cfg_scale != 1.0 else 1)
    seconds = {kv: timed(lambda fn=fn: fn(params, labels, key), args.repeats)
               for kv, fn in sample.items()}
    for kv in (True, False):
      rows.append({"seq_len": seq_len, "path": "kv_cache" if kv else "recompute",
                   "tokens_per_s": args.batch * seq_len / seconds[kv], "seconds": seconds[kv],
                   "model_flops": args.batch * flops["model"],
                   "executed_flops": args.batch * flops["kv_cache" if kv else "recompute"],
                   "tokens_equal": equal == 1.0, "equal_fraction": equal,
                   "speedup": seconds[False] / seconds[True] if kv and equal == 1.0 else None,
                   "tokens": tokens[kv]})
      print(f"  autoregressive K={seq_len} {rows[-1]['path']}: "
            f"{rows[-1]['tokens_per_s']:.1f} tokens/s", flush=True)
  return rows


def flextok_flops(c) -> int:
  """FLOPs per image of one evaluation of a pixel FlexTok's decoder (no VAE)."""
  d, p = c.decoder_dim, c.patch_size
  n, r = (c.resolution // p) ** 2, c.num_registers
  t, patch = n + r, p * p * c.channels
  h = flextok.mlp_hidden(d, c.mlp_ratio)
  block = 8 * t * d * d + 6 * t * d * h + 4 * t * t * d + 2 * d * c.adaln_expansion * 6 * d
  return (2 * n * patch * d + 2 * r * len(c.levels) * d
          + 2 * (flextok.TIME_FREQUENCY_DIM * d + d * d)
          + c.decoder_depth * block + 2 * d * 2 * d + 2 * n * d * patch)


def bench_flextok(args):
  """[(guided, steps, images/s, FLOPs per image)] of the digits FlexTok's decoder."""
  config = config_lib.load("digits_flextok").model
  config.dtype = args.dtype
  graphdef, state = nnx.split(flextok.build(config))
  codebook = fsq.codebook_size(tuple(config.levels))
  ids = jax.random.randint(jax.random.PRNGKey(0), (args.flextok_batch, args.tokens), 0, codebook)
  key = jax.random.PRNGKey(1)
  per_eval, rows = flextok_flops(config), []
  for guided in (False, True):
    for steps in args.steps:
      decode = jax.jit(lambda state, ids, key, steps=steps, guided=guided: nnx.merge(
          graphdef, state).decode(ids, steps=steps, guidance="apg",
                                  guidance_scale=FLEXTOK_GUIDANCE_SCALE if guided else 1.0,
                                  key=key))
      seconds = timed(lambda decode=decode: decode(state, ids, key), args.repeats)
      rows.append((guided, steps, args.flextok_batch / seconds,
                   per_eval * steps * (2 if guided else 1)))
      print(f"  flextok {steps} step{'s' * (steps > 1)}{' APG' if guided else ''}: "
            f"{args.flextok_batch / seconds:.1f} images/s", flush=True)
  return rows


def percent(tflops, reference):
  return f"{tflops / reference:.1%}" if reference else "n/a"


def markdown(args, baseline, ar_rows, flextok_rows):
  peak = published_peak() if args.dtype == "bfloat16" else None
  model = ar_config(args, max(args.seq_len)).model
  guided = args.cfg_scale != 1.0
  lines = [f"Device: {jax.devices()[0].device_kind} ({platform.machine()}, "
           f"{len(jax.devices())} device(s)); jax {jax.__version__}, flax {flax.__version__}; "
           f"{args.dtype}, matmul precision {args.precision}; "
           f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; matmul "
           f"baseline {baseline:.3f} TFLOP/s.",
           f"Autoregressive: width {args.hidden}, depth {args.depth}, {args.heads} heads, SwiGLU "
           f"{autoregressive.mlp_hidden(model)}, codebook {args.codebook_size}, "
           f"{args.num_classes} classes; batch {args.batch}"
           + (f", cfg {args.cfg_scale:g} (2 x {args.batch} rows per step)" if guided else "")
           + f"; temperature 1, no top-k/top-p. Tokens/s count the {args.batch} sequences drawn.",
           "",
           "| K | path | tokens equal | tokens/s | ms / batch | model TFLOP/s | "
           "model / baseline | executed TFLOP/s | executed / baseline"
           + (" | MFU" if peak else "") + " | KV-cache speed-up |",
           "|---" * (11 if peak else 10) + "|"]
  for row in ar_rows:
    model_tflops = row["model_flops"] / row["seconds"] / 1e12
    executed = row["executed_flops"] / row["seconds"] / 1e12
    if row["path"] == "recompute":
      speedup = ""
    elif row["speedup"] is None:
      speedup = f"withheld: {row['equal_fraction']:.1%} of tokens equal"
    else:
      speedup = f"{row['speedup']:.1f}x"
    lines.append(f"| {row['seq_len']} | {row['path']} | {'yes' if row['tokens_equal'] else 'NO'} "
                 f"| {row['tokens_per_s']:.1f} | {row['seconds'] * 1e3:.1f} | "
                 f"{model_tflops:.4f} | {percent(model_tflops, baseline)} | {executed:.4f} | "
                 f"{percent(executed, baseline)}"
                 + (f" | {percent(model_tflops, peak)}" if peak else "") + f" | {speedup} |")
  flex = config_lib.load("digits_flextok").model
  steps = list(args.steps)
  lines += ["",
            f"FlexTok decoder (digits: {flex.resolution}x{flex.resolution}x{flex.channels}, "
            f"width {flex.decoder_dim}, depth {flex.decoder_depth}, {flex.num_registers} "
            f"registers); {args.tokens} tokens, batch {args.flextok_batch}; "
            f"{flextok_flops(flex) / 1e6:.2f} MFLOP per image per evaluation (x2 with APG).",
            "",
            "| guidance | " + " | ".join(f"{s} step{'s' * (s > 1)} img/s" for s in steps)
            + f" | TFLOP/s at {steps[-1]} steps | / baseline" + (" | MFU" if peak else "") + " |",
            "|---" * (len(steps) + (4 if peak else 3)) + "|"]
  for guided in (False, True):
    rates = {s: (rate, flops) for g, s, rate, flops in flextok_rows if g == guided}
    rate, flops = rates[steps[-1]]
    tflops = rate * flops / 1e12
    lines.append(f"| {f'APG {FLEXTOK_GUIDANCE_SCALE:g}' if guided else 'none'} | "
                 + " | ".join(f"{rates[s][0]:.1f}" for s in steps)
                 + f" | {tflops:.4f} | {percent(tflops, baseline)}"
                 + (f" | {percent(tflops, peak)}" if peak else "") + " |")
  return "\n".join(lines)


def parse(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  on_cpu = jax.devices()[0].platform == "cpu"
  parser.add_argument("--hidden", type=int, default=128, help="autoregressive width")
  parser.add_argument("--depth", type=int, default=4, help="autoregressive blocks")
  parser.add_argument("--heads", type=int, default=4, help="autoregressive attention heads")
  parser.add_argument("--codebook_size", type=int, default=256,
                      help="autoregressive vocabulary (FlexTok's FSQ: 64000)")
  parser.add_argument("--num_classes", type=int, default=10, help="autoregressive classes")
  parser.add_argument("--seq_len", type=int, nargs="+", default=[16, 256],
                      help="token counts K (one compiled pair of samplers each)")
  parser.add_argument("--batch", type=int, default=4 if on_cpu else 32,
                      help="sequences drawn per call")
  parser.add_argument("--cfg_scale", type=float, default=2.0,
                      help="classifier-free guidance (configs/digits_ar.py: 2); 1 is unguided")
  parser.add_argument("--tokens", type=int, default=16, help="FlexTok tokens decoded")
  parser.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8, 16, 25],
                      help="FlexTok decoder Euler steps")
  parser.add_argument("--flextok_batch", type=int, default=64 if on_cpu else 1024,
                      help="images decoded per FlexTok call")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--precision", default="highest", choices=("default", "high", "highest"),
                      help="matmul precision of every call, the baseline's included")
  parser.add_argument("--repeats", type=int, default=2 if on_cpu else 5,
                      help="timed calls per figure (the median), after one compiling call")
  parser.add_argument("--matmul_size", type=int, default=1024 if on_cpu else 8192,
                      help="side of the baseline's square matmul")
  return parser.parse_args(argv)


def main(argv=None):
  """Runs both benchmarks and prints the tables; returns (autoregressive rows, FlexTok rows)."""
  args = parse(argv)
  with jax.default_matmul_precision(args.precision):
    baseline = matmul_tflops(args.dtype, args.matmul_size)
    ar_rows = bench_ar(args)
    flextok_rows = bench_flextok(args)
  print(markdown(args, baseline, ar_rows, flextok_rows))
  return ar_rows, flextok_rows


if __name__ == "__main__":
  host.prepare(__spec__.name)
  main()
