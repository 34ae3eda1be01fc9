"""DPM-Solver++ (2M, 3M) and UniPC-bh2 for flow models (sampling/multistep.py).

Oracles: a step-by-step float64 NumPy transcription of the update rules (DPM-Solver++ Alg. 2
in midpoint form, UniPC Alg. 2-3 with B(h) = e^h - 1, diffusers' low-order warm-up and final
steps), and the exact velocity field of a Gaussian mixture on a ring (8 modes, radius 2, std
0.5): the solvers' order of convergence against a 2048-step Heun solution, and their lead
over Euler at equal NFE.
"""
import numpy as np
import jax
import jax.numpy as jnp
import pytest

from tesserax.core import registry
from tesserax.core.errors import TesseraxError
from tesserax.sampling import multistep, solvers, timesteps

ANGLES = 2 * np.pi * np.arange(8) / 8
MEANS = np.stack([2 * np.cos(ANGLES), 2 * np.sin(ANGLES)], 1)
STD = 0.5


def ring_velocity(xp):
  """The exact rectified-flow velocity of the ring mixture, in NumPy (xp=np) or JAX."""
  def velocity(x, t):
    m, c = (1 - t) * MEANS, (1 - t) ** 2 * STD ** 2 + t ** 2
    diff = x[:, None, :] - m
    log_w = -0.5 * xp.sum(diff ** 2, -1) / c
    w = xp.exp(log_w - log_w.max(1, keepdims=True))
    w = w / w.sum(1, keepdims=True)
    x0 = MEANS + ((1 - t) * STD ** 2 / c) * diff
    return xp.sum(w[..., None] * ((t / c) * diff - x0), 1)
  return velocity


def lam(t):
  return np.log((1 - t) / t)


def reference_dpm_solver(velocity, x, times, order):
  """DPM-Solver++ step by step on a grid inside (0, 1) ending at 0."""
  n, ms = len(times) - 1, []
  for i in range(n):
    s, t = times[i], times[i + 1]
    ms.append(x - s * velocity(x, s))
    k = min(order, len(ms))
    k = 1 if i == n - 1 else (min(k, 2) if i == n - 2 and n < 15 else k)
    if t == 0:
      x = ms[-1]
      continue
    h = lam(t) - lam(s)
    e, a = np.exp(-h) - 1, 1 - t
    d0 = ms[-1]
    if k == 1:
      x = t / s * x - a * e * d0
    elif k == 2:
      d1 = (ms[-1] - ms[-2]) / ((lam(s) - lam(times[i - 1])) / h)
      x = t / s * x - a * e * d0 - 0.5 * a * e * d1
    else:
      r0, r1 = (lam(s) - lam(times[i - 1])) / h, (lam(times[i - 1]) - lam(times[i - 2])) / h
      d1_0, d1_1 = (ms[-1] - ms[-2]) / r0, (ms[-2] - ms[-3]) / r1
      d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
      d2 = (d1_0 - d1_1) / (r0 + r1)
      x = (t / s * x - a * e * d0 + a * (e / h + 1) * d1
           - a * ((e + h) / h ** 2 - 0.5) * d2)
  return x


def reference_unipc(velocity, x, times):
  """UniPC-bh2 of order 2 (UniP + UniC) step by step on a grid inside (0, 1) ending at 0."""
  n, ms, base, previous_order = len(times) - 1, [], None, None

  def terms(s_i, t_i):
    s, t = times[s_i], times[t_i]
    h = lam(t) - lam(s)
    phi = np.expm1(-h)
    return s, t, h, phi

  for i in range(n):
    m = x - times[i] * velocity(x, times[i])
    if i > 0:  # UniC: correct x_i with m_i, from the base x_{i-1}
      s, t, h, phi = terms(i - 1, i)
      x = t / s * base - (1 - t) * phi * ms[-1]
      if previous_order == 1:
        x -= (1 - t) * phi * 0.5 * (m - ms[-1])
      else:
        rk = (lam(times[i - 2]) - lam(s)) / h
        hh = -h
        b1 = (phi / hh - 1) / phi
        b2 = ((phi / hh - 1) / hh - 0.5) * 2 / phi
        rho = np.linalg.solve(np.array([[1.0, 1.0], [rk, 1.0]]), np.array([b1, b2]))
        x -= (1 - t) * phi * (rho[0] * (ms[-2] - ms[-1]) / rk + rho[1] * (m - ms[-1]))
    ms.append(m)
    base = x
    k = 1 if i == n - 1 else min(2, len(ms))
    if times[i + 1] == 0:
      x = m
    else:  # UniP
      s, t, h, phi = terms(i, i + 1)
      x = t / s * x - (1 - t) * phi * m
      if k == 2:
        rk = (lam(times[i - 1]) - lam(s)) / h
        x -= (1 - t) * phi * 0.5 * (ms[-2] - m) / rk
    previous_order = k
  return x


