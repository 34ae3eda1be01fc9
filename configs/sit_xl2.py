"""SiT-XL/2 on ImageNet 256x256 SD-VAE latents: the published recipe (willisma/SiT train.py,
linear path, velocity prediction; reference/generators.md §3.1).

Model:     SiT-XL/2 = DiT-XL/2's network (675,129,632 parameters) fed t raw with t = 0 noise
           (`time_convention='t0_noise'`, time_scale 1), learned sigma on as in the released
           checkpoint (8 output channels, the second half unused).
Objective: rectified flow (the linear path), uniform t, velocity MSE.
Optimizer: AdamW, lr 1e-4 constant, betas (0.9, 0.999), no weight decay, global batch 256, EMA
           0.9999, 7M steps (~1400 epochs); bfloat16 compute, float32 parameters.
Sampling:  `eval`: Heun ODE, 125 steps (250 NFE), cfg 1.5 on the first 3 channels (SiT #18);
           the paper's headline 2.06 is an SDE sampler, which tesserax does not have.
Data:      `data.name='latents'`, an ImageNet latent cache through sd-vae-ft-ema times 0.18215
           with flipped copies. The latent-cache dataset arrives with the tokenizer issue.

Launch:   tesserax train --config sit_xl2 --workdir WORKDIR --config.data.data_dir=CACHE
Runtime:  as DiT-XL/2 (configs/dit_xl2.py): same network and FLOPs.
Expected: FID-50K 2.06 (SDE, cfg 1.5), ~2.15 with the Heun ODE (SiT #14); 8.61 without
          guidance.
"""
from tesserax.generators import dit
from tesserax.training.config import base_config


def get_config(arg=None):
  del arg
  config = base_config()
  config.num_steps = 7_000_000
  config.batch_size = 256
  config.ema_decay = 0.9999
  config.log_every_steps = 100
  config.data = dict(name="latents", data_dir="", manual_dir="", resolution=32, split="train",
                     random_flip=False, num_classes=1000)
  config.model = dit.sit_config("XL/2", dtype="bfloat16")
  config.objective = dict(name="rectified_flow", time_sampling="uniform", logit_mean=0.0,
                          logit_std=1.0)
  config.optim.lr = 1e-4
  config.optim.b1, config.optim.b2 = 0.9, 0.999
  config.optim.weight_decay = 0.0
  config.optim.schedule = "constant"
  config.checkpoint.every_steps = 50_000
  config.checkpoint.keep_every = 500_000
  config.sample.every_steps = 0  # a grid of 1000 classes is an evaluation job here
  config.eval.update(dict(sampler="heun", num_steps=125, shift=1.0, cfg_scale=1.5,
                     interval=(0.0, 1.0), guided_channels=3, num_samples=50_000))
  return config
