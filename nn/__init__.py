"""Layer 2: the layers every network shares (attention, MLPs, norms, embeddings, RoPE).

Imports only tesserax.core, flax, jax and numpy.
"""
