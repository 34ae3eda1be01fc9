"""Networks that model latents or tokens (DiT family) and their training objectives."""
