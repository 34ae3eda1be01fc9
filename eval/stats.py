"""Streaming float64 feature mean and covariance across batches, devices and processes.

Each batch is brought to the host in float64 and folded into (count, mean, M2), M2 being the
sum of outer products of the centred rows, with the pairwise merge of Chan, Golub & LeVeque
(1979): n = na + nb, d = mb - ma, mean = ma + d nb / n, M2 = M2a + M2b + d d^T na nb / n.
The result depends on how the rows are batched only through float64 rounding.
"""
import jax
import numpy as np
from jax.experimental import multihost_utils

from tesserax.core.errors import TesseraxError


class FeatureStats:
  """Mean and covariance (ddof=1, as np.cov) of all feature rows seen so far."""

  def __init__(self):
    self.count = 0
    self._mean = None  # float64 [D]
    self._m2 = None  # float64 [D, D]

  def _add(self, count, mean, m2):
    if count == 0:
      return
    if self._mean is not None and mean.shape != self._mean.shape:
      raise TesseraxError(
          f"feature dimension {mean.shape[0]} does not match the {self._mean.shape[0]} "
          "seen before")
    if self.count == 0:
      self.count, self._mean, self._m2 = count, mean, m2
      return
    total = self.count + count
    delta = mean - self._mean
    self._mean = self._mean + delta * (count / total)
    self._m2 = self._m2 + m2 + np.outer(delta, delta) * (self.count * count / total)
    self.count = total

  def update(self, features):
    """Adds a batch of features [B, D]: a NumPy array or a (sharded) jax.Array.

    A jax.Array spanning several processes adds only the rows this process owns, so that
    `all_processes` counts every row once.
    """
    if np.ndim(features) != 2:
      raise TesseraxError(f"features must have shape [B, D], got {np.shape(features)}")
    x = _local_rows(features)
    if x.shape[0]:
      mean = x.mean(axis=0)
      centred = x - mean
      self._add(x.shape[0], mean, centred.T @ centred)
    return self

  def merge(self, other):
    """Adds the rows summarised by another FeatureStats."""
    self._add(other.count, other._mean, other._m2)
    return self

  @property
  def mean(self):
    if self.count < 1:
      raise TesseraxError("no features to average: the set of images is empty")
    return self._mean

  @property
  def cov(self):
    if self.count < 2:
      raise TesseraxError(f"a covariance needs the features of at least 2 images, got "
                          f"{self.count}")
    return self._m2 / (self.count - 1)


def _local_rows(features):
  """The float64 rows this process contributes.

  A jax.Array spanning several processes contributes each row once over all processes: the
  first process (in process order) that holds the row counts it.
  """
  if not isinstance(features, jax.Array) or features.is_fully_addressable:
    return np.asarray(features, np.float64)
  n, d = features.shape
  index_map = features.sharding.devices_indices_map(features.shape)
  owner = np.full(n, -1)
  for device in sorted(index_map, key=lambda dev: (dev.process_index, dev.id)):
    rows, cols = index_map[device]
    if range(d)[cols] != range(d):
      raise TesseraxError("features split along the feature dimension across processes")
    owner[rows] = np.where(owner[rows] < 0, device.process_index, owner[rows])
  host = np.empty((n, d), np.float64)
  for shard in features.addressable_shards:
    host[shard.index] = np.asarray(shard.data, np.float64)
  return host[owner == jax.process_index()]


def all_processes(stats: FeatureStats) -> FeatureStats:
  """Combines every process's FeatureStats exactly, in process order; every process calls it.

  The float64 statistics travel bit-exactly as uint32 through `process_allgather` (which
  would otherwise pass through 32-bit device arrays). With one process, `stats` is returned.
  """
  if jax.process_count() == 1:
    return stats
  dim = 0 if stats._mean is None else stats._mean.shape[0]
  dims = np.asarray(multihost_utils.process_allgather(np.array([dim], np.int32))).ravel()
  if len(set(dims[dims > 0])) > 1:
    raise TesseraxError(f"feature dimensions differ across processes: {dims.tolist()}")
  dim = int(dims.max())
  packed = np.zeros(1 + dim + dim * dim, np.float64)
  if stats.count:
    packed[0] = stats.count
    packed[1:1 + dim] = stats._mean
    packed[1 + dim:] = stats._m2.ravel()
  gathered = multihost_utils.process_allgather(packed.view(np.uint32))
  total = FeatureStats()
  for row in np.ascontiguousarray(gathered).view(np.float64):
    total._add(int(row[0]), row[1:1 + dim], row[1 + dim:].reshape(dim, dim))
  return total
