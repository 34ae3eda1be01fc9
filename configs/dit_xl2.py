"""DiT-XL/2 on ImageNet 256x256 (arg "512": 512x512) SD-VAE latents: the published recipe
(facebookresearch/DiT train.py and sample_ddp.py; Peebles & Xie 2023).

Model:     DiT-XL/2, 675,129,632 parameters, learned sigma, on 32x32x4 latents (64x64x4 at 512).
Objective: DDPM epsilon prediction on 1000 linear betas, loss MSE + VB (objectives/ddpm.py).
Optimizer: AdamW, lr 1e-4 constant, betas (0.9, 0.999), no weight decay, global batch 256, EMA
           0.9999; 7M steps at 256 (~1400 epochs), 3M at 512. bfloat16 compute with float32
           parameters (the official code trains in fp32/TF32).
Sampling:  `sample`: DDPM with 250 respaced steps and cfg 1.5 on the first 3 channels
           (sampling/ddpm.py make_ddpm_sampler, guided_channels=3), as for the paper's FIDs;
           sample.py uses cfg 4.0 for pictures.
Data:      `data.name='latents'`, an ImageNet latent cache through sd-vae-ft-ema times 0.18215
           with flipped copies. The latent-cache dataset arrives with the tokenizer issue.

Launch:   tesserax train --config dit_xl2 --workdir WORKDIR --config.data.data_dir=CACHE
          On a pod add --config.mesh.fsdp=-1 (FSDP over all devices); --config.model.remat=True
          trades ~1/3 more compute for activation memory.
Runtime:  the paper reports ~5.7 steps/s on a TPU v3-256 pod, ~14 days for 7M steps; for
          tesserax see benchmarks/dit_family.py.
Expected: FID-50K 2.27 at 7M steps with cfg 1.5 (9.62 without guidance); at 400K steps without
          guidance FID 19.5 (JAX) / 18.1 (PyTorch). 512x512: FID 3.04 after 3M steps.
"""
from tesserax.generators import dit
from tesserax.core.config import base_config

LATENT_SIZE = {"256": 32, "512": 64}
ARGS = tuple(LATENT_SIZE)


def get_config(arg="256"):
  latent = LATENT_SIZE[arg]
  config = base_config()
  config.num_steps = 7_000_000 if arg == "256" else 3_000_000
  config.batch_size = 256
  config.ema_decay = 0.9999
  config.log_every_steps = 100
  config.data = dict(name="latents", data_dir="", manual_dir="", resolution=latent,
                     split="train", random_flip=False, num_classes=1000)
  config.model = dit.dit_config("XL/2", input_size=latent, dtype="bfloat16")
  config.objective = dict(name="ddpm")
  config.optim.lr = 1e-4
  config.optim.b1, config.optim.b2 = 0.9, 0.999
  config.optim.weight_decay = 0.0
  config.optim.schedule = "constant"
  config.checkpoint.every_steps = 50_000
  config.checkpoint.keep_every = 500_000
  config.sample.every_steps = 0  # a grid of 1000 classes is an evaluation job here
  config.sample.update(dict(solver="ddpm", num_steps=250, cfg_scale=1.5, guided_channels=3))
  config.evals.fid = dict(type="inception", every_steps=0, ref="", metrics=("fid",),
                          num_samples=50_000, batch_size=500)
  return config
