"""Layer 8: official checkpoints <-> tesserax: file readers (torch_reader) and per-model key
maps (dit_checkpoints: DiT, SiT, LightningDiT workdirs; vae_checkpoints: VA-VAE and SD-VAE
tokenizer directories), each kind registered for `tesserax convert --kind`."""
from tesserax.convert import dit_checkpoints, vae_checkpoints  # registers the converters
from tesserax.convert import flextok_checkpoints  # registers flextok, flextok-vae
from tesserax.convert import titok_checkpoints  # registers the TiTok / MaskGIT-VQGAN kinds
