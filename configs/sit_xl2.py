"""SiT-XL/2 on ImageNet 256x256 SD-VAE latents: the published recipe (willisma/SiT train.py,
linear path, velocity prediction; Ma et al. 2024).

Model:     SiT-XL/2 = DiT-XL/2's network (675,129,632 parameters) fed t raw with t = 0 noise
           (`time_convention='t0_noise'`, time_scale 1), learned sigma on as in the released
           checkpoint (8 output channels, the second half unused).
Objective: rectified flow (the linear path), uniform t, velocity MSE.
Optimizer: AdamW, lr 1e-4 constant, betas (0.9, 0.999), no weight decay, global batch 256, EMA
           0.9999, 7M steps (~1400 epochs); bfloat16 compute, float32 parameters.
Sampling:  `sample`: Heun ODE, 125 steps (250 NFE), cfg 1.5 on the first 3 channels (SiT #18);
           the paper's headline 2.06 is an SDE sampler, which tesserax does not have.
Data:      `data.name='latents'`, an ImageNet latent cache through sd-vae-ft-ema times 0.18215
           with flipped copies. The latent-cache dataset arrives with the tokenizer issue.

Launch:   tesserax train --config sit_xl2 --workdir WORKDIR --config.data.data_dir=CACHE
Runtime:  as DiT-XL/2 (configs/dit_xl2.py): same network and FLOPs.
Expected: FID-50K 2.06 (SDE, cfg 1.5), ~2.15 with the Heun ODE (SiT #14); 8.61 without
          guidance.
"""
from tesserax.configs import dit_xl2
from tesserax.generators import dit

ARGS = ()  # 256x256 only


def get_config():
  """DiT-XL/2's recipe (configs/dit_xl2.py: batch, optimizer, EMA, steps, data) with SiT's
  network, objective and sampler."""
  config = dit_xl2.get_config("256")
  config.model = dit.sit_config("XL/2", dtype="bfloat16")
  config.objective = dict(name="rectified_flow", time_sampling="uniform", logit_mean=0.0,
                          logit_std=1.0)
  config.sample.update(dict(solver="heun", num_steps=125, shift=1.0, interval=(0.0, 1.0)))
  return config
