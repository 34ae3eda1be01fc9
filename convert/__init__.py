"""Official checkpoints <-> tesserax: file readers (torch_reader) and per-model key maps (dit:
DiT, SiT, LightningDiT)."""
