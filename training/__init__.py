"""Mesh and sharding rules, train state, optimizers, EMA, checkpointing, the trainer loop."""
