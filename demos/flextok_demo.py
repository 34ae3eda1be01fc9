"""`tesserax demo --flextok`: FlexTok's flexible-length tokens and autoregressive generation
over them, on digits.

Stages, each resumed or skipped when its output exists (WORKDIR/...):
  flextok/   the digits FlexTok (configs/digits_flextok.py) trained end to end, exported to
             flextok/tokenizer; its test-split reconstructions from the first K tokens, for
             every K of TOKEN_COUNTS, scored (PSNR, FID-digits);
  cache/     the train split encoded into all of the FlexTok's token ids;
  ar/        the autoregressive generator (configs/digits_ar.py) trained on that cache; its
             samples, decoded from their first K tokens (a prefix of a FlexTok sequence is a
             shorter FlexTok sequence), scored per K (FID-digits, class accuracy).
Writes metrics.json (every figure), flextok.png (PSNR and FID-digits of the reconstructions,
FID-digits and accuracy of the samples, against K), reconstructions.png (test originals in the
first column, their reconstructions from each K in the next ones) and samples_grid.png (one
sample per class and row, decoded from each K). A preempted stage stops the demo (its
checkpoint saved); the same command resumes.
"""
import json
import os

import jax
import numpy as np

import tesserax.tasks  # noqa: F401  (registers the built-in tasks)
from tesserax.core import config as config_lib, files
from tesserax.data.preprocess import to_uint8
from tesserax.demos import demo
from tesserax.eval import evaluators

TOKEN_COUNTS = (1, 2, 4, 8, 16)
GRID_IMAGES = 10


def run(workdir: str, size: str = "", token_counts=TOKEN_COUNTS) -> dict | None:
  """Train and score the FlexTok, the token cache and the AR generator; None if preempted.
  `size` "tiny" runs both recipes at their test size (token counts above the tiny FlexTok's
  registers are skipped)."""
  from tesserax.data import pipeline
  from tesserax.eval import metrics
  from tesserax.tokenizers import cache_encoder
  tokenizer_config = config_lib.load("digits_flextok:tiny" if size else "digits_flextok")
  generator = config_lib.load("digits_ar:tiny" if size else "digits_ar")
  for config in (tokenizer_config, generator):
    config_lib.validate(config)
  registers = tokenizer_config.model.num_registers
  token_counts = [k for k in token_counts if k <= registers]
  results = {"tokenizer": {}, "generator": {}}
  trained = demo._train(tokenizer_config, os.path.join(workdir, "flextok"))
  if trained is None:
    return None
  tok_task, tok_state = trained
  image_data = tokenizer_config.data
  recon = tokenizer_config.evals.recon
  images = evaluators.eval_images(image_data, recon.split, recon.num_samples)
  score = evaluators.digits_scorer(image_data.resolution)
  columns = [images[:GRID_IMAGES]]
  for k in token_counts:
    rec = tok_task.reconstruct(tok_state["ema"], images, recon.batch_size, {"tokens": k})
    results["tokenizer"][str(k)] = {
        "psnr": float(np.mean(metrics.psnr(to_uint8(images), to_uint8(rec)))),
        "fid": score(rec, np.zeros(len(rec), np.int32))["fid"]}
    columns.append(rec[:GRID_IMAGES])
    entry = results["tokenizer"][str(k)]
    print(f"FlexTok from {k:>2} tokens: test reconstructions PSNR {entry['psnr']:.2f} dB, "
          f"FID-digits {entry['fid']:.2f}", flush=True)
  cache = cache_encoder.encode(os.path.join(workdir, "flextok", "tokenizer"), image_data,
                               os.path.join(workdir, "cache"))
  generator.data.update(data_dir=cache, resolution=registers)  # a cache's side: R ids
  generator.model.update(seq_len=registers, codebook_size=tok_task.model(
      tok_state["ema"]).codebook_size)
  trained = demo._train(generator, os.path.join(workdir, "ar"))
  if trained is None:
    return None
  task, state = trained
  digits = generator.evals.digits
  labels = np.arange(digits.num_samples, dtype=np.int32) % generator.model.num_classes
  ids = task.predict["generate_tokens"](state["ema"], labels, jax.random.PRNGKey(
      generator.seed + 1), batch_size=digits.batch_size)
  first = np.array([np.flatnonzero(labels == c)[0] for c in range(generator.model.num_classes)])
  sample_columns = []
  for k in token_counts:
    samples = tok_task.decode(tok_state["ema"], ids[:, :k], digits.batch_size)
    results["generator"][str(k)] = score(samples, labels)
    sample_columns.append(samples[first])
    entry = results["generator"][str(k)]
    print(f"AR samples from {k:>2} tokens: FID-digits {entry['fid']:.2f}, accuracy "
          f"{entry['accuracy']:.3f}", flush=True)
  train_images, train_labels = pipeline.load_split(pipeline.image_config(image_data), "train")
  results["floor"] = score(train_images, train_labels)
  if jax.process_index() == 0:
    upscale = max(1, 64 // image_data.resolution)
    with files.atomic_output(os.path.join(workdir, "reconstructions.png")) as tmp:
      save_columns(tmp, columns, upscale)
    with files.atomic_output(os.path.join(workdir, "samples_grid.png")) as tmp:
      save_columns(tmp, sample_columns, upscale)
    with files.atomic_output(os.path.join(workdir, "flextok.png")) as tmp:
      plot(results, tmp)
    with files.atomic_output(os.path.join(workdir, "metrics.json")) as tmp, open(tmp, "w") as f:
      json.dump(results, f, indent=2)
    print(f"wrote {workdir}/metrics.json, flextok.png, reconstructions.png and "
          "samples_grid.png")
  return results


def save_columns(path: str, columns, upscale: int) -> None:
  """A PNG grid whose column j holds the images columns[j] [N, R, R, C], top to bottom."""
  from tesserax.eval.grid import save_grid
  grid = np.stack(columns, axis=1).reshape(-1, *columns[0].shape[1:])
  save_grid(path, grid, nrow=len(columns), upscale=upscale)


def plot(results: dict, path: str) -> None:
  """Top: PSNR and FID-digits of the reconstructions against K; bottom: FID-digits and
  accuracy of the AR samples decoded from their first K tokens."""
  demo.plot_rows([({"FlexTok": results["tokenizer"]}, demo.RECON_PANELS, "tokens K"),
                  ({"AR": results["generator"]}, demo.PANELS, "tokens K")],
                 results["floor"], path)
