"""Latent bottlenecks of TiTok (bytedance/1d-tokenizer modeling/quantizer/quantizer.py).

- `vector_quantize`: VQ-VAE quantisation (van den Oord et al. 2017, eq. 3) in float32: the
  nearest codebook entry by squared distance, with `use_l2_norm` both z and the codebook
  l2-normalised first (ViT-VQGAN, Yu et al. 2022 §3.2) and the normalised entry returned; loss
  beta * mean((sg[zq] - z)^2) + mean((zq - sg[z])^2) (beta the commitment cost, 0.25), where z is
  the normalised z under `use_l2_norm`; the straight-through estimator z + sg[zq - z].
- `codebook_entry`: the (normalised where `use_l2_norm`) entries of token ids, what decoding
  token ids uses.
- `cluster_codebook`: TA-TiTok's `clustering_vq`, the online codebook re-initialisation of
  CVQ-VAE (Zheng & Vedaldi 2023, lyndonzheng/CVQ-VAE quantise.py): `embed_prob` is an EMA (decay
  0.99) of code usage; each entry moves towards the (unnormalised) feature nearest to it by
  decay_k = exp(-embed_prob_k * K * 10 / (1 - 0.99) - 1e-3), rarely used entries the most.
- `gaussian_posterior`, `gaussian_kl`: the diagonal Gaussian of the VAE variants (first half of
  the channels the mean, second half the log-variance clamped to [-30, 20]), KL to N(0, I)
  summed over the latent and averaged over the batch (DiagonalGaussianDistribution.kl sums over
  the token and channel dims of its [B, C, 1, N] input).
"""
import jax
import jax.numpy as jnp

from tesserax.tokenizers import kl_autoencoder

COMMITMENT_COST = 0.25
CLUSTER_DECAY = 0.99


def l2_normalize(x, eps=1e-12):
  """torch.nn.functional.normalize: x / max(|x|, eps)."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def distances(z, codebook):
  """|z - e_k|^2 = |z|^2 + |e_k|^2 - 2 z.e_k, [..., K]."""
  return (jnp.sum(z ** 2, -1, keepdims=True) + jnp.sum(codebook ** 2, -1)
          - 2 * jnp.einsum("...c,kc->...k", z, codebook))


def codebook_entry(codebook, ids, use_l2_norm):
  """The codebook rows of `ids` [...] -> [..., C], normalised where `use_l2_norm`."""
  entries = jnp.take(codebook.astype(jnp.float32), ids, axis=0)
  return l2_normalize(entries) if use_l2_norm else entries


def vector_quantize(z, codebook, use_l2_norm, commitment_cost=COMMITMENT_COST):
  """z [..., C] -> (z_q straight-through [..., C], ids [...] int32, {"quantizer_loss",
  "commitment_loss", "codebook_loss"}, distances [..., K])."""
  z = z.astype(jnp.float32)
  codebook = codebook.astype(jnp.float32)
  if use_l2_norm:
    z, codebook = l2_normalize(z), l2_normalize(codebook)
  d = distances(z, codebook)
  ids = jnp.argmin(d, axis=-1).astype(jnp.int32)
  z_q = jnp.take(codebook, ids, axis=0)
  commitment = commitment_cost * jnp.mean((jax.lax.stop_gradient(z_q) - z) ** 2)
  codebook_loss = jnp.mean((z_q - jax.lax.stop_gradient(z)) ** 2)
  losses = {"quantizer_loss": commitment + codebook_loss, "commitment_loss": commitment,
            "codebook_loss": codebook_loss}
  return z + jax.lax.stop_gradient(z_q - z), ids, losses, d


def cluster_codebook(codebook, embed_prob, z, ids, d, decay=CLUSTER_DECAY):
  """One `clustering_vq` update (outside the gradient): (new codebook [K, C], new embed_prob
  [K]) from this step's unnormalised features z [..., C], their codes ids [...] and distances d
  [..., K] (all devices' features, as the official code gathers them)."""
  k, c = codebook.shape
  z = jax.lax.stop_gradient(z.reshape(-1, c).astype(jnp.float32))
  usage = jnp.mean(jax.nn.one_hot(ids.reshape(-1), k, dtype=jnp.float32), axis=0)
  embed_prob = embed_prob * decay + usage * (1 - decay)
  nearest_feature = z[jnp.argmin(d.reshape(-1, k), axis=0)]
  w = jnp.exp(-(embed_prob * k * 10) / (1 - decay) - 1e-3)[:, None]
  return codebook * (1 - w) + nearest_feature * w, embed_prob


def gaussian_posterior(moments):
  """moments [..., 2C] -> (mean, logvar) [..., C], logvar clamped to [-30, 20]."""
  mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
  return mean, jnp.clip(logvar, *kl_autoencoder.LOGVAR_RANGE)


def gaussian_kl(mean, logvar):
  """KL(N(mean, exp(logvar)) || N(0, I)) summed over each example, averaged over the batch."""
  kl = 0.5 * jnp.sum(mean ** 2 + jnp.exp(logvar) - 1.0 - logvar,
                     axis=tuple(range(1, mean.ndim)))
  return jnp.mean(kl)
