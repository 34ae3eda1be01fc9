"""The objective contract (DESIGN.md, "Interfaces").

An objective is built from the run's config by the function registered under
`config.objective.name` (core/registry.py OBJECTIVES) and gives:

  loss(apply, params, batch, ctx) -> (loss, metrics)
      apply(params, x, t, labels, *, train=False, s=None) -> the network output; the task
      binds the network to it. ctx is a `Context`.
  predictions: {kind: predict(apply, params, x, time, labels)}
      what the trained network yields for sampling, first the objective's own kind, then
      any it can be converted to. Samplers (sampling/registry.py) consume one kind.

Prediction kinds and the time each takes (DESIGN.md, "Conventions"):
  velocity      v = eps - x0 at flow time t in [0, 1], t = 1 noise
  epsilon       the DDPM network output [eps | v] at integer steps of the 1000-step linear
                schedule (Ho et al. 2020; Nichol & Dhariwal 2021's learned range)
  denoiser      the EDM denoiser D(x, sigma) (Karras et al. 2022)
  flow_map      X(x, t, s): the point at time s of the flow through x at time t
  token_logits  logits over a tokenizer's codebook
"""
from typing import Any, Callable, Mapping, NamedTuple

import jax

class Context(NamedTuple):
  """What a loss sees besides the batch: the step, its random key, the EMA parameters (the
  target network of consistency training), an optional frozen teacher `(velocity, params)`
  (distillation: `velocity(params, x, t, labels)` is the teacher's velocity prediction at flow
  time t), the number of classes (the null label is `num_classes`) and an optional frozen
  perceptual distance `perceptual(a, b) -> [B]` of two image batches in [-1, 1] (LPIPS, or the
  digits network's stand-in; the task's `objective.perceptual`)."""
  step: jax.Array
  key: jax.Array
  num_classes: int
  ema: Any = None
  teacher: Any = None
  perceptual: Any = None


class Objective(NamedTuple):
  """`loss` and the `predictions` by kind, the objective's own kind first."""
  loss: Callable
  predictions: Mapping[str, Callable]
