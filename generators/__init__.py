"""Networks that model latents or tokens: the DiT family (DiT, SiT, LightningDiT).

Importing the package registers its networks in core/registry.py's NETWORKS.
"""
from tesserax.generators import dit  # registers "dit"
from tesserax.generators import autoregressive, maskgit  # registers the token generators
