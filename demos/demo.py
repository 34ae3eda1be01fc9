"""`tesserax demo`: train the digits DiT, then score it at every sampler and NFE.

Writes to the workdir, next to the trainer's own files:
  samples_grid.png  EMA samples at the largest Euler NFE, one row per class (0 at the top);
  metrics.json      FID-digits and class accuracy per sampler and NFE, and the real-data floor
                    (the digits train split scored the same way);
  nfe_sweep.png     FID-digits and accuracy against NFE for Euler and Heun.
Every setting samples the same labels from the same noise. Heun takes 2 NFE per step (the
correction is also applied on the last step), so it has no 1-NFE entry. Every output file is
complete or absent (core/files.py). A preempted demo (SIGTERM) stops after the trainer's
checkpoint, scores nothing and says how to resume.
"""
import json
import os

import jax
import ml_collections
import numpy as np

import tesserax.tasks  # noqa: F401  (registers the built-in tasks)
from tesserax.core import files
from tesserax.core.errors import TesseraxError
from tesserax.eval import evaluators
from tesserax.training import loop

SOLVERS = ("euler", "heun")


def solver_steps(solver: str, nfe: int):
  """Solver steps that spend exactly `nfe` network evaluations, or None if impossible."""
  if solver == "euler":
    return nfe
  return nfe // 2 if nfe % 2 == 0 else None


def _train(config, workdir: str):
  """loop.train, or None after a preemption (the trainer saved its checkpoint)."""
  task, state = loop.train(config, workdir)
  step = int(jax.device_get(state["step"]))
  if step < config.num_steps:
    print(f"demo stopped at step {step}/{config.num_steps} (checkpoint saved); run the same "
          "`tesserax demo` command again to resume")
    return None
  return task, state


def run(config, workdir: str) -> dict | None:
  """Train (or resume) and score the digits DiT; None if preempted before the end."""
  trained = _train(config, workdir)
  if trained is None:
    return None
  task, state = trained
  return evaluate(task, state["ema"], workdir, step=int(jax.device_get(state["step"])))


def run_latent(tokenizer_config, generator_config, workdir: str) -> dict | None:
  """`tesserax demo --latent`: the digits tokenizer, its latent cache and a latent DiT.

  WORKDIR/tokenizer_run  the KL autoencoder's training workdir; its EMA tokenizer is exported
                         to WORKDIR/tokenizer_run/tokenizer, with reconstructions.png (test
                         originals over their reconstructions) and recon_metrics.json (PSNR
                         and FID-digits of the test split's reconstructions);
  WORKDIR/cache          the train split encoded by it (`tesserax data encode`);
  WORKDIR/generator      the latent DiT's workdir, evaluated as `run` does (samples decoded).
  Each stage resumes or is skipped when its output exists. None if preempted.
  """
  from tesserax.core import config as config_lib
  from tesserax.tokenizers import cache_encoder
  for config in (tokenizer_config, generator_config):  # both before minutes of training
    config_lib.validate(config)
  tokenizer_workdir = os.path.join(workdir, "tokenizer_run")
  trained = _train(tokenizer_config, tokenizer_workdir)
  if trained is None:
    return None
  task, state = trained
  recon = evaluators.build("recon", tokenizer_config, task.predict).evaluate(state["ema"])
  loop.save_sample_grid(task, state["ema"], os.path.join(tokenizer_workdir,
                                                         "reconstructions.png"))
  if jax.process_index() == 0:
    _write_json(os.path.join(tokenizer_workdir, "recon_metrics.json"), recon)
  print(f"tokenizer: test-split reconstructions PSNR {recon['psnr']:.2f} dB, FID-digits "
        f"{recon['fid']:.3f}")
  cache = os.path.join(workdir, "cache")
  cache_encoder.encode(os.path.join(tokenizer_workdir, "tokenizer"), tokenizer_config.data,
                       cache)
  generator_config.data.data_dir = cache
  results = run(generator_config, os.path.join(workdir, "generator"))
  return None if results is None else {"tokenizer": recon, "generator": results}


def sweep_settings(solver: str, steps: int, cfg_scale: float) -> ml_collections.ConfigDict:
  """Sample settings of one sweep entry: the solver on the plain grid, guided everywhere."""
  return ml_collections.ConfigDict(dict(
      solver=solver, num_steps=steps, shift=1.0, cfg_scale=cfg_scale, interval=(0.0, 1.0),
      guided_channels=None, final_correction=True))


