"""A digits-scale TiTok: a non-legacy VQ TiTok (tokenizers/titok.py) on scikit-learn's digits
(16x16, 1 channel), trained single-stage on CPU (tasks/titok.py).

Model:     patch 4 (a 4x4 grid), encoder and decoder ViTs of width 64, 2 blocks, 2 heads;
           `num_latent_tokens` 1D tokens (default 16; the argument "tokens=K" sets K) from an
           l2-normalised 64-entry codebook of 8-dim codes kept in use by TA-TiTok's
           `clustering_vq`; the non-legacy pixel head. With 512 codes the token count was not
           the bottleneck: 20.4 / 20.2 / 23.3 / 20.2 dB at 4 / 8 / 16 / 32 tokens after 3,000
           steps; 32 tokens (more than the 16 patches, past TiTok's range) also fell behind
           16 with 64 codes (21.6 against 22.7 dB).
Loss:      L2 on [0, 1] images + 0.005 x the digits classifier's logit MSE (standing in for
           TiTok's ConvNeXt-S logit loss) + the VQ loss (commitment 0.25), no GAN. Without
           clustering_vq the codebook collapses (each token position keeps one code, 4-51
           codes in use); a perceptual weight of 0.1 caps the PSNR near 16 dB at every K.
Optimizer: AdamW lr 1e-3 (TiTok: 1e-4 at batch 256 for 1M steps), betas (0.9, 0.99), weight
           decay 1e-4 with the official exclusions, cosine to 10%, batch 32, 3,000 steps,
           EMA 0.998.

Launch:   tesserax train --config digits_titok --workdir workdirs/digits_titok
          (writes workdirs/digits_titok/tokenizer at the end)
Runtime:  about 1.5 minutes on 2 quiet CPU cores (2-16 tokens; the token demo trains four).
Expected: test-split PSNR 17.1 / 18.5 / 21.6 / 22.7 dB (FID-digits 69.9 / 33.5 / 12.3 / 8.6)
          at 2 / 4 / 8 / 16 tokens (README, "Token generators", the demo's figures).

`get_config("tiny")` is the test size; `get_config("tokens=8")` sets the token count.

The two-stage recipe at digits scale (tasks/titok_task.py), a legacy TiTok whose proxy codes
and pixel decoder come from a random MaskGIT-VQGAN (`loss.vqgan = "random"`: 64 codes of 32
dims on the 4x4 grid, ch 32, ch_mult (1, 1, 2), one res block per level):
  tesserax train --config digits_titok:stage1 --workdir workdirs/digits_titok_stage1
  tesserax train --config digits_titok:stage2 --workdir workdirs/digits_titok_stage2 \
      --config.loss.stage1=workdirs/digits_titok_stage1/tokenizer
Stage 2 adds the hinge GAN (the MaskBit discriminator, hidden 32, two stages) at weight 0.01
from step 500 with LeCam 0.001, the digits classifier's logit loss standing in for ConvNeXt-S.
`get_config("gan")` is the single-stage recipe with that GAN; "stage1_tiny" / "stage2_tiny"
are the test sizes.
"""
import ml_collections

from tesserax.core.config import base_config
from tesserax.tokenizers import titok

ARGS = ("tiny", "tokens=2", "tokens=4", "tokens=8", "tokens=16", "tokens=32", "gan", "stage1", "stage2",
        "stage1_tiny", "stage2_tiny")


def get_config(arg=None):
  config = base_config()
  config.task = "titok"
  config.seed = 0
  config.num_steps = 3000
  config.batch_size = 32
  config.ema_decay = 0.998
  config.log_every_steps = 100
  config.data = dict(name="digits", data_dir="", manual_dir="", resolution=16, split="train",
                     random_flip=False, num_classes=10)
  tokens = int(arg.split("=")[1]) if arg and arg.startswith("tokens=") else 16
  config.model = titok.titok_config(
      "small", "small", tokens, token_size=8, quantize="vq", codebook_size=64,
      use_l2_norm=True, legacy=False, finetune_decoder=False, clustering_vq=True,
      resolution=16, patch_size=4,
      channels=1, enc_width=64, enc_depth=2, enc_heads=2, dec_width=64, dec_depth=2,
      dec_heads=2)
  config.model.name = "titok"
  config.loss = dict(recipe="single_stage", reconstruction_weight=1.0, perceptual="digits_net",
                     perceptual_weight=0.005, quantizer_weight=1.0, kl_weight=1e-6,
                     discriminator_weight=0.0, discriminator_start=500,
                     discriminator_factor=1.0, lecam_weight=0.001, lecam_decay=0.999,
                     vqgan="", stage1="")
  config.disc = dict(hidden=32, num_stages=2, pool_size=4)
  config.optim.update(lr=1e-3, b1=0.9, b2=0.99, weight_decay=1e-4, warmup_steps=100,
                      schedule="cosine", end_lr_factor=0.1, grad_clip=1.0)
  config.checkpoint.every_steps = 500
  config.sample.every_steps = 500
  config.evals.recon = dict(type="recon_digits", every_steps=0, split="test",
                            num_samples=297, batch_size=297)
  config.export = dict(num_images=297)
  config.disc_optim = config.optim.to_dict()
  if arg in ("gan", "stage2", "stage2_tiny"):
    config.loss.discriminator_weight = 0.01 if arg.startswith("stage2") else 0.1
  if arg and arg.startswith(("stage1", "stage2")):
    stage2 = arg.startswith("stage2")
    config.model.update(legacy=True, finetune_decoder=stage2, clustering_vq=False,
                        pixel_codebook_size=64,
                        pixel=ml_collections.ConfigDict(dict(
                            resolution=16, ch=32, ch_mult=(1, 1, 2), num_res_blocks=1,
                            z_channels=32, codebook_size=64, in_channels=1,
                            dtype="float32")))
    config.loss.update(recipe="stage2" if stage2 else "stage1", vqgan="random")
  if arg and arg.endswith("_tiny"):
    config.num_steps = 4
    config.batch_size = 8
    config.sample.every_steps = 0
    config.model.update(enc_width=32, dec_width=32, enc_depth=1, dec_depth=1)
    config.loss.discriminator_start = 2
  if arg == "tiny":
    config.num_steps = 4
    config.batch_size = 8
    config.log_every_steps = 2
    config.checkpoint.every_steps = 2
    config.sample.every_steps = 0
    config.model.update(enc_width=32, dec_width=32, enc_depth=1, dec_depth=1)
    config.evals.recon.update(num_samples=16, batch_size=16)
    config.export.num_images = 16
  return config
