"""FID-digits and class accuracy of conditional samples, in the digits network's features.

"FID" in the penultimate-layer features of a small classifier (backbones/digits_net.py),
plus the fraction of samples classified as the label they were generated for.
"""
import jax
import numpy as np
from jax.experimental import multihost_utils

from tesserax.backbones.digits_net import DigitsNet, digits_images
from tesserax.core.errors import TesseraxError
from tesserax.eval.frechet import frechet_distance
from tesserax.eval.stats import FeatureStats, all_processes


def digits_reference_stats(split: str, resolution: int, net: DigitsNet) -> FeatureStats:
  """Feature statistics of a digits split served at `resolution`."""
  images, _ = digits_images(split, resolution)
  return FeatureStats().update(net.features(images))


def digits_metrics(images, labels, ref_stats: FeatureStats, net: DigitsNet) -> dict:
  """{'fid': FID-digits against ref_stats, 'accuracy': fraction classified as `labels`}.

  images: float [N, R, R, 1] in [-1, 1], this process's samples; labels: int [N]. With several
  processes every process calls this, and the statistics and counts of all are combined.
  """
  labels = np.asarray(labels)
  if labels.shape != np.shape(images)[:1]:
    raise TesseraxError(
        f"labels must have shape [{np.shape(images)[0]}] to match images, got {labels.shape}")
  stats = all_processes(FeatureStats().update(net.features(images)))
  counts = np.array([np.sum(net.logits(images).argmax(axis=1) == labels), len(labels)], np.int32)
  if jax.process_count() > 1:
    counts = np.asarray(multihost_utils.process_allgather(counts)).sum(axis=0)
  fid = frechet_distance(stats.mean, stats.cov, ref_stats.mean, ref_stats.cov)
  return {"fid": fid, "accuracy": float(counts[0] / counts[1])}
