"""Tests of eval/ (Frechet distance, streaming statistics, FID-digits, grids) and the digits
feature network. Oracles: scipy.linalg.sqrtm, np.mean / np.cov, and the real digits splits."""
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import scipy.linalg
from PIL import Image

from tesserax.backbones.digits_net import digits_images, load_digits_net
from tesserax.data.preprocess import to_uint8
from tesserax.core import host
from tesserax.core.errors import TesseraxError
from tesserax.eval.digits_metrics import digits_metrics, digits_reference_stats
from tesserax.eval.frechet import frechet_distance
from tesserax.eval.grid import save_grid
from tesserax.eval.stats import FeatureStats, all_processes

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def run_script(args, num_devices, timeout=120):
  devices = f"--xla_force_host_platform_device_count={num_devices}"
  env = dict(host.xla_flags_env(os.environ, devices), JAX_PLATFORMS="cpu")
  return subprocess.Popen([sys.executable] + args, env=env, cwd=TESTS_DIR, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(process, timeout=120):
  try:
    out, err = process.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    process.kill()
    out, err = process.communicate()
  assert process.returncode == 0, err[-3000:]
  return out


# ---------------------------------------------------------------------------- Frechet distance


def sqrtm_frechet(mu1, sigma1, mu2, sigma2):
  """pytorch-fid's formula (fid_score.py) with scipy's sqrtm in float64, real part."""
  diff = mu1 - mu2
  covmean = scipy.linalg.sqrtm(sigma1 @ sigma2).real
  return diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean)


def random_cases(seed, dim=48):
  rng = np.random.RandomState(seed)
  a = rng.randn(dim, 2 * dim)
  full = a @ a.T / (2 * dim)
  b, c = rng.randn(dim, 5), rng.randn(dim, 9) / 3
  low, low2 = b @ b.T + 1e-12 * np.eye(dim), c @ c.T + 1e-12 * np.eye(dim)
  mu1, mu2 = rng.randn(dim), 0.1 * rng.randn(dim)
  return [(mu1, full, mu2, low), (mu1, low, mu2, full), (mu1, low, mu2, low2)]


@pytest.mark.parametrize("seed", range(3))
def test_frechet_matches_scipy_sqrtm(seed):
  for mu1, sigma1, mu2, sigma2 in random_cases(seed):
    expected = sqrtm_frechet(mu1, sigma1, mu2, sigma2)
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-8)


def test_frechet_of_identical_statistics_is_zero():
  mu, sigma, _, _ = random_cases(0)[0]
  assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8
  # Float32 inputs (as features arrive) are promoted, not computed in float32.
  assert abs(frechet_distance(mu.astype(np.float32), sigma.astype(np.float32),
                              mu.astype(np.float32), sigma.astype(np.float32))) < 1e-8


def test_frechet_rejects_bad_input():
  mu, sigma = np.zeros(4), np.eye(4)
  with pytest.raises(TesseraxError, match="dimensions differ"):
    frechet_distance(mu, sigma, np.zeros(3), np.eye(3))
  with pytest.raises(TesseraxError, match="shapes"):
    frechet_distance(mu, np.eye(3), mu, sigma)
  with pytest.raises(TesseraxError, match="shapes"):
    frechet_distance(np.zeros((4, 1)), sigma, mu, sigma)
  with pytest.raises(TesseraxError, match="NaN"):
    frechet_distance(mu, np.full((4, 4), np.nan), mu, sigma)


# ---------------------------------------------------------------------------- FeatureStats


def features(n=1000, dim=16, seed=0):
  rng = np.random.RandomState(seed)
  scales = np.logspace(-2, 2, dim)
  return (rng.randn(n, dim) * scales + 1000.0 + rng.randn(dim)).astype(np.float32)


def assert_matches_numpy(stats, data):
  data = np.asarray(data, np.float64)
  cov = np.cov(data, rowvar=False)
  assert stats.count == len(data)
  np.testing.assert_allclose(stats.mean, data.mean(axis=0), rtol=1e-10)
  np.testing.assert_allclose(stats.cov, cov, rtol=1e-10, atol=1e-10 * np.abs(cov).max())


@pytest.mark.parametrize("sizes", [[1000], [1] * 10 + [990], [7, 300, 693], [500, 500]])
def test_feature_stats_match_numpy_for_any_batching(sizes):
  data = features()
  stats = FeatureStats()
  for chunk in np.split(data, np.cumsum(sizes)[:-1]):
    stats.update(chunk)
  assert_matches_numpy(stats, data)


def test_feature_stats_merge_and_single_process_all_processes():
  data = features(seed=1)
  a, b = FeatureStats().update(data[:123]), FeatureStats().update(data[123:])
  merged = FeatureStats().merge(a).merge(b)
  assert_matches_numpy(merged, data)
  assert all_processes(merged) is merged


