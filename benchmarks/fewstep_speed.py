"""Few-step generation speed on one DiT, in one run: the training step of the JVP objectives
against a plain flow step, 1-8 NFE sampling throughput per method, and pair-cache generation.

  python -m tesserax.benchmarks.fewstep_speed                      # CPU: S/4 on 16x16x4
  python -m tesserax.benchmarks.fewstep_speed --size B/2 --resolution 32 --batch 256 \\
      --dtype bfloat16                                             # an accelerator

- Training: one step (loss, gradient, AdamW update) of each objective on the same DiT size, in
  the network variant the objective needs (sCT/sCD: a log-variance head; MeanFlow, shortcut: a
  second time input; iMF: second time, guidance conditions and a one-block velocity head),
  with its time relative to rectified flow on the plain DiT. sCM and MeanFlow include their
  `jax.jvp`; sCD's teacher is a frozen plain DiT. TFLOP/s counts model FLOPs, 3x the analytic
  forward pass (generators/dit.py `forward_flops`) for every objective: what the JVP and the
  extra passes add shows in the time ratio.
- Sampling: images/s at each NFE for every few-step sampler (sampling/consistency.py,
  flow_map.py, reflow_sampler.py) and the flow baselines Euler and DPM-Solver++(2M), all
  unguided, on freshly initialised weights (the cost does not depend on them).
- Pair cache: data/pairs.py writing (noise, Euler-N sample) pairs, against the sampler alone.
Data is a fixed random batch, so the figures are the compiled functions alone. Seconds are
wall-clock on an accelerator; on CPU they are this process's CPU seconds (all threads), which
other processes sharing the cores do not inflate, so per-second figures there are per CPU-second.
"""
import argparse
import datetime
import platform
import tempfile

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from tesserax.benchmarks.throughput import clock, matmul_tflops, published_peak, timed
from tesserax.core import host, registry
from tesserax.data import pairs
from tesserax.generators import dit
from tesserax.objectives import cd, ctm, scm
from tesserax.objectives.context import Context
from tesserax.sampling import sample as sample_lib

VARIANTS = {
    "plain": {},
    "logvar": dict(logvar_head=True),
    "second_time": dict(second_time=True, time_scale=1.0),
    "imf": dict(second_time=True, time_scale=1.0, guidance_conditions=True,
                velocity_head_depth=1),
}
# name: (objective config, network variant); the objectives' published defaults.
OBJECTIVES = {
    "rectified_flow": (dict(name="rectified_flow", time_sampling="logit_normal", logit_mean=0.0,
                            logit_std=1.0), "plain"),
    "sct": (scm.defaults("sct", warmup_steps=1), "logvar"),
    "scd": (scm.defaults("scd", warmup_steps=1), "logvar"),
    "meanflow": (dict(name="meanflow", time_mean=-0.4, time_std=1.0, data_proportion=0.75,
                      adaptive_p=1.0, adaptive_eps=0.01, cfg_omega=1.0, cfg_kappa=0.5,
                      cfg_interval=(0.0, 1.0)), "second_time"),
    "imf": (dict(name="imf", time_mean=-0.4, time_std=1.0, data_proportion=0.5, adaptive_p=1.0,
                 adaptive_eps=0.01, cfg_s_max=7.0, sample_omega=2.0, sample_interval=(0.0, 1.0)),
            "imf"),
}
SAMPLERS = ("consistency", "scm", "ctm", "meanflow", "shortcut", "reflow_new", "euler",
            "dpm_solver_2m")


def model_config(args, variant):
  config = dit.dit_config(args.size, input_size=args.resolution, in_channels=args.channels,
                          num_classes=args.num_classes, learn_sigma=False, dtype=args.dtype)
  config.update(VARIANTS[variant])
  return config


def network(args, variant):
  """(model config, params, apply) of a fresh DiT of `variant`; apply is the objectives'
  network contract."""
  config = model_config(args, variant)
  graphdef, params, buffers = nnx.split(registry.NETWORKS.get("dit")(config, rngs=nnx.Rngs(0)),
                                        nnx.Param, ...)

  def apply(p, x, t, labels, *, train=False, s=None, guidance=None):
    model = nnx.merge(graphdef, p, buffers)
    if guidance is None:
      return model(x, t, labels, train, s=s)
    return model(x, t, labels, train, s=s, guidance=guidance)

  return config, nnx.to_pure_dict(params), apply


def objective_settings(name):
  """The published defaults of an objective, as a config.objective dict."""
  if name in OBJECTIVES:
    return OBJECTIVES[name][0]
  if name == "cd":
    return cd.defaults()
  if name == "ctm":
    return ctm.defaults()
  return dict(name="shortcut", denoise_timesteps=128, bootstrap_every=8, bootstrap_ema=True,
              bootstrap_cfg=False, cfg_scale=1.0)


