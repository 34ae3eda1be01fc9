"""Class-conditional rectified-flow DiT on digits latents: the digits demo's DiT
(configs/digits_dit.py: width 128, 4 blocks, optimizer, evaluation) trained on a latent cache
of the digits KL autoencoder (configs/digits_kl.py) instead of pixels.

Data:     `data.name='latents'`, `data.data_dir` the cache written by
          `tesserax data encode digits --tokenizer WORKDIR/tokenizer --out CACHE`: 4x4x4
          latents normalised per channel, no flips (a flipped digit is not a digit).
Model:    patch 1 on 4x4x4 latents (16 tokens, the pixel demo's sequence length). Samples are
          decoded by the cache's tokenizer before they are scored (tasks/diffusion.py).

Launch:   tesserax demo --latent (trains the tokenizer, encodes, trains this, evaluates), or
          tesserax train --config digits_latent_dit --workdir DIR --config.data.data_dir=CACHE
Runtime:  about 3 minutes on 2 CPU cores.
Expected: see README, "Tokenizers" (class accuracy of decoded samples >= 90%).

`get_config("tiny")` is the test size (digits_dit's tiny model on the same latents).
"""
from tesserax.core import config as config_lib

ARGS = ("tiny",)


def get_config(arg=None):
  config = config_lib.load("digits_dit:tiny" if arg == "tiny" else "digits_dit")
  config.data.update(name="latents", resolution=4)
  config.model.update(input_size=4, in_channels=4, patch_size=1)
  return config
