"""Image <-> latents/tokens. KL autoencoders, TiTok and FlexTok land here (later issues)."""
