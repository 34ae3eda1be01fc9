"""FlowTurbo's sampler (Zhao et al., NeurIPS 2024; shiml20/FlowTurbo models_assemble.py
`FlowTurboAssemble`): "H_a P_b R_c", a Heun steps, then b pseudo-corrector steps, then c
velocity-refiner steps, on one uniform grid of a + b + c steps (the official `linspace`; a
`shift` applies as for the other flow samplers). Step i goes from t to t' = t + h (h < 0):

  H  Heun: d = v(x, t), d' = v(x + h d, t'), x <- x + h/2 (d + d'), keeping d'.    2 NFE
  P  pseudo corrector: the same step with d the kept d' of the previous step (the velocity at
     the previous step's Euler point, not at x; `VelocityBlock(use_cache=True)`).     1 NFE
     A sampler without H steps evaluates d on its first P step (2 NFE).
  R  refiner: with u the kept velocity, d = u + r(x, t, u), d' = d + r(x + h d, t', u),
     x <- x + h/2 (d + d'), keeping d (`VelocityRefinerBlock.forward`: its second refiner
     call keeps u as the reference velocity and adds the offset to d).   0 NFE, 2 refiner calls

v is the teacher's velocity, r the refiner's velocity offset (objectives/flowturbo.py), which
takes [x | u] along channels. Both are guided with the sample settings' cfg_scale, interval
and guided_channels (the official code guides the refiner's offset like the velocity). The
sampler consumes the kind "velocity_refiner": the pair (teacher velocity, refiner) over the
parameters (teacher params, refiner params), as the diffusion task hands them over.

Sample settings: `num_steps` the grid's a + b + c steps, `heun_steps` a, `refine_steps` c; the
pseudo steps are the rest.
"""
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from tesserax.core import registry
from tesserax.core.errors import TesseraxError
from tesserax.core.sharding import BATCH_AXES
from tesserax.sampling import sample as sample_lib
from tesserax.sampling.guidance import guided_velocity
from tesserax.sampling.timesteps import time_grid


def check_steps(num_steps, heun_steps, refine_steps):
  """Refuse, in one line, a step mix that is not H_a P_b R_c with a + b + c = num_steps."""
  if not (0 <= heun_steps and 0 <= refine_steps and heun_steps + refine_steps <= num_steps):
    raise TesseraxError(f"flowturbo needs 0 <= heun_steps ({heun_steps}) and 0 <= refine_steps "
                        f"({refine_steps}) with their sum at most num_steps ({num_steps})")
  if refine_steps == num_steps:
    raise TesseraxError("flowturbo's refiner steps refine a velocity; give at least one Heun or "
                        "pseudo-corrector step before them")


def nfe(num_steps: int, heun_steps: int, refine_steps: int) -> int:
  """Teacher evaluations per sample of H_a P_b R_c (a guided evaluation counts once)."""
  check_steps(num_steps, heun_steps, refine_steps)
  pseudo_steps = num_steps - heun_steps - refine_steps
  return 2 * heun_steps + pseudo_steps + (1 if heun_steps == 0 and pseudo_steps else 0)


def flowturbo(velocity_fn, refiner_fn, noise, times, heun_steps, refine_steps):
  """x0 from `noise` over the host array `times` (a + b + c + 1 entries, 1 down to 0);
  `velocity_fn(x, t)` the teacher's velocity, `refiner_fn(x, t, u)` the refiner's offset."""
  num_steps = len(times) - 1
  check_steps(num_steps, heun_steps, refine_steps)
  x, kept = noise, None
  for i in range(num_steps):  # unrolled: the step kind changes along the grid
    t, t_next = times[i], times[i + 1]
    h = t_next - t
    if i >= num_steps - refine_steps:
      d = kept + refiner_fn(x, t, kept)
      d_next = d + refiner_fn(x + h * d, t_next, kept)
      kept = d
    else:
      d = velocity_fn(x, t) if i < heun_steps or kept is None else kept
      d_next = velocity_fn(x + h * d, t_next)
      kept = d_next
    x = x + h / 2 * (d + d_next)
  return x


def make(predict, settings, *, null_label, mesh):
  """`sample((teacher params, refiner params), noise, labels, key) -> x0` (sampling/sample.py
  Sampler.make) over `predict` = (velocity, refine)."""
  velocity, refine = predict
  heun_steps, refine_steps = settings.get("heun_steps", 0), settings.get("refine_steps", 0)
  check_steps(settings.num_steps, heun_steps, refine_steps)
  times = np.asarray(time_grid(settings.num_steps, settings.shift), np.float32)
  guidance = dict(null_label=null_label, cfg_scale=settings.cfg_scale,
                  interval=tuple(settings.interval), guided_channels=settings.guided_channels)

  def sample(params, noise, labels):
    teacher_params, refiner_params = params
    velocity_fn = guided_velocity(lambda x, t, y: velocity(teacher_params, x, t, y), labels,
                                  **guidance)
    offset_fn = guided_velocity(lambda xu, t, y: refine(refiner_params, xu, t, y), labels,
                                **guidance)
    refiner_fn = lambda x, t, u: offset_fn(jnp.concatenate([x, u], axis=-1), t)
    return flowturbo(velocity_fn, refiner_fn, noise, times, heun_steps, refine_steps)

  if mesh is None:
    jitted = jax.jit(sample)
  else:
    batch = NamedSharding(mesh, P(BATCH_AXES))
    jitted = jax.jit(sample, in_shardings=(None, batch, batch), out_shardings=batch)
    shards = mesh.shape[BATCH_AXES[0]] * mesh.shape[BATCH_AXES[1]]

  def run(params, noise, labels, key):
    del key
    if labels.shape != noise.shape[:1]:
      raise TesseraxError(f"labels must have shape [{noise.shape[0]}] to match noise "
                          f"{noise.shape}, got {labels.shape}")
    if mesh is not None and noise.shape[0] % shards:
      raise TesseraxError(
          f"batch {noise.shape[0]} is not divisible by the {shards} data x fsdp devices")
    return jitted(params, noise, labels)

  return run


registry.SAMPLERS.register("flowturbo", sample_lib.Sampler("velocity_refiner", make))
