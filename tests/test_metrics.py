"""Tests of eval/metrics.py and eval/reference.py.

Oracles: direct NumPy implementations of the definitions (Inception Score as in
openai/improved-gan, k-NN precision/recall as in ADM's ManifoldEstimator, PSNR, SSIM of
Wang et al. 2004 in float64), np.mean / np.cov of features computed one image at a time,
constructed inputs with known answers, and the statistics of 1 device against 8 fake devices.
"""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import scipy.ndimage
from flax import nnx

from _sharded_metrics_worker import worker_images
from test_inception import random_state_dict
from tesserax.backbones import dinov2, inception, weights
from tesserax.data.preprocess import to_uint8
from tesserax.core import host
from tesserax.core.errors import TesseraxError
from tesserax.eval import metrics, reference
from tesserax.eval.frechet import frechet_distance

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
  """A cache directory holding a random-weight Inception under the official file stem."""
  directory = tmp_path_factory.mktemp("cache")
  np.savez(directory / "pt_inception-2015-12-05-6726825d.npz", **random_state_dict(seed=3))
  return directory


@pytest.fixture(scope="session")
def model(cache_dir):
  return weights.load("inception", cache_dir)


@pytest.fixture
def recorded_frechet(monkeypatch):
  """eval/metrics' Frechet distance replaced by a recorder of its arguments. The distance
  itself is tested in test_eval.py; at D = 2048 one call takes ~10-25 s on this machine's 2
  cores, so here we check exactly what reaches it."""
  monkeypatch.setattr(metrics, "frechet_distance", lambda *args: tuple(map(np.asarray, args)))


def assert_stats(mu, sigma, rows, rtol=1e-6):
  """mu, sigma are np.mean and np.cov of the feature rows (float32 features: rtol)."""
  rows = np.asarray(rows, np.float64)
  cov = np.cov(rows, rowvar=False)
  np.testing.assert_allclose(mu, rows.mean(0), rtol=rtol, atol=rtol * np.abs(rows).max())
  np.testing.assert_allclose(sigma, cov, rtol=rtol, atol=rtol * np.abs(cov).max())


# Compiled as metrics.inception_outputs is on CPU.
_batch_outputs = jax.jit(lambda m, x: m(inception.preprocess(x)),
                         compiler_options=metrics.INCEPTION_CPU_OPTIONS)


def direct_features(model, images, batch_size=4):
  """Inception outputs of uint8 images, batch_size at a time (zero images fill the last batch;
  their rows are dropped), the batch the metrics run at in these tests. jax 0.10's XLA:CPU gives
  an image the same bits alone as in a batch; from 0.11 a batch of one rounds differently
  (features within 3.4e-7 of their largest), while batches of 4 and 8 agree bit for bit."""
  rows = []
  for i in range(0, len(images), batch_size):
    chunk = images[i:i + batch_size]
    fill = np.zeros((batch_size - len(chunk),) + chunk.shape[1:], chunk.dtype)
    outputs = _batch_outputs(model, np.concatenate([chunk, fill]))
    rows.append({k: np.asarray(v)[:len(chunk)] for k, v in outputs.items()})
  return {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}


def random_images(seed, n, size=32):
  return np.random.RandomState(seed).randint(0, 256, (n, size, size, 3)).astype(np.uint8)


# --------------------------------------------------------------------------- Inception Score


