"""Scoring generated samples, for the trainer's periodic evaluation and the demo.

A scorer maps (images float32 NHWC in [-1, 1], labels) -- the same full arrays on every
process -- to a dict of metrics. It scores this process's share and the metric code merges the
shares across processes (float64 statistics), so nothing is counted twice.

- `digits`: FID-digits against the digits test split and the class accuracy of the samples,
  with the digits feature network (backbones/digits_net.py).
- `inception`: FID (and any of sfid, is, pr) against an ADM reference batch `eval.ref`, with
  the FID InceptionV3 (backbones/inception.py, ADM-evaluator preprocessing).

Tokenizer recipes are scored on reconstructions instead (`make_reconstruction_evaluator`).

The trainer runs `make_evaluator(config)` every `eval.every_steps` steps on N EMA samples drawn
with the `sample.*` settings and logs `eval/<metric>` to metrics.jsonl and TensorBoard.
"""
import jax
import numpy as np

from tesserax.data.preprocess import to_uint8


def process_share(array):
  """This process's rows of an array that every process holds in full."""
  return array[jax.process_index()::jax.process_count()]


def digits_scorer(resolution: int):
  from tesserax.backbones.digits_net import load_digits_net
  from tesserax.eval.digits import digits_metrics, digits_reference_stats
  net = load_digits_net(resolution)
  reference = digits_reference_stats("test", resolution, net)

  def score(images, labels):
    return digits_metrics(process_share(images), process_share(labels), reference, net)

  return score


def inception_scorer(ref_path: str, names):
  from tesserax.backbones import weights
  from tesserax.eval import metrics, reference
  names = tuple(names)
  ref = reference.load(ref_path, metrics=names)
  inception = weights.load("inception")

  def score(images, labels):
    del labels
    return metrics.generation_metrics(process_share(to_uint8(images)), ref, names,
                                      inception=inception, num_samples=len(images))

  return score


def make_scorer(config):
  if config.eval.kind == "digits":
    from tesserax.data import pipeline
    return digits_scorer(pipeline.image_config(config.data).resolution)
  if config.eval.kind == "inception":
    return inception_scorer(config.eval.ref, config.eval.metrics)
  from tesserax.errors import TesseraxError
  raise TesseraxError(f"unknown eval.kind {config.eval.kind!r}; use digits or inception")


def make_evaluator(config, generate):
  """`evaluate(setup, params) -> {"eval/<metric>": value}` for the trainer, or None when
  `eval.every_steps` is 0. `generate` is training.trainer.generate."""
  if not config.eval.every_steps:
    return None
  score = make_scorer(config)
  labels = np.arange(config.eval.num_samples, dtype=np.int32) % config.model.num_classes
  s = config.sample

  def evaluate(setup, params):
    images = generate(setup, params, labels, jax.random.PRNGKey(config.seed + 1), s.solver,
                      s.num_steps, s.shift, s.cfg_scale, tuple(s.interval),
                      batch_size=config.eval.batch_size, guided_channels=s.guided_channels)
    return {f"eval/{k}": float(v) for k, v in score(images, labels).items()
            if k != "num_samples"}

  return evaluate


def make_reconstruction_evaluator(setup, always=False):
  """`evaluate(setup, params)` of a tokenizer recipe, or None when `eval.every_steps` is 0
  (unless `always`):
  posterior-mean reconstructions of the first eval.num_samples images of eval.split scored by
  PSNR (uint8) and, for eval.kind "digits", FID-digits against the digits test split; for
  "inception", by eval.metrics of rfid, psnr, ssim, lpips against the originals."""
  from tesserax.eval import metrics
  config = setup.config
  if not (config.eval.every_steps or always):
    return None
  images = setup.eval_images()
  score = digits_scorer(config.data.resolution) if config.eval.kind == "digits" else None

  def evaluate(setup, params):
    rec = setup.reconstruct(params, images)
    if score is None:
      results = metrics.reconstruction_metrics(process_share(to_uint8(images)),
                                               process_share(to_uint8(rec)),
                                               tuple(config.eval.metrics))
    else:
      results = {"psnr": float(np.mean(metrics.psnr(to_uint8(images), to_uint8(rec)))),
                 "fid": score(rec, np.zeros(len(rec), np.int32))["fid"]}
    return {f"eval/{k}": float(v) for k, v in results.items() if k != "num_samples"}

  return evaluate
