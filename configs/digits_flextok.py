"""A digits-scale FlexTok: a pixel FlexTok (tokenizers/flextok.py) on scikit-learn's digits
(16x16, 1 channel), trained end to end on CPU (tasks/flextok_task.py).

Model:     4x4 patches (a 4x4 grid), 16 registers, FSQ levels (8, 6, 5) (240 codes, the FSQ
           paper's 2^8 setting); encoder and decoder of width 64 (head_dim 16), 2 and 4
           blocks; learned null condition. Decoding: 8 Euler steps, no guidance.
Loss:      rectified flow with keep_k over the powers of two 1, 2, 4, 8, 16 (nested dropout),
           null condition 10%, REPA (weight 0.5, decoder block 1) to the digits classifier's
           4x4 feature map (standing in for DINOv2-L) through a width-256 projector.
Optimizer: AdamW lr 1e-3, betas (0.9, 0.99), weight decay 1e-4 on matrices, cosine to 5%,
           batch 64, 4,000 steps, EMA 0.99 (a longer average mixes encoders and
           decoders of different code assignments: 0.998 lost 1.3-2.6 dB). At 1,500 steps
           the run is fragile: the same recipe gave 16.3 dB from 16 tokens on one machine
           and 14.7 dB on another, where tokens past the fourth carried almost nothing (3-23
           codes in use per position) and the digits classifier read 53% of the
           reconstructions; 4,000 steps gave 20.0 dB and 94% there.

Launch:   tesserax train --config digits_flextok --workdir workdirs/digits_flextok
          (writes workdirs/digits_flextok/tokenizer at the end)
Runtime:  ~100 ms per step on 2 quiet cores, about 7 minutes.
Expected: test-split PSNR rising with the token count: the EMA tokenizer gave 15.9, 17.1,
          19.1, 19.8, 20.0 dB and FID-digits 28.5, 20.1, 12.4, 11.1, 11.0 from 1, 2, 4, 8, 16
          tokens (297 test images, 8 Euler steps; README, "FlexTok").

`get_config("tiny")` is the test size.

`get_config("latent")` trains the same FlexTok over the 4x4x4 latents of the frozen digits KL
autoencoder (configs/digits_kl.py, the VA-VAE recipe) as the released FlexToks run over their
VAE's: `model.vae` is that autoencoder's config, `loss.vae_dir` its exported tokenizer
(default workdirs/digits_kl/tokenizer, what `tesserax train --config digits_kl --workdir
workdirs/digits_kl` writes first); patch size 1 keeps the 4x4 grid of 16 patches (now 4 values
each, not 16) that the REPA target needs; `vae_scaling_factor` 0.5, about 1 / std of those
latents (std 1.8-2.3 per channel), so they meet the decoder's unit noise at its scale, as SD's
0.18215 does. Training draws a posterior sample per image; the exported tokenizer holds the VAE
and decodes to pixels.
  tesserax train --config digits_kl --workdir workdirs/digits_kl
  tesserax train --config digits_flextok:latent --workdir workdirs/digits_flextok_latent
Measured (2026-12-01, 2 CPU cores, the KL autoencoder at 31.2 dB): 4,000 steps in about 7
minutes; test PSNR 15.00 / 18.05 / 19.92 / 20.65 / 20.88 dB from 1 / 2 / 4 / 8 / 16 tokens
(the pixel FlexTok above: 15.9 / 17.1 / 19.1 / 19.8 / 20.0). With scaling 1.0: 13.4-14.9 dB.
"latent_tiny" is its test size.
"""
from tesserax.core import config as config_lib
from tesserax.core.config import base_config
from tesserax.tokenizers import flextok

ARGS = ("tiny", "latent", "latent_tiny")


def get_config(arg=None):
  config = base_config()
  config.task = "flextok"
  config.seed = 0
  config.num_steps = 4000
  config.batch_size = 64
  config.ema_decay = 0.99
  config.log_every_steps = 100
  config.data = dict(name="digits", data_dir="", manual_dir="", resolution=16, split="train",
                     random_flip=False, num_classes=10)
  config.model = flextok.tiny_config(
      levels=(8, 6, 5), num_registers=16, encoder_dim=64, encoder_depth=2, decoder_dim=64,
      decoder_depth=4, head_dim=16, decode_steps=8, guidance_scale=1.0, guidance="apg")
  config.model.name = "flextok"
  config.loss = dict(keep_k="pow2", null_prob=0.1, skip_rounding_prob=0.0,
                     foundation="digits_net", repa_weight=0.5, repa_layer=1, repa_hidden=256)
  config.optim.update(lr=1e-3, b1=0.9, b2=0.99, weight_decay=1e-4, warmup_steps=100,
                      schedule="cosine", end_lr_factor=0.05, grad_clip=1.0)
  config.checkpoint.every_steps = 500
  config.sample.every_steps = 500
  config.evals.recon = dict(type="recon_digits", every_steps=0, split="test",
                            num_samples=297, batch_size=297)
  if arg in ("latent", "latent_tiny"):
    vae = config_lib.load("digits_kl").model
    del vae.name
    config.model.update(vae=vae, vae_scaling_factor=0.5, patch_size=1)
    config.loss.vae_dir = "workdirs/digits_kl/tokenizer"
  if arg in ("tiny", "latent_tiny"):
    config.num_steps = 4
    config.batch_size = 8
    config.log_every_steps = 2
    config.checkpoint.every_steps = 2
    config.sample.every_steps = 0
    config.model.update(num_registers=4, encoder_dim=32, encoder_depth=1, decoder_dim=32,
                        decoder_depth=2, decode_steps=2)
    config.loss.repa_hidden = 32
    config.evals.recon.update(num_samples=16, batch_size=16)
  return config
