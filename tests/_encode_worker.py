"""Worker for test_latents: encode the digits test split into a latent cache on 8 fake CPU
devices. Arguments: tokenizer_dir data_dir out_dir seed shard_size batch_size."""
import os
import sys

from tesserax.core import host  # XLA_FLAGS is read later, by the first backend

os.environ.update(host.xla_flags_env(os.environ, "--xla_force_host_platform_device_count=8"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax
import ml_collections

from tesserax.tokenizers import cache_encoder


def main(tokenizer_dir, data_dir, out_dir, seed, shard_size, batch_size):
  assert jax.local_device_count() == 8
  data_cfg = ml_collections.ConfigDict(dict(
      name="digits", data_dir=data_dir, manual_dir="", resolution=16, split="test",
      random_flip=False, num_classes=10))
  cache_encoder.encode(tokenizer_dir, data_cfg, out_dir, splits=("test",), seed=int(seed),
                       shard_size=int(shard_size), batch_size=int(batch_size))


if __name__ == "__main__":
  main(*sys.argv[1:])
