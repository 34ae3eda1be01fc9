"""Image <-> latents/tokens: the tokenizer interface and directory format (tokenizer.py), the
KL autoencoder, caches and reconstructions. Importing the package registers its tokenizers."""
from tesserax.tokenizers import kl_autoencoder  # registers "kl_autoencoder"
from tesserax.tokenizers import flextok  # registers "flextok"
from tesserax.tokenizers import maskgit_vqgan, titok  # registers "maskgit_vqgan", "titok"
