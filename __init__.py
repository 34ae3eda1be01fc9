"""tesserax: a JAX/Flax suite for generative image modelling.

See README.md for usage and ../shared/DESIGN.md for the layout and conventions.
"""
import jax
from flax import nnx

# Same seed and config give the same random numbers on 1 device, N devices or N processes.
jax.config.update("jax_threefry_partitionable", True)
# Parameters carry logical axis names; shardings are resolved by training/sharding.py, not at
# construction time, so a model can be built (or shape-evaluated) without a mesh.
nnx.use_eager_sharding(False)

__version__ = "0.1.0"
