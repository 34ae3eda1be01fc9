"""Multistep solvers for flow models: DPM-Solver++ (2M, 3M) and UniPC (bh2).

Both integrate the probability-flow ODE in its data-prediction form (Lu et al. 2022,
"DPM-Solver++", Alg. 2; Zhao et al. 2023, "UniPC", Alg. 2-3 with B(h) = e^h - 1, "bh2"). A flow
model's velocity gives the data prediction x0 = x_t - t v; the path x_t = (1 - t) x0 + t eps
has alpha_t = 1 - t, sigma_t = t and lambda_t = log(alpha_t / sigma_t) (DESIGN.md time: t = 1
is noise). The step rules, orders and warm-up follow diffusers' DPMSolverMultistepScheduler
(algorithm_type "dpmsolver++", solver_type "midpoint") and UniPCMultistepScheduler
(predict_x0, "bh2", corrector after every step but the last, `lower_order_final`), over
tesserax's time grid from t = 1 to t = 0:
- the last step, into t = 0 (lambda = +inf), is first order: it returns the data prediction
  (diffusers' final_sigmas_type "zero"); with fewer than 15 steps the 3rd-order solvers also
  drop to 2nd order on the step before (`lower_order_final`);
- a point at t = 1 itself (lambda = -inf) carries no usable difference, so it is left out of
  the higher-order terms (the limit of their formulas), which lowers the order of the steps
  that would use it. diffusers' flow schedules start just below 1 instead.

Every step is linear in the current sample and the stored data predictions, so its
coefficients are computed once per grid on the host in float64, and the compiled loop is a
`lax.fori_loop` of multiply-adds around one velocity evaluation: NFE = number of steps.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from tesserax.core import registry
from tesserax.core.errors import TesseraxError
from tesserax.sampling import sample

LOWER_ORDER_FINAL_STEPS = 15  # diffusers: 2nd-order second-to-last step below this


def _check(times):
  times = np.asarray(times, np.float64)
  if (times.ndim != 1 or len(times) < 2 or times[0] > 1.0 or times[-1] != 0.0
      or np.any(np.diff(times) >= 0)):
    raise TesseraxError("multistep solvers need a decreasing time grid in [0, 1] ending at 0")
  return times


def _lambda(t):
  """log((1 - t) / t) in float64, -inf at t = 1 and +inf at t = 0."""
  with np.errstate(divide="ignore"):
    return np.log1p(-t) - np.log(t)


def _orders(num_steps, order, times):
  """The order of each step: warm-up from 1, no history point at t = 1, first order into
  t = 0, at most 2nd order on the step before that for short grids."""
  orders = []
  for i in range(num_steps):
    usable = sum(1 for j in range(i) if times[j] < 1.0)
    k = min(order, 1 + usable)
    if i == num_steps - 1:
      k = 1
    elif i == num_steps - 2 and num_steps < LOWER_ORDER_FINAL_STEPS:
      k = min(k, 2)
    orders.append(k)
  return orders


def _exp_neg_h_minus_1(t_prev, t_next):
  """e^{-h} - 1 with h = lambda(t_next) - lambda(t_prev), finite at both ends of the grid."""
  return (1 - t_prev) * t_next / (t_prev * (1 - t_next)) - 1 if t_next < 1 else -1.0


def dpm_solver_coefficients(times, order):
  """[N, 1 + order] float64: x_{i+1} = c0 x_i + sum_j c_{1+j} m_{i-j} (m: data predictions)."""
  times = _check(times)
  lam = _lambda(times)
  steps = len(times) - 1
  table = np.zeros((steps, 1 + order))
  for i, k in enumerate(_orders(steps, order, times)):
    s, t = times[i], times[i + 1]
    alpha_t, sigma_ratio = 1 - t, t / s
    phi = _exp_neg_h_minus_1(s, t)
    d = np.zeros((3, order))  # D0, D1, D2 as combinations of m_i, m_{i-1}, m_{i-2}
    d[0, 0] = 1.0
    if k >= 2:
      h = lam[i + 1] - lam[i]
      r0 = (lam[i] - lam[i - 1]) / h
      d1_0 = np.zeros(order)
      d1_0[0], d1_0[1] = 1 / r0, -1 / r0
      if k == 2:
        d[1] = d1_0
      else:
        r1 = (lam[i - 1] - lam[i - 2]) / h
        d1_1 = np.zeros(order)
        d1_1[1], d1_1[2] = 1 / r1, -1 / r1
        d[1] = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
        d[2] = (d1_0 - d1_1) / (r0 + r1)
    if k == 3:  # DPM-Solver++(3M)
      m = (-alpha_t * phi * d[0] + alpha_t * (phi / h + 1) * d[1]
           - alpha_t * ((phi + h) / h ** 2 - 0.5) * d[2])
    else:  # 1st order (DDIM) or 2M, midpoint form
      m = -alpha_t * phi * (d[0] + 0.5 * d[1])
    table[i, 0], table[i, 1:] = sigma_ratio, m
  return table


def _unipc_rhos(hh, rks, order, predictor):
  """UniPC's rho coefficients for B(h) = e^h - 1 (diffusers multi_step_uni_{p,c}_bh_update)."""
  if predictor and order == 2 or not predictor and order == 1:
    return np.array([0.5])  # diffusers' simplified low orders
  h_phi_1 = np.expm1(hh)
  h_phi_k, factorial, b_h = h_phi_1 / hh - 1, 1, np.expm1(hh)
  rows, b = [], []
  for i in range(1, order + 1):
    rows.append(np.asarray(rks) ** (i - 1))
    b.append(h_phi_k * factorial / b_h)
    factorial *= i + 1
    h_phi_k = h_phi_k / hh - 1 / factorial
  rows, b = np.stack(rows), np.asarray(b)
  if predictor:
    return np.linalg.solve(rows[:-1, :-1], b[:-1])
  return np.linalg.solve(rows, b)


