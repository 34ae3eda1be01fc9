"""TiTok encode / decode and MaskGIT sampling throughput, with an analytic FLOP count.

  python -m tesserax.benchmarks.titok_speed --tokenizer digits --generator digits --batch 64
  python -m tesserax.benchmarks.titok_speed --tokenizer titok_bl64_vq8k --generator B-64 \
      --batch 64 --out BENCH.json

`--tokenizer`: "digits" (configs/digits_titok.py) or a tokenizers/titok.py CONFIGS name;
`--generator`: "digits" (configs/digits_maskgit.py) or a released MaskGIT generator ("L-32",
"B-64", "S-128", generators/maskgit.py), its codebook and sequence length set to the tokenizer's.
Random weights, a fixed random batch on the devices: the figures are the compiled calls alone
(the median of `--repeats` after one compiling call). Sampling runs 8 and 64 steps, without
guidance and with the "linear" guidance of the released L-32 / B-64 settings (two passes per
step, one at the first).

FLOPs (2 per multiply-add): a ViT block on T tokens of width W with a 4W MLP is 24 T W^2 +
4 T^2 W; the encoder adds the patch embedding and conv_out, the decoder decoder_embed and its
head (non-legacy: ffn and the 3x3 conv_out; legacy: ffn's two 1x1 convs, the MaskGIT-VQGAN
pixel decoder's convolutions not counted). A MaskGIT pass on T = N + 1 tokens is, per layer,
8 T d^2 + 4 T d f + 4 T^2 d (+ the UViT skip projections, 4 T d^2 each) plus the lm head on N.
"""
import argparse
import json
import platform

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

import tesserax.tasks  # noqa: F401  (registers the tasks)
from tesserax.benchmarks.throughput import timed
from tesserax.core import config as config_lib, host, sharding
from tesserax.generators import maskgit
from tesserax.tokenizers import titok
from tesserax.training import task as task_lib

STEPS = (8, 64)
GUIDANCE_SCALE = 4.5  # the released L-32 setting (linear guidance)


def vit_flops(tokens, width, depth):
  return depth * (24 * tokens * width ** 2 + 4 * tokens ** 2 * width)


def titok_flops(c) -> dict:
  """Forward FLOPs per image of the TiTok encoder (to the bottleneck) and decoder."""
  g, n = c.resolution // c.patch_size, c.num_latent_tokens
  out = c.token_size * (2 if c.quantize == "vae" else 1)
  t = 1 + g * g + n
  encode = (2 * g * g * c.patch_size ** 2 * c.channels * c.enc_width
            + vit_flops(t, c.enc_width, c.enc_depth) + 2 * n * c.enc_width * out)
  w = c.dec_width
  decode = 2 * n * c.token_size * w + vit_flops(t + c.text_context, w, c.dec_depth)
  if c.legacy:
    decode += 2 * g * g * (w * 2 * w + 2 * w * c.pixel_codebook_size)
  else:
    decode += (2 * g * g * w * c.patch_size ** 2 * c.channels
               + 2 * c.resolution ** 2 * 9 * c.channels ** 2)
  return {"encode": encode, "decode": decode}


def maskgit_pass_flops(m) -> int:
  """FLOPs per image of one MaskGIT forward pass."""
  n, d, f = m.seq_len, m.hidden_size, m.intermediate_size
  t = n + 1
  flops = (m.num_layers * (8 * t * d ** 2 + 4 * t * d * f + 4 * t ** 2 * d)
           + 2 * n * d * m.codebook_size)
  if m.name == "maskgit_uvit":
    flops += (m.num_layers // 2) * 4 * t * d ** 2
  return flops


def sampling_passes(steps, guided):
  return steps + (steps - 1 if guided else 0)


def configs(tokenizer_name, generator_name):
  if tokenizer_name == "digits":
    tok = config_lib.load("digits_titok").model
  else:
    tok = titok.CONFIGS[tokenizer_name]()
    tok.name = "titok"
  gen = config_lib.load("digits_maskgit")
  if generator_name != "digits":
    released = maskgit.maskgit_config(generator_name)
    gen.model = ml_collections.ConfigDict(dict(gen.model.to_dict(), **released.to_dict()))
    gen.data.num_classes = gen.model.num_classes
  gen.model.update(codebook_size=tok.codebook_size, seq_len=tok.num_latent_tokens)
  return tok, gen


def run(tokenizer_name, generator_name, batch, repeats, dtype):
  tok_config, gen_config = configs(tokenizer_name, generator_name)
  tok_config.dtype = gen_config.model.dtype = dtype
  mesh = sharding.make_mesh(gen_config.mesh)
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: titok.build(tok_config)))
  model = nnx.merge(graphdef, jax.jit(lambda: nnx.state(titok.build(tok_config)))())  # one compile
  rng = np.random.default_rng(0)
  r, ch = tok_config.resolution, tok_config.channels
  images = jnp.asarray(rng.uniform(-1, 1, (batch, r, r, ch)), jnp.float32)
  encode = nnx.jit(lambda m, x: m.encode(x))
  decode = nnx.jit(lambda m, ids: m.decode(ids))
  ids = encode(model, images)
  flops = titok_flops(tok_config)
  rows = {}
  for name, fn, per_image in (("encode", lambda: encode(model, images), flops["encode"]),
                              ("decode", lambda: decode(model, ids), flops["decode"])):
    seconds = timed(fn, repeats)
    rows[name] = {"images_per_s": batch / seconds, "gflops_per_image": per_image / 1e9,
                  "tflops_per_s": per_image * batch / seconds / 1e12}
  task = task_lib.build(gen_config, mesh)
  params = task.init()["params"]
  labels = jnp.asarray(rng.integers(0, gen_config.model.num_classes, batch), jnp.int32)
  pass_flops = maskgit_pass_flops(gen_config.model)
  for steps in STEPS:
    for guided in (False, True):
      settings = ml_collections.ConfigDict(gen_config.sample.to_dict())
      settings.update(num_steps=steps, guidance="linear",
                      guidance_scale=GUIDANCE_SCALE if guided else 0.0)
      sample = task._sampler(settings.to_json())  # noqa: SLF001
      key = jax.random.PRNGKey(0)
      seconds = timed(lambda: sample(params, labels, key), repeats)
      per_image = pass_flops * sampling_passes(steps, guided)
      rows[f"sample_{steps}_steps{'_cfg' if guided else ''}"] = {
          "images_per_s": batch / seconds, "gflops_per_image": per_image / 1e9,
          "tflops_per_s": per_image * batch / seconds / 1e12}
  return {"tokenizer": tokenizer_name, "generator": generator_name, "batch": batch,
          "dtype": dtype, "device": jax.devices()[0].device_kind,
          "num_devices": jax.device_count(), "host": platform.node(), "rows": rows}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--tokenizer", default="digits")
  parser.add_argument("--generator", default="digits")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--out", default="")
  args = parser.parse_args(argv)
  result = run(args.tokenizer, args.generator, args.batch, args.repeats, args.dtype)
  print(f"{'call':<22} {'images/s':>10} {'GFLOP/image':>12} {'TFLOP/s':>9}")
  for name, row in result["rows"].items():
    print(f"{name:<22} {row['images_per_s']:>10.1f} {row['gflops_per_image']:>12.4f} "
          f"{row['tflops_per_s']:>9.4f}")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  host.prepare(__spec__.name)
  main()
