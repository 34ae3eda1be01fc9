"""Evaluators by type: periodic scoring of a task's predictions (DESIGN.md, "Interfaces").

A run lists its evaluators as `config.evals.NAME = {type, every_steps, ...}`; each type is
registered in core/registry.py EVALUATORS as `make(settings, config, predict) ->
evaluate(params) -> {metric: value}`, over the task's predict functions (training/task.py).
Scorers see the same full arrays on every process, score this process's share and let the
metric code merge the shares across processes (float64 statistics), so nothing is counted
twice. The training loop logs `eval/NAME/<metric>` to metrics.jsonl and TensorBoard.

Generation (N = num_samples EMA samples of labels 0, 1, ... in turn, drawn with the `sample.*`
settings in batches of batch_size, from the key of seed + 1):
  digits        FID-digits against the digits test split and the class accuracy, with the
                digits feature network (backbones/digits_net.py)
  inception     `metrics` of fid, sfid, is, pr against the ADM reference batch `ref`, with the
                FID InceptionV3 (ADM-evaluator preprocessing)
Reconstruction (the first num_samples images of `split`, encoded deterministically and decoded):
  recon_digits  PSNR (uint8) and FID-digits of the reconstructions against the digits test split
  recon         `metrics` of rfid, psnr, ssim, lpips against the originals
"""
from typing import Callable, NamedTuple

import jax
import numpy as np

from tesserax.core import registry
from tesserax.data import pipeline
from tesserax.data.preprocess import to_model_range, to_uint8


class Evaluator(NamedTuple):
  every_steps: int
  evaluate: Callable


def process_share(array):
  """This process's rows of an array that every process holds in full."""
  return array[jax.process_index()::jax.process_count()]


def digits_scorer(resolution: int):
  """score(images, labels) -> FID-digits ("fid") and class accuracy against the test split."""
  from tesserax.backbones.digits_net import load_digits_net
  from tesserax.eval.digits_metrics import digits_metrics, digits_reference_stats
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


def _generation(score, settings, config, predict):
  labels = np.arange(settings.num_samples, dtype=np.int32) % config.model.num_classes
  key = jax.random.PRNGKey(config.seed + 1)

  def evaluate(params):
    images = predict["generate"](params, labels, key, batch_size=settings.batch_size)
    return {k: float(v) for k, v in score(images, labels).items() if k != "num_samples"}

  return evaluate


@registry.EVALUATORS.register("digits")
def make_digits(settings, config, predict):
  resolution = pipeline.image_config(config.data).resolution
  return _generation(digits_scorer(resolution), settings, config, predict)


@registry.EVALUATORS.register("inception")
def make_inception(settings, config, predict):
  return _generation(inception_scorer(settings.ref, settings.metrics), settings, config,
                     predict)


def eval_images(data_config, split: str, limit: int) -> np.ndarray:
  """The first `limit` images of `split` as float32 NHWC in [-1, 1]."""
  return to_model_range(np.concatenate(list(pipeline.iterate_split(data_config, split,
                                                                   limit=limit))))


def _reconstruction(score, settings, config, predict):
  images = eval_images(config.data, settings.split, settings.num_samples)

  def evaluate(params):
    rec = predict["reconstruct"](params, images, batch_size=settings.batch_size)
    return {k: float(v) for k, v in score(images, rec).items() if k != "num_samples"}

  return evaluate


@registry.EVALUATORS.register("recon_digits")
def make_recon_digits(settings, config, predict):
  from tesserax.eval import metrics
  fid = digits_scorer(config.data.resolution)

  def score(images, rec):
    return {"psnr": float(np.mean(metrics.psnr(to_uint8(images), to_uint8(rec)))),
            "fid": fid(rec, np.zeros(len(rec), np.int32))["fid"]}

  return _reconstruction(score, settings, config, predict)


@registry.EVALUATORS.register("recon")
def make_recon(settings, config, predict):
  from tesserax.eval import metrics

  def score(images, rec):
    return metrics.reconstruction_metrics(process_share(to_uint8(images)),
                                          process_share(to_uint8(rec)), tuple(settings.metrics))

  return _reconstruction(score, settings, config, predict)


def build(name: str, config, predict) -> Evaluator:
  """The evaluator `config.evals[name]` over the task's `predict` functions."""
  settings = config.evals[name]
  make = registry.EVALUATORS.get(settings.type)
  return Evaluator(settings.every_steps, make(settings, config, predict))


def build_all(config, predict) -> dict:
  """{name: Evaluator} of the run's evaluators with a positive every_steps."""
  return {name: build(name, config, predict) for name in config.evals
          if config.evals[name].every_steps}
