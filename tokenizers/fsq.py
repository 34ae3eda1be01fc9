"""Finite scalar quantization (Mentzer et al. 2023, "Finite Scalar Quantization: VQ-VAE Made
Simple", App. A.1), as FlexTok uses it (apple/ml-flextok flextok/regularizers/quantize_fsq.py).

Each of the d channels is bounded to (-L/2, L/2) and rounded to one of L levels:

  bound(z) = tanh(z + atanh(offset / half_l)) * half_l - offset,
  half_l = (L - 1) (1 + 1e-3) / 2, offset = 0.5 for even L, 0 for odd L;

rounded with a straight-through gradient and divided by L // 2, so codes lie in [-1, 1]. A code
is the index sum_i (code_i * (L_i // 2) + L_i // 2) * basis_i, basis = cumprod([1, L_0, ...,
L_{d-2}]); FlexTok's levels (8, 8, 8, 5, 5, 5) give 64,000 codes and basis (1, 8, 64, 512,
2560, 12800). No parameters: the codebook is implicit.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np

FLEXTOK_LEVELS = (8, 8, 8, 5, 5, 5)
BOUND_EPS = 1e-3


def codebook_size(levels) -> int:
  return math.prod(levels)


def _levels(levels, dtype):
  return jnp.asarray(levels, dtype)


def basis(levels) -> np.ndarray:
  """int64 [d]: cumprod([1, L_0, ..., L_{d-2}])."""
  return np.cumprod([1] + list(levels[:-1])).astype(np.int64)


def bound(z, levels, eps=BOUND_EPS):
  """tanh(z + atanh(offset / half_l)) * half_l - offset over the last axis (size d)."""
  l = _levels(levels, z.dtype)
  half_l = (l - 1) * (1 + eps) / 2
  offset = jnp.where(jnp.asarray(levels) % 2 == 0, 0.5, 0.0).astype(z.dtype)
  return jnp.tanh(z + jnp.arctanh(offset / half_l)) * half_l - offset


def round_ste(z):
  """round(z) forward, identity gradient (straight-through estimator)."""
  return z + jax.lax.stop_gradient(jnp.round(z) - z)


def quantize(z, levels, skip_rounding=None):
  """Codes in [-1, 1]: bound, round (straight-through), divide by L // 2. z [..., d] float.

  skip_rounding: optional bool [B] (leading axis), examples passed on bounded but unrounded
  (the official `drop_quant_p` training option, drawn per example by the caller)."""
  bounded = bound(z, levels)
  rounded = round_ste(bounded)
  if skip_rounding is not None:
    keep = skip_rounding.reshape(skip_rounding.shape + (1,) * (z.ndim - 1))
    rounded = jnp.where(keep, bounded, rounded)
  return rounded / _levels([l // 2 for l in levels], z.dtype)


def codes_to_indices(codes, levels):
  """int32 indices [...] of codes [..., d] (rounded codes; `quantize`'s output)."""
  half = _levels([l // 2 for l in levels], codes.dtype)
  digits = jnp.round(codes * half + half).astype(jnp.int32)
  return (digits * jnp.asarray(basis(levels), jnp.int32)).sum(-1)


def indices_to_codes(indices, levels, dtype=jnp.float32):
  """Codes [..., d] in [-1, 1] of int indices [...]: the inverse of `codes_to_indices`."""
  digits = (indices[..., None] // jnp.asarray(basis(levels), jnp.int32)) % jnp.asarray(
      levels, jnp.int32)
  half = _levels([l // 2 for l in levels], dtype)
  return (digits.astype(dtype) - half) / half


def corrupt_indices(key, indices, size, p):
  """Token corruption (the official `corrupt_tokens_p` training option): each index replaced
  with probability p by a uniform draw from [0, size)."""
  k_mask, k_draw = jax.random.split(key)
  draw = jax.random.randint(k_draw, indices.shape, 0, size, indices.dtype)
  return jnp.where(jax.random.uniform(k_mask, indices.shape) < p, draw, indices)