def np_inception_score(logits, splits=10):
  """improved-gan inception_score/model.py on softmax(logits): consecutive splits of N/10."""
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  n, scores = len(p), []
  for i in range(splits):
    part = p[i * n // splits:(i + 1) * n // splits]
    kl = part * (np.log(part) - np.log(np.mean(part, 0, keepdims=True)))
    scores.append(np.exp(np.mean(np.sum(kl, 1))))
  return np.mean(scores)


def test_inception_score_matches_definition():
  logits = 3 * np.random.RandomState(0).standard_normal((1003, 1008))
  np.testing.assert_allclose(metrics.inception_score(logits), np_inception_score(logits),
                             rtol=1e-12)


def test_inception_score_constructed_cases():
  """Identical predictions give 1; confident predictions spread evenly over 10 classes in
  every split give 10."""
  assert metrics.inception_score(np.zeros((50, 1008))) == pytest.approx(1.0, abs=1e-12)
  logits = 200.0 * np.eye(1008)[np.arange(100) % 10]
  assert metrics.inception_score(logits) == pytest.approx(10.0, rel=1e-9)
  with pytest.raises(TesseraxError, match="at least 10 samples"):
    metrics.inception_score(np.zeros((9, 1008)))


# --------------------------------------------------------------------------- precision/recall


def np_precision_recall(ref, samples, k=3):
  """Kynkaanniemi et al. with ADM's conventions: squared distances, radius = k-th nearest
  neighbour in the own set excluding self, membership d <= radius; float64."""
  def d2(a, b):
    return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)

  ref_r = np.sort(d2(ref, ref), axis=1)[:, k]
  sample_r = np.sort(d2(samples, samples), axis=1)[:, k]
  precision = np.mean((d2(samples, ref) <= ref_r[None, :]).any(1))
  recall = np.mean((d2(ref, samples) <= sample_r[None, :]).any(1))
  return precision, recall


def test_precision_recall_matches_definition(monkeypatch):
  monkeypatch.setattr(metrics, "PR_BLOCK", 64)  # several padded row blocks
  rng = np.random.RandomState(1)
  ref = rng.standard_normal((230, 12))
  samples = 0.8 * rng.standard_normal((150, 12)) + 0.5
  got = metrics.precision_recall(ref, samples)
  want = np_precision_recall(ref, samples)
  assert 0 < want[0] < 1 and 0 < want[1] < 1
  assert got == pytest.approx(want, abs=1e-12)


def test_precision_recall_constructed_cases():
  x = np.random.RandomState(2).standard_normal((40, 5))
  assert metrics.precision_recall(x, x) == (1.0, 1.0)
  assert metrics.precision_recall(x, x + 100.0) == (0.0, 0.0)
  with pytest.raises(TesseraxError, match="more than 3 samples"):
    metrics.precision_recall(x, x[:3])


# ----------------------------------------------------------------------- PSNR, SSIM, LPIPS


def test_psnr_identical_and_known_noise():
  rng = np.random.RandomState(3)
  a = rng.randint(10, 246, (3, 16, 20, 3)).astype(np.uint8)
  b = (a + 4 * rng.choice([-1, 1], a.shape)).astype(np.uint8)  # MSE 16 exactly
  out = metrics.reconstruction_metrics(a, b, ("psnr",))
  assert out["psnr"] == pytest.approx(10 * np.log10(255 ** 2 / 16), rel=1e-12)
  assert out["num_samples"] == 3
  assert metrics.reconstruction_metrics(a, a, ("psnr",))["psnr"] == np.inf
  b[2] = a[2]  # only the first num_samples pairs count
  out = metrics.reconstruction_metrics([a[:1], a[1:]], [b[:1], b[1:]], ("psnr",),
                                       num_samples=2, batch_size=1)
  assert out["num_samples"] == 2 and np.isfinite(out["psnr"])


def np_ssim(a, b):
  """Wang et al. 2004 in float64: 11x11 Gaussian (sigma 1.5) window, K = (0.01, 0.03),
  L = 255, valid region only; mean over the map and the channels."""
  x = np.arange(11) - 5
  g = np.exp(-x ** 2 / 4.5)
  window = np.outer(g, g) / np.outer(g, g).sum()
  c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
  values = []
  for ch in range(a.shape[-1]):
    x, y = a[..., ch].astype(np.float64), b[..., ch].astype(np.float64)

    def filt(z):
      return scipy.ndimage.correlate(z, window, mode="constant")[5:-5, 5:-5]

    mx, my = filt(x), filt(y)
    sxx, syy, sxy = filt(x * x) - mx ** 2, filt(y * y) - my ** 2, filt(x * y) - mx * my
    ssim_map = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (sxx + syy + c2))
    values.append(ssim_map.mean())
  return np.mean(values)


def smooth_images(seed, n, h=40, w=48):
  rng = np.random.RandomState(seed)
  base = scipy.ndimage.gaussian_filter(rng.uniform(0, 255, (n, h, w, 3)), (0, 3, 3, 0))
  return np.clip((base - base.mean()) * 4 + 128, 0, 255).astype(np.uint8)