@pytest.mark.parametrize("steps", [5, 20])
def test_the_coefficient_tables_equal_the_stepwise_update_rules(steps):
  """On a grid starting below t = 1 (diffusers' flow grid: 0.999 ... 0)."""
  times = np.append(np.linspace(0.999, 0.0, steps + 1)[:-1], 0.0)
  z = np.random.default_rng(0).standard_normal((16, 2))
  for name, reference in (("dpm_solver_2m", lambda v, x, g: reference_dpm_solver(v, x, g, 2)),
                          ("dpm_solver_3m", lambda v, x, g: reference_dpm_solver(v, x, g, 3)),
                          ("unipc", reference_unipc)):
    want = reference(ring_velocity(np), z, times)
    got = multistep.SOLVERS[name](ring_velocity(jnp), jnp.asarray(z, jnp.float32), times)
    np.testing.assert_allclose(got, want, atol=2e-5, err_msg=name)


def run_on_host(name, velocity, x, times):
  """A solver's coefficient tables applied in float64 NumPy (the compiled loop is checked
  against the stepwise rules above)."""
  solve = multistep.SOLVERS[name]
  order, history = solve.keywords["order"], []
  if solve.func is multistep.dpm_solver_pp:
    for i, row in enumerate(multistep.dpm_solver_coefficients(times, order)):
      history = [x - times[i] * velocity(x, times[i])] + history[:order - 1]
      x = row[0] * x + sum(c * m for c, m in zip(row[1:], history))
    return x
  base = x
  for i, (p, c) in enumerate(zip(*multistep.unipc_coefficients(times, order))):
    m = x - times[i] * velocity(x, times[i])
    x = (c[0] * x + c[1] * base + sum(w * h for w, h in zip(c[2:2 + order], history))
         + c[-1] * m)
    history, base = [m] + history[:order - 1], x
    x = p[0] * x + sum(w * h for w, h in zip(p[1:], history))
  return x


def euler_on_host(velocity, x, times):
  for t, t_next in zip(times[:-1], times[1:]):
    x = x + (t_next - t) * velocity(x, t)
  return x


def heun_on_host(velocity, x, times):
  for t, t_next in zip(times[:-1], times[1:]):
    d = velocity(x, t)
    x = x + (t_next - t) * 0.5 * (d + velocity(x + (t_next - t) * d, t_next))
  return x


@pytest.fixture(scope="session")
def endpoint_errors():
  """RMS endpoint error against a 2048-step Heun solution from the same noise, per solver and
  NFE, on tesserax's grid from t = 1."""
  velocity = ring_velocity(np)
  z = np.random.default_rng(0).standard_normal((1000, 2))
  exact = heun_on_host(velocity, z, np.linspace(1.0, 0.0, 2049))
  errors = {}
  for name in ("euler",) + tuple(multistep.SOLVERS):
    for nfe in (4, 8, 16, 32, 64, 128, 256):
      grid = np.linspace(1.0, 0.0, nfe + 1)
      out = (euler_on_host(velocity, z, grid) if name == "euler"
             else run_on_host(name, velocity, z, grid))
      errors[name, nfe] = float(np.sqrt(np.mean(np.sum((out - exact) ** 2, -1))))
  return errors


@pytest.mark.parametrize("name", list(multistep.SOLVERS))
def test_second_order_convergence_and_the_lead_over_euler(endpoint_errors, name):
  e = endpoint_errors
  for nfe in (4, 8, 16, 32, 64):
    assert e[name, nfe] < e["euler", nfe], (nfe, e[name, nfe], e["euler", nfe])
  # The error falls about 4x per doubling of steps (within 20%) once asymptotic; DPM-Solver++
  # (2M) gets there later on this grid (its first steps from t = 1 are first order).
  pairs = [(128, 256)] if name == "dpm_solver_2m" else [(32, 64), (64, 128), (128, 256)]
  for n in pairs:
    assert 3.2 <= e[name, n[0]] / e[name, n[1]] <= 4.8, (n, e[name, n[0]], e[name, n[1]])
  assert 3.2 <= e["euler", 128] / e["euler", 256] * 2 <= 4.8  # Euler: first order


def test_registered_samplers_run_guided_through_the_sampler_module():
  """sample.build with cfg w: a model whose unconditional velocity is 0 is solved as w v."""
  import ml_collections
  from tesserax.sampling import sample
  velocity = ring_velocity(jnp)
  predict = lambda params, x, t, labels: jnp.where((labels == 0)[:, None],
                                                   velocity(x, t[0]), 0.0)
  z = jax.random.normal(jax.random.PRNGKey(1), (8, 2))
  labels = jnp.zeros(8, jnp.int32)
  for name in multistep.SOLVERS:
    assert registry.SAMPLERS.get(name).consumes == "velocity"
    settings = ml_collections.ConfigDict(dict(
        solver=name, num_steps=6, shift=2.0, cfg_scale=1.5, interval=(0.0, 1.0),
        guided_channels=None, final_correction=True))
    run = sample.build(settings, {"velocity": predict}, null_label=1)
    want = multistep.SOLVERS[name](lambda x, t: 1.5 * velocity(x, t), z,
                                   timesteps.time_grid(6, 2.0))
    np.testing.assert_allclose(run(None, z, labels, None), want, rtol=1e-5, atol=1e-6)
  with pytest.raises(TesseraxError, match="decreasing time grid"):
    multistep.dpm_solver_coefficients(np.array([1.0, 0.5, 0.6, 0.0]), 2)
