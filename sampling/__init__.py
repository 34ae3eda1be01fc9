"""Solvers, timestep grids and guidance; independent of any network."""
