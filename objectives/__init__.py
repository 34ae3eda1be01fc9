"""Layer 4: training objectives, one file each, registered by name (objectives/context.py has
the contract)."""
from tesserax.objectives import ddpm, meanflow, rectified_flow  # registers the objectives
from tesserax.objectives import masked_tokens, next_token  # registers the token objectives
from tesserax.objectives import imf, reflow, shortcut  # registers the objectives
from tesserax.objectives import flowturbo, slimflow  # registers the objectives
from tesserax.objectives import cd, consistency_training, ctm, ect, ict, scm  # consistency models
