"""Class-conditional rectified-flow DiT on scikit-learn's digits (16x16, 1 channel), on CPU.

The offline default behind `tesserax demo`: 1,500 real training images served at 16x16 in
[-1, 1]; a DiT-S-like width-128, 4-block DiT with patch 4 (16 tokens); logit-normal rectified
flow with 10% label dropout.

Launch:   tesserax train --config digits_dit --workdir workdirs/digits
Runtime:  about 3 minutes on 2 CPU cores (see README, "The demo").
Expected: EMA samples at 32 Euler steps are classified as the requested digit > 90% of the
          time by the digits feature network; FID-digits falls with NFE (figures in README).

`get_config("tiny")` is the test size: a 2-block, width-32 DiT for a few steps.
"""
from tesserax.core.config import base_config

ARGS = ("tiny",)


def get_config(arg=None):
  config = base_config()
  config.seed = 0
  config.num_steps = 2000
  config.batch_size = 64
  config.ema_decay = 0.995
  config.log_every_steps = 100
  config.data = dict(name="digits", data_dir="", manual_dir="", resolution=16, split="train",
                     random_flip=False, num_classes=10)
  config.model = dict(name="dit", input_size=16, in_channels=1, patch_size=4, hidden_size=128,
                      depth=4, num_heads=4, mlp_ratio=4.0, num_classes=10, class_dropout=0.1,
                      learn_sigma=False, time_scale=1000.0, dtype="float32")
  config.objective = dict(name="rectified_flow", time_sampling="logit_normal", logit_mean=0.0,
                          logit_std=1.0)
  config.optim.lr = 1e-3
  config.optim.warmup_steps = 100
  config.optim.schedule = "cosine"
  config.optim.end_lr_factor = 0.05
  config.optim.grad_clip = 1.0
  config.checkpoint.every_steps = 500
  config.sample.every_steps = 1000
  config.sample.num_per_class = 10
  # FID-digits and accuracy of 1,000 samples (off during training; the demo scores them).
  config.evals.digits = dict(type="digits", every_steps=0, num_samples=1000, batch_size=500)
  # The demo's sweep (demos/demo.py): every flow sampler at these NFE, with this guidance.
  config.demo = dict(nfe=(1, 2, 4, 8, 16, 32), cfg_scale=1.0)
  if arg == "tiny":
    config.num_steps = 4
    config.batch_size = 16
    config.log_every_steps = 2
    config.model.hidden_size = 32
    config.model.depth = 2
    config.model.num_heads = 2
    config.checkpoint.every_steps = 2
    config.sample.every_steps = 0
    config.evals.digits.update(num_samples=20, batch_size=20)
    config.demo.nfe = (1, 2)
  return config
