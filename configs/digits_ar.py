"""Class-conditional autoregressive generator (LlamaGen-style) over the token ids of a digits
tokenizer: configs/digits_maskgit.py's data, a 4-block width-128 decoder-only transformer
(RMSNorm, SwiGLU, 1D RoPE), next-token cross-entropy with class dropout 0.1, sampled with the
KV cache at temperature 1 with top-k 0, top-p 1 and guidance 2 (sampling/autoregressive_decode.py).

Launch:   tesserax train --config digits_ar --workdir DIR --config.data.data_dir=CACHE
Runtime:  1,500 steps at ~15 steps/s on 2 quiet CPU cores, under 2 minutes.
Expected: over the 16 FlexTok token ids of `tesserax demo --flextok`, samples decoded from their
          first 16 tokens: FID-digits 22.5, 96.6% the requested class (2,000 steps: 21.2,
          96.8%; README, "FlexTok").

`get_config("tiny")` is the test size.
"""
from tesserax.core import config as config_lib

ARGS = ("tiny",)


def get_config(arg=None):
  config = config_lib.load("digits_maskgit:tiny" if arg == "tiny" else "digits_maskgit")
  config.model = dict(name="autoregressive", codebook_size=256, num_classes=10, seq_len=16,
                      hidden_size=128, depth=4, num_heads=4, mlp_hidden=0, rope_theta=10000.0,
                      class_dropout=0.1, dtype="float32")
  config.objective = dict(name="next_token", label_smoothing=0.0)
  if arg != "tiny":
    config.num_steps = 1500
  config.sample.update(dict(num_per_class=10, solver="autoregressive", temperature=1.0,
                            top_k=0, top_p=1.0, cfg_scale=2.0, kv_cache=True))
  if arg == "tiny":
    config.model.update(hidden_size=32, depth=2, num_heads=2, mlp_hidden=64)
  return config
