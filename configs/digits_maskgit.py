"""Class-conditional MaskGIT over the token ids of a digits TiTok (the token demo's generator).

Data:     `data.name='latents'`, `data.data_dir` a token cache written by
          `tesserax data encode digits --tokenizer TOKENIZER --out CACHE` with a discrete
          tokenizer of `model.codebook_size` codes and `model.seq_len` tokens per image (the
          task refuses another pairing in one line); no flips (a flipped digit is not a digit).
Model:    a 4-layer, width-128 ImageBert (maskgit_bert; TiTok's L-32/B-64 generator layout),
          arccos masking, label smoothing 0.1, unmasked tokens weighted 0.1, class dropout 0.1.
Sampling: TiTok's sampler, 8 steps, linear guidance (sampling/maskgit_decode.py).

Launch:   tesserax train --config digits_maskgit --workdir DIR --config.data.data_dir=CACHE
Runtime:  2,000 steps at ~18 steps/s on 2 CPU cores, about 2 minutes.
Expected: over the 16-token digits TiTok's cache (`tesserax demo --tokens`), samples classified
          as the requested digit 100% of the time at 2-16 steps; FID-digits 54.7 / 49.9 / 49.5
          / 48.4 at 2 / 4 / 8 / 16 steps (README, "Token generators").

`get_config("tiny")` is the test size.
"""
from tesserax.core.config import base_config

ARGS = ("tiny",)


def get_config(arg=None):
  config = base_config()
  config.task = "token_generator"
  config.num_steps = 2000
  config.batch_size = 64
  config.ema_decay = 0.995
  config.log_every_steps = 100
  config.data = dict(name="latents", data_dir="", manual_dir="", resolution=16, split="train",
                     random_flip=False, num_classes=10)
  config.model = dict(name="maskgit_bert", codebook_size=256, num_classes=10, seq_len=16,
                      hidden_size=128, num_layers=4, num_heads=4, intermediate_size=512,
                      dropout=0.0, class_dropout=0.1, dtype="float32")
  config.objective = dict(name="masked_tokens", label_smoothing=0.1, unmasked_weight=0.1)
  config.optim.update(lr=1e-3, b1=0.9, b2=0.96, weight_decay=0.03, warmup_steps=100,
                      schedule="cosine", end_lr_factor=0.05, grad_clip=1.0)
  config.checkpoint.every_steps = 500
  config.sample.update(dict(every_steps=1000, num_per_class=10, solver="maskgit", num_steps=8,
                            randomize_temperature=1.0, softmax_temperature_annealing=True,
                            guidance="linear", guidance_scale=2.0, guidance_scale_pow=3.0))
  config.evals.digits = dict(type="digits", every_steps=0, num_samples=1000, batch_size=500)
  if arg == "tiny":
    config.num_steps = 4
    config.batch_size = 16
    config.log_every_steps = 2
    config.model.update(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    config.checkpoint.every_steps = 2
    config.sample.update(every_steps=0, num_steps=4)
    config.evals.digits.update(num_samples=20, batch_size=20)
  return config
