"""Sampling time grids for flow models (t = 1 is noise, t = 0 is data).

The shift is SD3's (Esser et al. 2024, eq. 23):

  t' = s t / (1 + (s - 1) t).

It fixes 0 and 1 and is monotone for s > 0. For s > 1, t' > t on (0, 1), so a uniform grid is
pushed towards t = 1 and more steps are spent near noise.

LightningDiT (transport/transport.py, `timestep_shift`) writes the same formula in its own
convention, where u = 1 - t is the time and u = 0 is noise, with s_L = 0.3. Mapping their
shifted time back, t' = 1 - u' with u' = s_L u / (1 + (s_L - 1) u) and u = 1 - t:

  t' = (1 - u) / (1 + (s_L - 1) u) = t / (s_L + (1 - s_L) t)
     = (t / s_L) / (1 + (1 / s_L - 1) t),

which is the formula above with s = 1 / s_L. Their shift 0.3 is therefore `shift=1/0.3` here.
"""
import jax.numpy as jnp

from tesserax.core.errors import TesseraxError


def shift_time(t, shift):
  """SD3 timestep shift t' = s t / (1 + (s - 1) t); s > 1 moves times towards noise (t = 1)."""
  if not shift > 0:
    raise TesseraxError(f"timestep shift must be positive, got {shift}")
  t = jnp.asarray(t, jnp.float32)
  return shift * t / (1.0 + (shift - 1.0) * t)


def time_grid(num_steps: int, shift: float = 1.0) -> jnp.ndarray:
  """num_steps + 1 times from 1.0 (noise) down to 0.0 (data): uniform, then shifted."""
  if not (isinstance(num_steps, int) and num_steps >= 1):
    raise TesseraxError(f"num_steps must be a positive integer, got {num_steps!r}")
  return shift_time(jnp.linspace(1.0, 0.0, num_steps + 1), shift)