def evaluate(task, params, workdir: str, step: int) -> dict:
  """Score `params` (of training step `step`) at every sampler and NFE; write the outputs."""
  from tesserax.data import pipeline
  from tesserax.eval.grid import save_grid
  c = task.config
  digits = c.evals.digits
  image_data = pipeline.image_config(c.data)
  score = evaluators.digits_scorer(image_data.resolution)
  train_images, train_labels = pipeline.load_split(image_data, "train")
  results = {"floor": score(train_images, train_labels),
             "num_samples": digits.num_samples, "cfg_scale": c.demo.cfg_scale,
             "step": step}
  labels = np.arange(digits.num_samples, dtype=np.int32) % c.model.num_classes
  key = jax.random.PRNGKey(c.seed + 1)
  grid_images = None
  for solver in SOLVERS:
    results[solver] = {}
    for nfe in c.demo.nfe:
      steps = solver_steps(solver, nfe)
      if steps is None:
        continue
      images = task.predict["generate"](params, labels, key,
                                        sweep_settings(solver, steps, c.demo.cfg_scale),
                                        batch_size=digits.batch_size)
      results[solver][str(nfe)] = score(images, labels)
      _print_row(solver, nfe, results[solver][str(nfe)])
      if solver == "euler" and nfe == max(c.demo.nfe):
        grid_images = images
  if jax.process_index() == 0:
    per_class = min(10, digits.num_samples // c.model.num_classes)
    order = np.concatenate([np.flatnonzero(labels == k)[:per_class]
                            for k in range(c.model.num_classes)])
    with files.atomic_output(os.path.join(workdir, "samples_grid.png")) as tmp:
      save_grid(tmp, grid_images[order], nrow=per_class,
                upscale=max(1, 64 // image_data.resolution))
    with files.atomic_output(os.path.join(workdir, "nfe_sweep.png")) as tmp:
      _plot_sweep(results, tmp)
    _write_json(os.path.join(workdir, "metrics.json"), results)
    print(f"real-data floor (train vs test): FID-digits {results['floor']['fid']:.3f}, "
          f"accuracy {results['floor']['accuracy']:.3f}")
    print(f"wrote {workdir}/metrics.json, samples_grid.png and nfe_sweep.png")
  return results


def _write_json(path: str, results: dict) -> None:
  with files.atomic_output(path) as tmp, open(tmp, "w") as f:
    json.dump(results, f, indent=2)


def _print_row(solver, nfe, metrics):
  if jax.process_index() == 0:
    print(f"{solver:>5} NFE {nfe:>2}: FID-digits {metrics['fid']:8.3f}  "
          f"accuracy {metrics['accuracy']:.3f}", flush=True)


def _plot_sweep(results, path):
  plot_nfe({s: results[s] for s in SOLVERS}, results["floor"], path)


COLORS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189),
          (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))


PANELS = (("fid", "FID-digits (log)"), ("accuracy", "accuracy"))
RECON_PANELS = (("psnr", "PSNR (dB)"), ("fid", "FID-digits (log)"))  # a tokenizer's reconstructions


def plot_nfe(series: dict, floor: dict, path: str, panels=PANELS, xlabel: str = "NFE") -> None:
  """One panel per (metric, label) of `panels` against `xlabel` (log2 axis) for each of
  `series` ({name: {x: metrics}}), with the real-data `floor` where it has the metric; FID is
  drawn on a log axis. PIL only (no plotting dependency)."""
  from PIL import Image, ImageDraw
  width, height, margin = 640, 300, 50
  image = Image.new("RGB", (len(panels) * width, height), "white")
  draw = ImageDraw.Draw(image)
  names = list(series)
  nfes = sorted({int(n) for runs in series.values() for n in runs})
  for panel, (metric, label) in enumerate(panels):
    x0 = panel * width
    values = [v[metric] for runs in series.values() for v in runs.values()]
    values += [floor[metric]] if metric in floor else []
    transform = np.log10 if metric == "fid" else (lambda v: v)
    lo, hi = transform(max(min(values), 1e-3)), transform(max(values))
    hi = hi if hi > lo else lo + 1
    px = lambda n: x0 + margin + (width - 2 * margin) * np.log2(n) / max(np.log2(max(nfes)), 1)
    py = lambda v: height - margin - (height - 2 * margin) * (transform(max(v, 1e-3)) - lo) / (hi - lo)
    draw.rectangle([x0 + margin, margin, x0 + width - margin, height - margin], outline="black")
    draw.text((x0 + margin, 15), f"{label} vs {xlabel}", fill="black")
    for value in (min(values), max(values)):
      draw.text((x0 + 4, py(value) - 6), f"{value:.3g}", fill="black")
    for n in nfes:
      draw.text((px(n) - 4, height - margin + 8), str(n), fill="black")
    if metric in floor:
      floor_y = py(floor[metric])
      draw.line([x0 + margin, floor_y, x0 + width - margin, floor_y], fill=(120, 120, 120))
      draw.text((x0 + width - margin - 90, floor_y - 14), "real-data floor", fill=(120, 120, 120))
    for index, name in enumerate(names):
      color = COLORS[index % len(COLORS)]
      points = [(px(int(n)), py(v[metric]))
                for n, v in sorted(series[name].items(), key=lambda kv: int(kv[0]))]
      if len(points) > 1:
        draw.line(points, fill=color, width=2)
      for x, y in points:
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
      draw.text((x0 + width - margin - 110, margin + 8 + 14 * index), name, fill=color)
  image.save(path, format="PNG")



def plot_rows(rows, floor: dict, path: str) -> None:
  """plot_nfe's panels of each row (series, panels, xlabel), the rows stacked in one PNG."""
  from PIL import Image
  parts = []
  for index, (series, panels, xlabel) in enumerate(rows):
    tmp = f"{path}.row{index}.png"
    plot_nfe(series, floor, tmp, panels, xlabel)
    with Image.open(tmp) as part:
      parts.append(part.convert("RGB"))
    os.remove(tmp)
  canvas = Image.new("RGB", (max(p.width for p in parts), sum(p.height for p in parts)), "white")
  for i, part in enumerate(parts):
    canvas.paste(part, (0, i * parts[0].height))
  canvas.save(path, format="PNG")

def evaluate_samples_file(path: str, metrics) -> dict:
  """Score an ADM-style samples .npz (arr_0 uint8 NHWC, arr_1 labels) on the digits metrics."""
  from tesserax.data.digits import NUM_CLASSES
  from tesserax.data.preprocess import to_model_range
  known = ("fid_digits", "accuracy")
  unknown = [m for m in metrics if m not in known]
  if unknown:
    raise TesseraxError(f"unknown metric {unknown[0]!r}; available here: {', '.join(known)}")
  from tesserax.core.files import read_npz

  def arrays(names):
    if "arr_0" not in names:
      raise TesseraxError(f"{path} has no arr_0 (uint8 NHWC images)")
    return [n for n in ("arr_0", "arr_1") if n in names]

  data = read_npz(path, "samples file", arrays)
  images, labels = data["arr_0"], data.get("arr_1")
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] != images.shape[2]:
    raise TesseraxError(f"{path}: arr_0 must be uint8 [N, R, R, C], got {images.dtype} "
                        f"{list(images.shape)}")
  if "accuracy" in metrics:
    if labels is None:
      raise TesseraxError(f"{path} has no arr_1 labels, needed for accuracy")
    if labels.dtype.kind not in "iu" or labels.shape != (len(images),):
      raise TesseraxError(f"{path}: arr_1 must be {len(images)} integer labels, got "
                          f"{labels.dtype} {list(labels.shape)}")
    outside = labels[(labels < 0) | (labels >= NUM_CLASSES)]
    if outside.size:
      raise TesseraxError(f"{path}: arr_1 labels must be digit classes in [0, {NUM_CLASSES}); "
                          f"{outside.size} of {labels.size} are not (e.g. {outside[0]})")
  score = evaluators.digits_scorer(images.shape[1])
  scores = score(to_model_range(images),
                 labels if labels is not None else np.zeros(len(images), np.int32))
  names = {"fid_digits": "fid", "accuracy": "accuracy"}
  return {m: scores[names[m]] for m in metrics}
