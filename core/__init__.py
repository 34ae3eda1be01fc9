"""Layer 1: errors, configs, mesh and sharding, multi-host start-up, checkpoints, optimizers
and EMA, the train state, the batched mesh runner and the registries."""