def objective_for(name, model):
  """The objective `name` over `model`; distillation recipes get a teacher in the context."""
  config = ml_collections.ConfigDict(dict(model=model, num_steps=1000,
                                          objective=objective_settings(name),
                                          teacher=dict(workdir="in-memory")))
  return registry.OBJECTIVES.get(config.objective.name)(config)


def batch_of(args):
  rng = np.random.default_rng(0)
  shape = (args.batch, args.resolution, args.resolution, args.channels)
  return {"image": jnp.asarray(rng.standard_normal(shape), jnp.float32),
          "label": jnp.asarray(rng.integers(0, args.num_classes, args.batch), jnp.int32)}


def bench_training(args, teacher):
  """[(objective, params, seconds per step)]."""
  tx = optax.adamw(1e-4)
  batch, rows = batch_of(args), []
  for name in args.objectives.split(","):
    config, params, apply = network(args, OBJECTIVES[name][1])
    objective = objective_for(name, config)

    def step(params, opt_state, batch, i, objective=objective, apply=apply):
      ctx = Context(step=i, key=jax.random.fold_in(jax.random.PRNGKey(0), i),
                    num_classes=args.num_classes, ema=params, teacher=teacher)
      (loss, _), grads = jax.value_and_grad(
          lambda p: objective.loss(apply, p, batch, ctx), has_aux=True)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss

    step = jax.jit(step, donate_argnums=(0, 1))
    holder = {"state": (params, tx.init(params)), "i": 0}

    def run():
      holder["i"] += 1
      *state, loss = step(*holder["state"], batch, jnp.int32(holder["i"]))
      holder["state"] = tuple(state)
      return loss

    seconds = timed(run, args.repeats)
    rows.append((name, dit.count_params(config), dit.forward_flops(config), seconds))
    print(f"  train {name}: {seconds * 1e3:.1f} ms/step", flush=True)
  return rows


def sampler_settings(method, nfe):
  """(objective name, network variant, sampler settings) of a sampling method at `nfe`."""
  s = dict(num_steps=nfe, shift=1.0, cfg_scale=1.0, interval=(0.0, 1.0), guided_channels=None)
  if method == "consistency":
    sigmas = (80.0,) + tuple(np.geomspace(0.821, 0.05, nfe - 1).tolist()) if nfe > 1 else (80.0,)
    return "cd", "plain", dict(s, solver="consistency", sigmas=sigmas, sigma_min=0.002)
  if method == "scm":
    angles = tuple(np.linspace(1.1, 0.2, nfe - 1).tolist()) or (1.1,)
    return "sct", "logvar", dict(s, solver="scm", sigma_max=80.0, mid_angles=angles,
                                 sigma_data=0.5)
  if method == "ctm":
    return "ctm", "second_time", dict(s, solver="ctm", sigmas=tuple(
        np.geomspace(80.0, 0.05, nfe).tolist()), gamma=0.0)
  if method in ("meanflow", "shortcut"):
    return method, "second_time", dict(s, solver="flow_map")
  return "rectified_flow", "plain", dict(s, solver=method)


def predictions_for(args, objective_name, variant):
  config, params, apply = network(args, variant)
  objective = objective_for(objective_name, config)
  bound = {kind: (lambda f: lambda *a: f(apply, *a))(f)
           for kind, f in objective.predictions.items()}
  return config, params, bound


def bench_sampling(args):
  """[(method, nfe, images/s, forward FLOPs per image)]."""
  noise = jax.random.normal(jax.random.PRNGKey(1), (args.sample_batch, args.resolution,
                                                     args.resolution, args.channels))
  labels = jnp.arange(args.sample_batch, dtype=jnp.int32) % args.num_classes
  rows = []
  for method in args.samplers.split(","):
    for nfe in args.nfe:
      name, variant, settings = sampler_settings(method, nfe)
      config, params, predictions = predictions_for(args, name, variant)
      sample = sample_lib.build(ml_collections.ConfigDict(settings), predictions,
                                null_label=args.num_classes)
      key = jax.random.PRNGKey(2)
      seconds = timed(lambda: sample(params, noise, labels, key), args.repeats)
      rows.append((method, nfe, args.sample_batch / seconds, dit.forward_flops(config)))
      print(f"  sample {method} NFE {nfe}: {args.sample_batch / seconds:.1f} img/s", flush=True)
  return rows


