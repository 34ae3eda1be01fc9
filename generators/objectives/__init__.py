"""Training objectives: each turns a network into a loss and into a velocity for samplers."""
