"""Flow solvers side by side: endpoint error per NFE on an exact field, and agreement with
diffusers' schedulers.

1. Endpoint error: RMS distance, from the same noise, to a 2048-step Heun solution of the
   exact rectified-flow field of a ring of 8 Gaussians (radius 2, std 0.5), for Euler, Heun
   (2 NFE a step), DPM-Solver++ (2M, 3M) and UniPC-bh2 at 2-64 NFE on tesserax's grid.
2. With `--diffusers` (pip install diffusers torch): the same solvers against diffusers'
   DPMSolverMultistepScheduler and UniPCMultistepScheduler (use_flow_sigmas,
   prediction_type "flow_prediction", final_sigmas_type "zero") on diffusers' own grid,
   float64 model outputs: the largest difference of the final samples.

  python -m tesserax.benchmarks.solvers [--diffusers] [--out results.jsonl]
"""
import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from tesserax.core import host
from tesserax.sampling import multistep, solvers, timesteps

ANGLES = 2 * np.pi * np.arange(8) / 8
MEANS = np.stack([2 * np.cos(ANGLES), 2 * np.sin(ANGLES)], 1)
STD = 0.5
NFES = (2, 4, 8, 16, 32, 64)


def ring_velocity(xp):
  def velocity(x, t):
    m, c = (1 - t) * MEANS, (1 - t) ** 2 * STD ** 2 + t ** 2
    diff = x[:, None, :] - m
    log_w = -0.5 * xp.sum(diff ** 2, -1) / c
    w = xp.exp(log_w - log_w.max(1, keepdims=True))
    w = w / w.sum(1, keepdims=True)
    return xp.sum(w[..., None] * ((t / c) * diff - MEANS - ((1 - t) * STD ** 2 / c) * diff), 1)
  return velocity


def endpoint_errors():
  velocity = ring_velocity(jnp)
  z = jax.random.normal(jax.random.PRNGKey(0), (4096, 2))
  exact = solvers.heun(velocity, z, timesteps.time_grid(2048))
  rows = []
  for name in ("euler", "heun") + tuple(multistep.SOLVERS):
    for nfe in NFES:
      if name == "heun":
        out = solvers.heun(velocity, z, timesteps.time_grid(nfe // 2))
      elif name == "euler":
        out = solvers.euler(velocity, z, timesteps.time_grid(nfe))
      else:
        out = multistep.SOLVERS[name](velocity, z, timesteps.time_grid(nfe))
      error = float(jnp.sqrt(jnp.mean(jnp.sum((out - exact) ** 2, -1))))
      rows.append({"solver": name, "nfe": nfe, "endpoint_rmse": error})
  return rows


def diffusers_agreement(steps=(5, 8, 20)):
  import torch
  from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler
  peers = {"dpm_solver_2m": (DPMSolverMultistepScheduler, 2),
           "dpm_solver_3m": (DPMSolverMultistepScheduler, 3),
           "unipc": (UniPCMultistepScheduler, 2)}
  velocity_np, velocity_jnp = ring_velocity(np), ring_velocity(jnp)
  z = np.random.default_rng(0).standard_normal((256, 2))
  rows = []
  with jax.enable_x64(True):
    for name, (scheduler_class, order) in peers.items():
      for n in steps:
        scheduler = scheduler_class(use_flow_sigmas=True, prediction_type="flow_prediction",
                                    flow_shift=1.0, final_sigmas_type="zero",
                                    solver_order=order)
        scheduler.set_timesteps(n)
        sigmas = scheduler.sigmas.double().numpy()
        x = torch.tensor(z)
        for i, timestep in enumerate(scheduler.timesteps):
          out = torch.tensor(velocity_np(x.numpy(), float(sigmas[i])))
          x = scheduler.step(out, timestep, x).prev_sample
        ours = multistep.SOLVERS[name](velocity_jnp, jnp.asarray(z), sigmas)
        rows.append({"solver": name, "steps": n, "grid_start": float(sigmas[0]),
                     "max_abs_diff_vs_diffusers": float(np.abs(x.numpy() - ours).max())})
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--diffusers", action="store_true", help="also compare with diffusers")
  parser.add_argument("--out", default=None, help="append the rows as JSON lines here")
  args = parser.parse_args()
  rows = endpoint_errors() + (diffusers_agreement() if args.diffusers else [])
  for row in rows:
    print(json.dumps(row))
  if args.out:
    with open(args.out, "a") as f:
      f.writelines(json.dumps(row) + "\n" for row in rows)


if __name__ == "__main__":
  host.prepare(__spec__.name)
  main()
