"""Readers for official PyTorch/safetensors checkpoints and per-model key maps (later issues)."""
