"""ODE solvers for the probability-flow ODE dx/dt = v(x, t), integrated from t = 1 to t = 0.

Each solver is a pure function of a `velocity_fn(x, t) -> v` (t a scalar float array), the
starting noise and a 1-D array of times (sampling/timesteps.py). The step loop is a
`lax.fori_loop`, so a compiled sampler does not grow with the number of steps.
"""
import jax
import jax.numpy as jnp

from tesserax.core.errors import TesseraxError


def _check_times(times):
  if times.ndim != 1 or times.shape[0] < 2:
    raise TesseraxError(f"times must be a 1-D array of at least 2 entries, got shape {times.shape}")


def _euler_step(velocity_fn, times, i, x):
  t, t_next = times[i], times[i + 1]
  return x + (t_next - t) * velocity_fn(x, t)


def _heun_step(velocity_fn, times, i, x):
  t, t_next = times[i], times[i + 1]
  d = velocity_fn(x, t)
  x_euler = x + (t_next - t) * d
  return x + (t_next - t) * 0.5 * (d + velocity_fn(x_euler, t_next))


def euler(velocity_fn, noise, times):
  """Euler: x_{i+1} = x_i + (t_{i+1} - t_i) v(x_i, t_i); one evaluation per step."""
  times = jnp.asarray(times, jnp.float32)
  _check_times(times)
  step = lambda i, x: _euler_step(velocity_fn, times, i, x)
  return jax.lax.fori_loop(0, times.shape[0] - 1, step, noise)


def heun(velocity_fn, noise, times, final_correction=True):
  """Heun's 2nd-order method (EDM, Karras et al. 2022, Alg. 1).

  For a flow there is no singularity at t = 0, so by default the last step is corrected too
  (NFE = 2N). With `final_correction=False` the last step is plain Euler, as in EDM's
  sampler (NFE = 2N - 1).
  """
  times = jnp.asarray(times, jnp.float32)
  _check_times(times)
  last = times.shape[0] - 2
  step = lambda i, x: _heun_step(velocity_fn, times, i, x)
  x = jax.lax.fori_loop(0, last, step, noise)
  final_step = _heun_step if final_correction else _euler_step
  return final_step(velocity_fn, times, last, x)


SOLVERS = {"euler": euler, "heun": heun}


def nfe(solver: str, num_steps: int, final_correction: bool = True) -> int:
  """Velocity evaluations per sample (a guided evaluation counts once)."""
  if solver not in SOLVERS:
    raise TesseraxError(f"unknown solver {solver!r}; choose from {sorted(SOLVERS)}")
  if solver == "euler":
    return num_steps
  return 2 * num_steps if final_correction else 2 * num_steps - 1
