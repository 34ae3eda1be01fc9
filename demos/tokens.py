"""`tesserax demo --tokens`: 1D tokenizers and masked generation over their tokens, on digits.

Stages, each resumed or skipped when its output exists (WORKDIR/...):
  titok_K/       a digits TiTok (configs/digits_titok.py) with K tokens, for every K of
                 TOKEN_COUNTS, exported to titok_K/tokenizer; its test-split reconstructions
                 scored (PSNR, FID-digits);
  cache/         the train split encoded into token ids by the TiTok with GENERATOR_TOKENS;
  maskgit/       a MaskGIT generator (configs/digits_maskgit.py) trained on that cache and
                 sampled at each of SAMPLING_STEPS, its samples decoded by the TiTok and scored
                 (FID-digits, class accuracy).
Writes metrics.json (every figure), tokens.png (PSNR and FID-digits against the token count;
FID-digits and accuracy against the MaskGIT steps), reconstructions.png (test originals over
their reconstructions, one row pair per K) and samples_grid.png (MaskGIT samples, one row per
class). A preempted stage stops the demo (its checkpoint saved); the same command resumes.
"""
import json
import os

import jax
import ml_collections
import numpy as np

import tesserax.tasks  # noqa: F401  (registers the built-in tasks)
from tesserax.core import config as config_lib, files
from tesserax.demos import demo
from tesserax.eval import evaluators

# TiTok's token counts are at most half its patch count (32-128 tokens for 256 patches); on the
# digits' 16 patches this range runs up to one token per patch.
TOKEN_COUNTS = (2, 4, 8, 16)
GENERATOR_TOKENS = 16
SAMPLING_STEPS = (2, 4, 8, 16)


def run(workdir: str, size: str = "", token_counts=TOKEN_COUNTS,
        generator_tokens: int = GENERATOR_TOKENS, steps=SAMPLING_STEPS) -> dict | None:
  """Train and score the TiToks, the token cache and the MaskGIT; None if preempted.
  `size` "tiny" runs every recipe at its test size."""
  from tesserax.eval.grid import save_grid
  from tesserax.tokenizers import cache_encoder
  tokenizer_configs = {}
  for k in token_counts:
    config = config_lib.load(f"digits_titok:tokens={k}")
    if size:
      tiny = config_lib.load("digits_titok:tiny")
      tiny.model.num_latent_tokens = k
      config = tiny
    tokenizer_configs[k] = config
  generator = config_lib.load("digits_maskgit:tiny" if size else "digits_maskgit")
  for config in (*tokenizer_configs.values(), generator):
    config_lib.validate(config)
  results = {"tokenizers": {}, "generator": {}}
  pairs = []
  for k, config in tokenizer_configs.items():
    trained = demo._train(config, os.path.join(workdir, f"titok_{k}"))
    if trained is None:
      return None
    task, state = trained
    recon = evaluators.build("recon", config, task.predict).evaluate(state["ema"])
    results["tokenizers"][str(k)] = recon
    print(f"TiTok with {k:>2} tokens: test reconstructions PSNR {recon['psnr']:.2f} dB, "
          f"FID-digits {recon['fid']:.2f}", flush=True)
    images = evaluators.eval_images(config.data, "test", 8)
    pairs += [images, task.reconstruct(state["ema"], images)]
  tokenizer_dir = os.path.join(workdir, f"titok_{generator_tokens}", "tokenizer")
  cache = cache_encoder.encode(tokenizer_dir, tokenizer_configs[generator_tokens].data,
                               os.path.join(workdir, "cache"))
  generator.data.update(data_dir=cache, resolution=generator_tokens)  # a cache's side: K ids
  generator.model.update(seq_len=generator_tokens,
                         codebook_size=tokenizer_configs[generator_tokens].model.codebook_size)
  trained = demo._train(generator, os.path.join(workdir, "maskgit"))
  if trained is None:
    return None
  task, state = trained
  c = generator
  digits = c.evals.digits
  image_data = tokenizer_configs[generator_tokens].data
  score = evaluators.digits_scorer(image_data.resolution)
  labels = np.arange(digits.num_samples, dtype=np.int32) % c.model.num_classes
  key = jax.random.PRNGKey(c.seed + 1)
  for num_steps in steps:
    settings = ml_collections.ConfigDict(c.sample.to_dict())
    settings.num_steps = num_steps
    images = task.predict["generate"](state["ema"], labels, key, settings,
                                      batch_size=digits.batch_size)
    results["generator"][str(num_steps)] = score(images, labels)
    demo._print_row("maskgit", num_steps, results["generator"][str(num_steps)])
  from tesserax.data import pipeline
  train_images, train_labels = pipeline.load_split(pipeline.image_config(image_data), "train")
  results["floor"] = score(train_images, train_labels)
  if jax.process_index() == 0:
    upscale = max(1, 64 // image_data.resolution)
    with files.atomic_output(os.path.join(workdir, "reconstructions.png")) as tmp:
      save_grid(tmp, np.concatenate(pairs), nrow=8, upscale=upscale)
    per_class = min(10, digits.num_samples // c.model.num_classes)
    order = np.concatenate([np.flatnonzero(labels == k)[:per_class]
                            for k in range(c.model.num_classes)])
    with files.atomic_output(os.path.join(workdir, "samples_grid.png")) as tmp:
      save_grid(tmp, images[order], nrow=per_class, upscale=upscale)
    with files.atomic_output(os.path.join(workdir, "tokens.png")) as tmp:
      plot(results, tmp)
    with files.atomic_output(os.path.join(workdir, "metrics.json")) as tmp, open(tmp, "w") as f:
      json.dump(results, f, indent=2)
    print(f"wrote {workdir}/metrics.json, tokens.png, reconstructions.png and samples_grid.png")
  return results


def plot(results: dict, path: str) -> None:
  """Top: PSNR and FID-digits of the reconstructions against the token count; bottom:
  FID-digits and accuracy of the MaskGIT samples against its steps."""
  demo.plot_rows([({"TiTok": results["tokenizers"]}, demo.RECON_PANELS, "tokens"),
                  ({"MaskGIT": results["generator"]}, demo.PANELS, "steps")],
                 results["floor"], path)
