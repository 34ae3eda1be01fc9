"""Layer 3: samplers over plain functions (solvers, time grids, guidance, DDPM/DDIM), each
registered under its `config.sample.solver` name with the prediction kind it consumes."""
from tesserax.sampling import ddpm_sampler, flow_map, multistep, sample  # registers samplers
from tesserax.sampling import autoregressive_decode, maskgit_decode  # registers token samplers
from tesserax.sampling import reflow_sampler  # registers samplers
from tesserax.sampling import consistency  # registers the consistency samplers
from tesserax.sampling import flowturbo_sampler  # registers the FlowTurbo sampler