def test_ssim_matches_float64_wang_et_al():
  a = smooth_images(4, 3)
  rng = np.random.RandomState(5)
  noisy = np.clip(a + rng.normal(0, 12, a.shape), 0, 255).astype(np.uint8)
  brighter = np.clip(a.astype(int) + 30, 0, 255).astype(np.uint8)
  shifted = np.roll(a, 2, axis=2)
  for b in (noisy, brighter, shifted):
    got = np.asarray(metrics.ssim(a, b))
    want = np.array([np_ssim(a[i], b[i]) for i in range(len(a))])
    assert np.all(want < 0.999)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)
  out = metrics.reconstruction_metrics(a, noisy, ("ssim",), batch_size=2)
  assert out["ssim"] == pytest.approx(np.mean([np_ssim(a[i], noisy[i]) for i in range(3)]),
                                      abs=2e-6)
  assert metrics.reconstruction_metrics(a, a, ("ssim",))["ssim"] == pytest.approx(1, abs=1e-6)


@pytest.fixture(scope="session")
def lpips_model():
  """LPIPS with random VGG16 weights and non-negative heads, as in lpips v0.1."""
  rng = np.random.RandomState(6)
  params = {}
  for key, shape in weights._expected(weights.FACTORIES["lpips_vgg"]).items():  # noqa: SLF001
    if key.startswith("lins"):
      params[key] = rng.uniform(0, 1, shape)
    elif key.endswith("kernel"):
      params[key] = rng.standard_normal(shape) * np.sqrt(2 / np.prod(shape[:3]))
    else:
      params[key] = 0.1 * rng.standard_normal(shape)
  return weights.with_params(weights.FACTORIES["lpips_vgg"], params)


def test_lpips_constructed_cases(lpips_model):
  a = smooth_images(7, 4, 24, 24)
  b = np.roll(a, 3, axis=1)  # a known spatial shift
  same = metrics.reconstruction_metrics(a, a, ("lpips",), lpips=lpips_model, batch_size=4)
  assert same["lpips"] == pytest.approx(0, abs=1e-6)
  out = metrics.reconstruction_metrics(a, b, ("lpips",), lpips=lpips_model, batch_size=4)
  pair = jax.jit(lambda m, x, y: m(x, y))
  per_image = np.asarray(pair(lpips_model, metrics.as_float(a), metrics.as_float(b)))
  reverse = np.asarray(pair(lpips_model, metrics.as_float(b), metrics.as_float(a)))
  assert np.all(per_image > 0)
  np.testing.assert_allclose(per_image, reverse, rtol=1e-5)
  assert out["lpips"] == pytest.approx(per_image.mean(), rel=1e-5)


def test_rfid_is_the_distance_between_original_and_reconstruction_statistics(
    model, recorded_frechet):
  orig = random_images(8, 4)
  recon = np.clip(orig.astype(int) + np.random.RandomState(9).randint(-20, 21, orig.shape),
                  0, 255).astype(np.uint8)
  out = metrics.reconstruction_metrics(orig, recon, ("rfid", "psnr"), inception=model,
                                       batch_size=4)
  assert_stats(*out["rfid"][:2], direct_features(model, orig)["pool"])
  assert_stats(*out["rfid"][2:], direct_features(model, recon)["pool"])


# --------------------------------------------------------------- generation metrics, references


@pytest.fixture(scope="session")
def ref_file(model, tmp_path_factory):
  images = random_images(10, 8)
  ref = reference.compute(images, inception=model, keep_images=5, batch_size=4)
  path = tmp_path_factory.mktemp("ref") / "VIRTUAL_test.npz"
  reference.save(path, ref)
  return path, images


