"""A digits-scale VA-VAE: the KL autoencoder with the full VA-VAE loss on scikit-learn's digits
(16x16, 1 channel), on CPU.

Model:     the LDM KL autoencoder (tokenizers/kl_autoencoder.py) with ch 32, ch_mult (1, 1, 2)
           (f4), one res-block per level, no attention outside the mid block, 4 latent
           channels: 16x16x1 images <-> 4x4x4 latents.
Loss:      VA-VAE's (tasks/autoencoder.py): L1 nll (no LPIPS: its VGG weights are not
           offline) + 1e-6 KL + the PatchGAN hinge loss (2 layers, ndf 32, from `disc_start`)
           with the adaptive weight x 0.5 + the VF loss (margins 0.5 / 0.25, adaptive weight x
           0.1) against the digits classifier's 4x4x64 feature map, standing in for DINOv2.
Optimizer: Adam betas (0.5, 0.9) for the autoencoder + linear_proj and for the discriminator,
           as VA-VAE, at lr 5e-4 (VA-VAE: 1e-4 at batch 256 for 125 epochs; a few CPU minutes
           need a larger step), batch 32, EMA 0.998 for the exported tokenizer.

Launch:   tesserax train --config digits_kl --workdir workdirs/digits_kl
          (writes workdirs/digits_kl/tokenizer at the end; `tesserax demo --latent` runs it,
          encodes digits and trains a latent DiT on the cache).
Runtime:  see README, "Tokenizers".
Expected: see README, "Tokenizers" (PSNR and FID-digits of test-split reconstructions).

`get_config("tiny")` is the test size.
"""
from tesserax.core.config import base_config

ARGS = ("tiny",)


def get_config(arg=None):
  config = base_config()
  config.task = "autoencoder"
  config.seed = 0
  config.num_steps = 2000
  config.batch_size = 32
  config.ema_decay = 0.998
  config.log_every_steps = 100
  config.data = dict(name="digits", data_dir="", manual_dir="", resolution=16, split="train",
                     random_flip=False, num_classes=10)
  config.model = dict(name="kl_autoencoder", resolution=16, ch=32, ch_mult=(1, 1, 2),
                      num_res_blocks=1, attn_resolutions=(), z_channels=4, embed_dim=4,
                      in_channels=1, dtype="float32")
  config.loss = dict(perceptual_weight=0.0, kl_weight=1e-6, disc_weight=0.5, disc_start=1000,
                     disc_factor=1.0, lecam_weight=0.0, lecam_decay=0.999,
                     foundation="digits_net", vf_weight=0.1, cos_margin=0.5,
                     distmat_margin=0.25, cos_weight=1.0, distmat_weight=1.0)
  config.disc = dict(ndf=32, n_layers=2)
  config.optim.update(lr=5e-4, b1=0.5, b2=0.9)
  config.disc_optim = config.optim.to_dict()
  config.checkpoint.every_steps = 500
  config.sample.every_steps = 500
  config.evals.recon = dict(type="recon_digits", every_steps=500, split="test",
                            num_samples=297, batch_size=297)
  # Latent statistics of the exported tokenizer: posterior samples of this many train images.
  config.export = dict(num_images=297)
  if arg == "tiny":
    config.num_steps = 4
    config.batch_size = 8
    config.log_every_steps = 2
    config.loss.disc_start = 2
    config.checkpoint.every_steps = 2
    config.sample.every_steps = 0
    config.evals.recon.update(every_steps=0, num_samples=16, batch_size=16)
    config.export.num_images = 16
  return config