def bench_pairs(args):
  """(pairs/s written by data/pairs.py, images/s of the same sampler alone)."""
  config, params, predictions = predictions_for(args, "rectified_flow", "plain")
  settings = ml_collections.ConfigDict(dict(solver="euler", num_steps=args.pair_steps, shift=1.0,
                                            cfg_scale=1.0, interval=(0.0, 1.0),
                                            guided_channels=None))
  sampler = sample_lib.build(settings, predictions, null_label=args.num_classes)
  sample = lambda noise, labels: sampler(params, noise, labels, None)
  shape = (args.resolution, args.resolution, args.channels)
  noise = jax.random.normal(jax.random.PRNGKey(3), (args.sample_batch,) + shape)
  labels = jnp.zeros(args.sample_batch, jnp.int32)
  alone = args.sample_batch / timed(lambda: sample(noise, labels), args.repeats)
  num_pairs = args.pair_batches * args.sample_batch
  with tempfile.TemporaryDirectory() as out:
    maker = {"workdir": "benchmark", "sampler": "euler", "num_steps": args.pair_steps}
    start = clock()  # the sampler is compiled: the same batch shape ran above
    pairs.generate(sample, out, maker=maker, shape=shape, num_classes=args.num_classes,
                   num_pairs=num_pairs, shard_size=num_pairs, batch_size=args.sample_batch,
                   log=lambda *a: None)
    seconds = clock() - start
  return num_pairs / seconds, alone


def markdown(args, baseline, training, sampling, pair_rates):
  peak = published_peak()
  lines = [f"Device: {jax.devices()[0].device_kind} ({platform.machine()}, "
           f"{len(jax.devices())} device(s)); jax {jax.__version__}, flax {flax.__version__}, "
           f"optax {optax.__version__}; {args.dtype}; "
           f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; matmul "
           f"baseline {baseline:.3f} TFLOP/s.",
           f"DiT-{args.size} on {args.resolution}x{args.resolution}x{args.channels}, "
           f"{args.num_classes} classes; training batch {args.batch}, sampling batch "
           f"{args.sample_batch}.", "",
           "| objective | params (M) | ms / step | images/s | x rectified flow | "
           "model TFLOP/s" + (" | MFU" if peak else "") + " |",
           "|---|---|---|---|---|---" + ("|---" if peak else "") + "|"]
  reference = next(seconds for name, *_, seconds in training if name == "rectified_flow")
  for name, params, forward, seconds in training:
    tflops = 3 * forward * args.batch / seconds / 1e12
    lines.append(f"| {name} | {params / 1e6:.2f} | {seconds * 1e3:.1f} | "
                 f"{args.batch / seconds:.1f} | {seconds / reference:.2f} | {tflops:.3f}"
                 + (f" | {tflops / peak:.1%}" if peak else "") + " |")
  nfes = sorted({nfe for _, nfe, *_ in sampling})
  lines += ["", "| sampler | " + " | ".join(f"{n} NFE img/s" for n in nfes)
            + f" | TFLOP/s at {nfes[-1]} NFE |",
            "|---" * (len(nfes) + 2) + "|"]
  for method in dict.fromkeys(m for m, *_ in sampling):
    rates = {nfe: (rate, forward) for m, nfe, rate, forward in sampling if m == method}
    rate, forward = rates[nfes[-1]]
    lines.append(f"| {method} | " + " | ".join(f"{rates[n][0]:.1f}" for n in nfes)
                 + f" | {nfes[-1] * forward * rate / 1e12:.3f} |")
  written, alone = pair_rates
  lines += ["", f"Pair cache (data/pairs.py, Euler {args.pair_steps} steps, "
            f"{args.pair_batches * args.sample_batch} pairs): {written:.1f} pairs/s written vs "
            f"{alone:.1f} images/s for the sampler alone ({written / alone:.0%})."]
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  on_cpu = jax.devices()[0].platform == "cpu"
  parser.add_argument("--size", default="S/4" if on_cpu else "B/2", help="DiT size/patch")
  parser.add_argument("--resolution", type=int, default=16 if on_cpu else 32)
  parser.add_argument("--channels", type=int, default=4)
  parser.add_argument("--num_classes", type=int, default=10 if on_cpu else 1000)
  parser.add_argument("--batch", type=int, default=8 if on_cpu else 256)
  parser.add_argument("--sample_batch", type=int, default=16 if on_cpu else 256)
  parser.add_argument("--dtype", default="float32" if on_cpu else "bfloat16",
                      choices=("float32", "bfloat16"))
  parser.add_argument("--repeats", type=int, default=3 if on_cpu else 10)
  parser.add_argument("--nfe", type=int, nargs="+", default=[1, 2, 4, 8])
  parser.add_argument("--objectives", default=",".join(OBJECTIVES))
  parser.add_argument("--samplers", default=",".join(SAMPLERS))
  parser.add_argument("--pair_steps", type=int, default=8)
  parser.add_argument("--pair_batches", type=int, default=4)
  parser.add_argument("--matmul_size", type=int, default=1024 if on_cpu else 8192)
  args = parser.parse_args()
  baseline = matmul_tflops(args.dtype, args.matmul_size)
  _, teacher_params, teacher_apply = network(args, "plain")
  teacher = (lambda p, x, t, y: teacher_apply(p, x, t, y)[..., :args.channels], teacher_params)
  training = bench_training(args, teacher)
  sampling = bench_sampling(args)
  pair_rates = bench_pairs(args)
  print(markdown(args, baseline, training, sampling, pair_rates))


if __name__ == "__main__":
  host.prepare(__spec__.name)
  main()