def test_feature_stats_rejects_bad_input():
  stats = FeatureStats()
  with pytest.raises(TesseraxError):
    stats.mean
  with pytest.raises(TesseraxError):
    stats.update(np.zeros(5))
  stats.update(np.zeros((1, 5)))
  with pytest.raises(TesseraxError, match="at least 2"):
    stats.cov
  with pytest.raises(TesseraxError, match="dimension"):
    stats.update(np.zeros((3, 4)))


SHARDED_SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from tesserax.eval.stats import FeatureStats
    from test_eval import assert_matches_numpy, features
    assert jax.device_count() == 8
    data = features(n=96)
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    ref = FeatureStats().update(data)
    for spec in (P("data"), P(("data", "model")), P("data", "model"), P()):
      x = jax.device_put(data, NamedSharding(mesh, spec))
      stats = FeatureStats().update(x[:40]).update(x[40:])
      assert_matches_numpy(stats, data)
      np.testing.assert_allclose(stats.cov, ref.cov, rtol=1e-12, atol=1e-12 * abs(ref.cov).max())
    print("OK")
""")


def test_feature_stats_of_arrays_sharded_over_8_devices():
  assert "OK" in finish(run_script(["-c", SHARDED_SCRIPT], num_devices=8))


def test_all_processes_combines_two_processes_exactly(tmp_path):
  sys.path.insert(0, TESTS_DIR)
  from _multiprocess_stats_worker import worker_data
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  out = tmp_path / "stats.npz"
  workers = [run_script(["_multiprocess_stats_worker.py", str(port), str(i), str(out)],
                        num_devices=2) for i in range(2)]
  for worker in workers:
    finish(worker)
  result = np.load(out)
  data = worker_data().astype(np.float64)
  assert int(result["count"]) == len(data)
  np.testing.assert_allclose(result["mean"], data.mean(axis=0), rtol=1e-10)
  cov = np.cov(data, rowvar=False)
  np.testing.assert_allclose(result["cov"], cov, rtol=1e-10, atol=1e-10 * np.abs(cov).max())


# ---------------------------------------------------------------------------- digits


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def digits_net(cache_dir):
  return load_digits_net(16, cache_dir=cache_dir)


def test_digits_net_accuracy_and_cache(digits_net, cache_dir):
  images, labels = digits_images("test", 16)
  assert np.mean(digits_net.logits(images).argmax(axis=1) == labels) >= 0.95
  feats = digits_net.features(images)
  assert feats.shape == (len(images), 128) and feats.dtype == np.float32
  assert [p.name for p in cache_dir.iterdir()] == ["digits_net_v1_r16.npz"]
  reloaded = load_digits_net(16, cache_dir=cache_dir)
  np.testing.assert_array_equal(reloaded.features(images), feats)
  with pytest.raises(TesseraxError):
    digits_net.features(np.zeros((2, 8, 8, 1), np.float32))


def test_digits_metrics_real_vs_noise(digits_net):
  ref = digits_reference_stats("train", 16, digits_net)
  assert ref.count == 1500
  images, labels = digits_images("test", 16)
  real = digits_metrics(images, labels, ref, digits_net)
  noise = np.random.RandomState(0).uniform(-1, 1, images.shape).astype(np.float32)
  fake = digits_metrics(noise, labels, ref, digits_net)
  assert real["accuracy"] >= 0.95
  assert real["fid"] < 30 and real["fid"] < 0.1 * fake["fid"], (real, fake)  # ~13 vs ~1000
  assert fake["accuracy"] < 0.5
  with pytest.raises(TesseraxError):
    digits_metrics(images, labels[:5], ref, digits_net)


# ---------------------------------------------------------------------------- grids


@pytest.mark.parametrize("channels", [1, 3])
def test_save_grid_layout(tmp_path, channels):
  images = np.random.RandomState(0).uniform(-1, 1, (5, 4, 6, channels)).astype(np.float32)
  path = tmp_path / "sub" / "grid.png"
  save_grid(path, images, nrow=3, upscale=2)
  grid = np.asarray(Image.open(path))
  grid = grid[..., None] if channels == 1 else grid
  assert grid.shape == (2 * (8 + 1) + 1, 3 * (12 + 1) + 1, channels)
  cells = to_uint8(images).repeat(2, axis=1).repeat(2, axis=2)
  for i in range(5):
    top, left = 1 + (i // 3) * 9, 1 + (i % 3) * 13
    np.testing.assert_array_equal(grid[top:top + 8, left:left + 12], cells[i])
  assert np.all(grid[0] == 255) and np.all(grid[:, 0] == 255) and np.all(grid[9] == 255)
  assert np.all(grid[10:18, 27:39] == 255)  # the empty sixth cell
  with pytest.raises(TesseraxError):
    save_grid(path, np.zeros((2, 4, 4, 2), np.float32), nrow=3)