def test_reference_statistics_and_round_trip(model, ref_file):
  path, images = ref_file
  ref = reference.load(path)
  features = direct_features(model, images)
  assert set(ref) == {"mu", "sigma", "mu_s", "sigma_s", "arr_0"}
  np.testing.assert_array_equal(ref["arr_0"], images[:5])
  for key, rows in (("", features["pool"]), ("_s", features["spatial"])):
    rows = rows.astype(np.float64)
    np.testing.assert_allclose(ref["mu" + key], rows.mean(0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ref["sigma" + key], np.cov(rows, rowvar=False), rtol=1e-5,
                               atol=1e-7 * np.abs(ref["sigma" + key]).max())
  assert ref["sigma"].dtype == np.float64


def test_generation_metrics_against_direct_computation(model, ref_file, recorded_frechet):
  path, ref_images = ref_file
  ref = reference.load(path)
  samples = metrics.as_float(random_images(11, 10)) * 0.9  # floats in [-1, 1]
  out = metrics.generation_metrics(samples, ref, ("fid", "sfid", "is", "pr"), inception=model,
                                   batch_size=4)
  assert out["num_samples"] == 10
  f = direct_features(model, to_uint8(samples))
  rf = direct_features(model, ref_images[:5])
  for key, rows, mu, sigma in (("fid", f["pool"], "mu", "sigma"),
                               ("sfid", f["spatial"], "mu_s", "sigma_s")):
    assert_stats(*out[key][:2], rows)
    np.testing.assert_array_equal(out[key][2], ref[mu])
    np.testing.assert_array_equal(out[key][3], ref[sigma])
  assert out["is"] == pytest.approx(np_inception_score(f["logits"].astype(np.float64)),
                                    rel=1e-5)
  assert (out["precision"], out["recall"]) == np_precision_recall(
      rf["pool"].astype(np.float64), f["pool"].astype(np.float64))
  # A stream of uneven batches, re-chunked and padded differently, gives the same statistics.
  again = metrics.generation_metrics([samples[:7], samples[7:]], ref, ("fid", "sfid"),
                                     inception=model, batch_size=4)
  for key in ("fid", "sfid"):
    for a, b in zip(again[key], out[key]):
      np.testing.assert_allclose(a, b, rtol=0, atol=1e-10 * np.abs(b).max())


def test_fd_dinov2_against_direct_computation():
  rng = np.random.RandomState(12)
  config = dict(width=32, depth=1, heads=2, grid=3)
  factory = lambda: dinov2.DinoV2(rngs=nnx.Rngs(0), **config)  # noqa: E731
  params = {k: (1.0 if k.endswith("scale") else 0.0) + 0.3 * rng.standard_normal(s)
            for k, s in weights._expected(factory).items()}  # noqa: SLF001
  model = weights.with_params(factory, params)
  images = random_images(13, 6, 48)
  direct = jax.jit(lambda m, x: m(dinov2.preprocess(x)))
  ref_rows = np.asarray(direct(model, random_images(14, 6, 48)), np.float64)
  ref = {"mu_dinov2": ref_rows.mean(0), "sigma_dinov2": np.cov(ref_rows, rowvar=False)}
  out = metrics.generation_metrics(images, ref, ("fd_dinov2",), dinov2=model, batch_size=4)
  rows = np.asarray(direct(model, images), np.float64)
  want = frechet_distance(rows.mean(0), np.cov(rows, rowvar=False), ref["mu_dinov2"],
                          ref["sigma_dinov2"])
  assert out["fd_dinov2"] == pytest.approx(want, rel=1e-6)


def test_statistics_agree_on_1_and_8_devices(model, cache_dir, tmp_path):
  """Sharded over 8 devices (batches of 8, the last padded) equals one image at a time on one
  device of the same process to float64 round-off. Against this process's single device the
  features differ by float32 round-off (3e-7 relative, up to 6e-6 of the largest covariance
  entry over these 10 images): XLA:CPU's convolutions without YNNPACK
  (metrics.INCEPTION_CPU_OPTIONS) sum in an order that depends on the process's device count,
  the same unsharded program included."""
  out = tmp_path / "sharded.npz"
  env = dict(host.xla_flags_env(os.environ, "--xla_force_host_platform_device_count=8"),
             JAX_PLATFORMS="cpu")
  worker = subprocess.Popen(
      [sys.executable, "_sharded_metrics_worker.py", str(cache_dir), str(out)], env=env,
      cwd=TESTS_DIR, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  local = metrics.accumulate(worker_images(), inception=model, batch_size=1)
  _, err = worker.communicate(timeout=300)
  assert worker.returncode == 0, err[-3000:]
  with np.load(out) as stats:
    for key in ("pool", "spatial"):
      for stat, value in (("mean", local[key].mean), ("cov", local[key].cov)):
        one_device = stats[f"one_device_{key}_{stat}"]
        np.testing.assert_allclose(stats[f"{key}_{stat}"], one_device, rtol=0,
                                   atol=1e-10 * np.abs(one_device).max())
        np.testing.assert_allclose(stats[f"{key}_{stat}"], value, rtol=0,
                                   atol=1e-5 * np.abs(value).max())


# ------------------------------------------------------------------------------ bad inputs


@pytest.mark.parametrize("images, message", [
    (np.zeros((2, 8, 8), np.uint8), r"NHWC RGB \[N, H, W, 3\], got shape \(2, 8, 8\)"),
    (np.zeros((2, 8, 8, 1), np.uint8), "NHWC RGB"),
    (np.zeros((2, 8, 8, 3), np.int32), "must be uint8 or float in \\[-1, 1\\], got int32"),
    (np.full((2, 8, 8, 3), 0.5, np.float32), "look like \\[0, 1\\] data"),
    (np.full((2, 8, 8, 3), 200.0, np.float32), "pass them as uint8"),
    (np.ones((2, 8, 8, 3), np.uint8), "look like \\[0, 1\\] floats cast to uint8"),
    (np.full((2, 8, 8, 3), np.nan, np.float32), "NaN"),
])
def test_bad_images_are_refused(images, message):
  with pytest.raises(TesseraxError, match=message):
    metrics.as_uint8(images, "samples")
  with pytest.raises(TesseraxError, match=message):
    metrics.reconstruction_metrics(images, images, ("psnr",))


def test_bad_requests_are_refused(model, ref_file, tmp_path):
  path, _ = ref_file
  ref = reference.load(path, ("fid",))
  samples = random_images(15, 6)
  with pytest.raises(TesseraxError, match="got 6 images, fewer than the 8 asked for"):
    metrics.generation_metrics(samples, ref, ("fid",), inception=model, num_samples=8)
  with pytest.raises(TesseraxError, match="got 6 image pairs, fewer than the 7 asked for"):
    metrics.reconstruction_metrics(samples, samples, ("psnr",), num_samples=7)
  with pytest.raises(TesseraxError, match="differ in shape"):
    metrics.reconstruction_metrics(samples, samples[:5], ("psnr",))
  with pytest.raises(TesseraxError, match="unknown metrics \\['kid'\\]"):
    metrics.generation_metrics(samples, ref, ("fid", "kid"), inception=model)
  with pytest.raises(TesseraxError, match="metric 'sfid' needs 'mu_s' in the reference"):
    metrics.generation_metrics(samples, ref, ("sfid",), inception=model)


def test_bad_reference_files_are_refused(ref_file, tmp_path):
  path, _ = ref_file
  with np.load(path) as f:
    full = dict(f)
  np.savez(tmp_path / "no_spatial.npz", mu=full["mu"], sigma=full["sigma"])
  reference.load(tmp_path / "no_spatial.npz", ("fid", "is"))  # enough for these
  with pytest.raises(TesseraxError, match="metric 'sfid' needs key 'mu_s', which the file lacks"):
    reference.load(tmp_path / "no_spatial.npz", ("fid", "sfid"))
  np.savez(tmp_path / "dim64.npz", mu=np.zeros(64), sigma=np.eye(64))
  with pytest.raises(TesseraxError, match=r"mu has shape \(64,\), expected \(2048,\)"):
    reference.load(tmp_path / "dim64.npz", ("fid",))
  np.savez(tmp_path / "float_images.npz", arr_0=np.zeros((4, 8, 8, 3), np.float32))
  with pytest.raises(TesseraxError, match="arr_0 must be uint8 images"):
    reference.load(tmp_path / "float_images.npz", ("pr",))
  with pytest.raises(TesseraxError, match="does not exist"):
    reference.load(tmp_path / "missing.npz")
  with pytest.raises(TesseraxError, match="sigma_s has shape"):
    reference.save(tmp_path / "bad.npz", {"mu_s": full["mu_s"], "sigma_s": full["sigma"]})
