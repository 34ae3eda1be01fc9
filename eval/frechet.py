"""Frechet distance between two Gaussians, in float64 on the host (Heusel et al. 2017).

FD = |mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr sqrt(S1 S2), with tr sqrt(S1 S2) computed by the
symmetric eigenvalue route: S1 S2 is similar to M = S1^1/2 S2 S1^1/2, which
is symmetric PSD, so tr sqrt(S1 S2) = sum_i sqrt(lambda_i(M)). Only symmetric eigensolvers
are needed and, unlike scipy.linalg.sqrtm, nothing turns complex. No epsilon is added.
"""
import numpy as np

from tesserax.core.errors import TesseraxError


def _check(name, mu, sigma):
  if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
    raise TesseraxError(
        f"{name}: need mu [D] and sigma [D, D], got shapes {mu.shape} and {sigma.shape}")
  if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
    raise TesseraxError(f"{name}: mu or sigma contains NaN or Inf")


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), float64 NumPy."""
  mu1, sigma1 = np.asarray(mu1, np.float64), np.asarray(sigma1, np.float64)
  mu2, sigma2 = np.asarray(mu2, np.float64), np.asarray(sigma2, np.float64)
  _check("statistics 1", mu1, sigma1)
  _check("statistics 2", mu2, sigma2)
  if mu1.shape != mu2.shape:
    raise TesseraxError(
        f"feature dimensions differ: {mu1.shape[0]} vs {mu2.shape[0]}")
  w, v = np.linalg.eigh(sigma1)
  sqrt_s1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
  m = sqrt_s1 @ sigma2 @ sqrt_s1
  eig = np.linalg.eigvalsh((m + m.T) / 2)
  tr_covmean = np.sum(np.sqrt(np.clip(eig, 0.0, None)))
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)
