"""A small LightningDiT on scikit-learn's digits (16x16, 1 channel), on CPU: the digits demo
(configs/digits_dit.py: data, optimizer, evaluation) with LightningDiT's network and objective.

Model:     SwiGLU, RMSNorm, 2D RoPE (plus the absolute pos_embed), width 128, 4 blocks, 4 heads,
           patch 4 (16 tokens, the digits DiT's size, so the two demos compare at equal cost),
           t = 0 noise fed raw as in LightningDiT (`time_convention='t0_noise'`, time_scale 1).
Objective: rectified flow, logit-normal(0, 1) t, velocity MSE + the cosine loss; AdamW betas
           (0.9, 0.95) as LightningDiT, the demo's lr schedule and clipping.

Launch:   tesserax train --config lightningdit_digits --workdir workdirs/ldit_digits
          or, with the demo's evaluation, `tesserax.demos.demo.run(config, workdir)`.
Runtime:  about 4 minutes on 2 CPU cores (~12 steps/s, then the demo's evaluation).
Expected: measured on 2 CPU cores with cfg 1: FID-digits 20.3 at 32 Euler NFE (23.2 at 8,
          67 at 2; the real-data floor is 12.6) and 89% class accuracy of the samples.

`get_config("tiny")` is the test size: a 2-block, width-32 model for a few steps.
"""
from tesserax.generators import dit
from tesserax.core import config as config_lib

ARGS = ("tiny",)


def get_config(arg=None):
  config = config_lib.load("digits_dit:tiny" if arg == "tiny" else "digits_dit")
  config.model = dit.lightningdit_config(
      "S/4", input_size=16, in_channels=1, hidden_size=128, depth=4, num_heads=4,
      num_classes=10)
  config.objective = dict(name="rectified_flow", time_sampling="logit_normal", logit_mean=0.0,
                          logit_std=1.0, cosine_loss=True)
  config.optim.b2 = 0.95
  if arg == "tiny":
    config.model.hidden_size = 32
    config.model.depth = 2
    config.model.num_heads = 2
  return config