def _unipc_update(times, lam, s_index, t_index, k, predictor, order):
  """Coefficients of UniP (predictor) or UniC (corrector) from t_{s_index} to t_{t_index}.

  Returns (a, c): x_t = a x_s + c . [m_s, m_{s-1}, ..., m_{s-order+1}] (+ c_new m_t for UniC,
  returned as the last entry of c).
  """
  s, t = times[s_index], times[t_index]
  alpha_t = 1 - t
  h = lam[t_index] - lam[s_index]
  hh = -h
  phi = _exp_neg_h_minus_1(s, t)  # e^{hh} - 1 = h_phi_1 = B(h) for bh2
  c = np.zeros(order + 1)
  c[0] = -alpha_t * phi
  if np.isinf(h):  # a step from t = 1 or into t = 0: the first-order (DDIM) step
    if not predictor:  # the corrector's 1st order: rho = 0.5 on m_t - m_s
      c[0] += -alpha_t * phi * -0.5
      c[-1] = -alpha_t * phi * 0.5
    return t / s, c
  if predictor and k == 1:
    return t / s, c
  rks = [(lam[s_index - j] - lam[s_index]) / h for j in range(1, k)] + [1.0]
  rhos = _unipc_rhos(hh, rks, k, predictor)
  # D1_j = (m_{s-j} - m_s) / rk_j for j = 1..k-1; the corrector's last term is m_t - m_s.
  for j in range(1, k):
    weight = -alpha_t * phi * rhos[j - 1] / rks[j - 1]
    c[j] += weight
    c[0] -= weight
  if not predictor:
    weight = -alpha_t * phi * rhos[-1]
    c[-1] += weight
    c[0] -= weight
  return t / s, c


def unipc_coefficients(times, order):
  """(predictor [N, 1 + order], corrector [N, 2 + order + 1]) float64 tables.

  Step i: x_i <- b0 x_base + b . [m_{i-1}, ..., m_{i-order}] + b_new m_i (the corrector of
  the previous step's prediction, with m_i evaluated at it; identity at i = 0), then
  x_{i+1} = a0 x_i + a . [m_i, ..., m_{i-order+1}].
  """
  times = _check(times)
  lam = _lambda(times)
  steps = len(times) - 1
  orders = _orders(steps, order, times)
  predictor = np.zeros((steps, 1 + order))
  corrector = np.zeros((steps, 2 + order + 1))  # [keep x, x_base, m_{i-1}.., m_i]
  corrector[0, 0] = 1.0
  for i in range(steps):
    a, c = _unipc_update(times, lam, i, i + 1, orders[i], True, order)
    predictor[i, 0], predictor[i, 1:] = a, c[:order]
    if i > 0:
      b, c = _unipc_update(times, lam, i - 1, i, orders[i - 1], False, order)
      corrector[i, 1], corrector[i, 2:2 + order], corrector[i, -1] = b, c[:order], c[-1]
  return predictor, corrector


def _data_prediction(velocity_fn, x, t):
  return x - t * velocity_fn(x, t)


def dpm_solver_pp(velocity_fn, noise, times, order=2):
  """DPM-Solver++(order M) from t = 1 to 0 over `times`; NFE = len(times) - 1."""
  table = jnp.asarray(dpm_solver_coefficients(times, order), noise.dtype)
  times = jnp.asarray(times, noise.dtype)
  history = jnp.zeros((order,) + noise.shape, noise.dtype)

  def step(i, carry):
    x, history = carry
    history = jnp.concatenate([_data_prediction(velocity_fn, x, times[i])[None],
                               history[:-1]])
    x = table[i, 0] * x + jnp.tensordot(table[i, 1:], history, axes=1)
    return x, history

  return jax.lax.fori_loop(0, table.shape[0], step, (noise, history))[0]


def unipc(velocity_fn, noise, times, order=2):
  """UniPC-bh2 of `order` from t = 1 to 0 over `times`; NFE = len(times) - 1."""
  predictor, corrector = (jnp.asarray(c, noise.dtype) for c in unipc_coefficients(times,
                                                                                  order))
  times = jnp.asarray(times, noise.dtype)
  history = jnp.zeros((order,) + noise.shape, noise.dtype)

  def step(i, carry):
    x, base, history = carry
    m = _data_prediction(velocity_fn, x, times[i])
    c = corrector[i]
    x = (c[0] * x + c[1] * base + jnp.tensordot(c[2:2 + order], history, axes=1)
         + c[-1] * m)
    history = jnp.concatenate([m[None], history[:-1]])
    p = predictor[i]
    return p[0] * x + jnp.tensordot(p[1:], history, axes=1), x, history

  return jax.lax.fori_loop(0, predictor.shape[0], step, (noise, noise, history))[0]


SOLVERS = {
    "dpm_solver_2m": functools.partial(dpm_solver_pp, order=2),
    "dpm_solver_3m": functools.partial(dpm_solver_pp, order=3),
    "unipc": functools.partial(unipc, order=2),
}
for _name, _solve in SOLVERS.items():
  registry.SAMPLERS.register(
      _name, sample.Sampler("velocity", functools.partial(sample.make_flow, _solve)))
