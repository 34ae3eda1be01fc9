"""Generation metrics (FID, sFID, Inception Score, precision/recall, FD-DINOv2) and
reconstruction metrics (rFID, PSNR, SSIM, LPIPS), as the standard evaluators define them.

Conventions:
- Images are NHWC RGB, uint8 or float in [-1, 1] (DESIGN.md). FID-family features, PSNR and
  SSIM see uint8: floats are quantised first with data/preprocess.py:to_uint8, as sample files
  are written, so an array and its .npz agree. LPIPS sees floats ([-1, 1]; uint8 is mapped
  there), unquantised, as in LightningDiT's evaluate_tokenizer.py.
- FID/sFID: Frechet distance (eval/frechet.py) of pool_3 (2048) and of the sFID features
  (Mixed_6d.branch1x1[..., :7], 2023) against the reference `mu`/`sigma`, `mu_s`/`sigma_s`
  (ADM evaluator.py). FD-DINOv2: the same on the DINOv2 ViT-L/14 CLS embedding (Stein et al.
  2023, layer6ai-labs/dgm-eval).
- Inception Score: softmax(pool_3 @ W) without the fc bias, 10 splits in sample order as in
  openai/improved-gan (which the ADM evaluator cites; identical to its 5000-sample chunks at
  50k), exp(mean KL(p(y|x) || p(y))) per split, mean over splits only (ADM evaluator.py).
- Precision/recall (Kynkaanniemi et al. 2019, ADM's ManifoldEstimator): squared Euclidean
  pool_3 distances; a point's radius is the distance to its 3rd nearest neighbour in its own
  set (self excluded); precision is the fraction of samples within some reference radius,
  recall the fraction of reference images within some sample radius. ADM computes the
  distances in fp16 (fp32 if that overflows); here they are fp32 at HIGHEST precision.
- PSNR per image on uint8, 10 log10(255^2 / MSE) over all pixels and channels, averaged over
  images (inf for identical images). SSIM per image (Wang et al. 2004): 11x11 Gaussian
  window, sigma 1.5, K1 0.01, K2 0.03, data range 255, 'valid' borders (no padding, as
  the reference MATLAB code's filter2 'valid' and tf.image.ssim), mean over the map and
  channels, averaged over images. LPIPS (Zhang et al. 2018): v0.1 with VGG16, averaged over
  images.
- rFID: FID between the originals and the reconstructions, both through the same pipeline.

Features come from fixed-size jitted batches (the last one padded, padding dropped), sharded
over `mesh` when one is given, and every statistic accumulates in float64 (eval/stats.py), so
results do not depend on batch size or device count. With several processes each process
passes its own share of the images (and, with a mesh, the same number of batches); statistics
combine exactly across processes.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import scipy.special
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from tesserax.backbones import dinov2 as dinov2_lib
from tesserax.backbones import inception as inception_lib
from tesserax.backbones import weights
from tesserax.core.errors import TesseraxError
from tesserax.core.sharding import map_batched
from tesserax.data.preprocess import to_model_range, to_uint8
from tesserax.eval.frechet import frechet_distance
from tesserax.eval.stats import FeatureStats, all_processes

GENERATION_METRICS = ("fid", "sfid", "is", "pr", "fd_dinov2")
RECONSTRUCTION_METRICS = ("rfid", "psnr", "ssim", "lpips")
# The reference arrays each generation metric needs (eval/reference.py).
REFERENCE_KEYS = {"fid": ("mu", "sigma"), "sfid": ("mu_s", "sigma_s"), "is": (),
                  "pr": ("arr_0",), "fd_dinov2": ("mu_dinov2", "sigma_dinov2")}
IS_SPLITS = 10
PR_NEIGHBOURS = 3
PR_BLOCK = 1000  # rows of the distance matrix computed at a time
SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03
HIGHEST = jax.lax.Precision.HIGHEST

# ------------------------------------------------------------------------------ input checks


def _check_shape(x, name):
  if x.ndim != 4 or x.shape[-1] != 3:
    raise TesseraxError(f"{name}: images must be NHWC RGB [N, H, W, 3], got shape {x.shape}")


def _check_float(x, name):
  if not np.issubdtype(x.dtype, np.floating):
    raise TesseraxError(f"{name}: images must be uint8 or float in [-1, 1], got {x.dtype}")
  if not np.all(np.isfinite(x)):
    raise TesseraxError(f"{name}: images contain NaN or Inf")
  lo, hi = float(x.min()), float(x.max())
  if lo < -1 or hi > 1:
    hint = "; they look like [0, 255] values: pass them as uint8" if lo >= 0 and hi > 1 else ""
    raise TesseraxError(
        f"{name}: float images must lie in [-1, 1], got values in [{lo:g}, {hi:g}]{hint}")
  if lo >= 0:
    raise TesseraxError(
        f"{name}: float images have no negative value, so they look like [0, 1] data; the "
        "convention is [-1, 1] (use 2x - 1)")


def _check_uint8(x, name):
  if x.max() <= 1:
    raise TesseraxError(
        f"{name}: uint8 images hold only 0 and 1, so they look like [0, 1] floats cast to "
        "uint8; pass uint8 in [0, 255] or floats in [-1, 1]")


def as_uint8(images, name="images") -> np.ndarray:
  """Checked uint8 [N, H, W, 3]; float [-1, 1] images are quantised with to_uint8."""
  x = np.asarray(images)
  _check_shape(x, name)
  if not x.size:
    return x.astype(np.uint8)
  if x.dtype == np.uint8:
    _check_uint8(x, name)
    return x
  _check_float(x, name)
  return to_uint8(x)


def as_float(images, name="images") -> np.ndarray:
  """Checked float32 [N, H, W, 3] in [-1, 1]; uint8 images are mapped with to_model_range."""
  x = np.asarray(images)
  _check_shape(x, name)
  if not x.size:
    return x.astype(np.float32)
  if x.dtype == np.uint8:
    _check_uint8(x, name)
    return to_model_range(x)
  _check_float(x, name)
  return x.astype(np.float32)


def check_metrics(metrics, known):
  """metrics as a tuple, each one of `known`."""
  metrics = tuple(metrics)
  unknown = [m for m in metrics if m not in known]
  if unknown or not metrics:
    raise TesseraxError(f"unknown metrics {unknown}; choose from {', '.join(known)}")
  return metrics


# ------------------------------------------------------------------------- batched features


def _constrain(out, sharding):
  return out if sharding is None else jax.lax.with_sharding_constraint(out, sharding)


def _inception(model, images, mode="adm", sharding=None):
  return _constrain(model(inception_lib.preprocess(images, mode)), sharding)


# XLA:CPU compiles the Inception's convolutions without its YNNPACK fusions: 1.9x faster on 2
# cores (a batch of 16 at 256 -> 299: 2.13 s with them, 1.12 s without), where they make other
# networks faster (LightningDiT's forward 20%), so only here. Other backends get no options.
INCEPTION_CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}
_INCEPTION = {"cpu": jax.jit(_inception, static_argnames=("mode", "sharding"),
                             compiler_options=INCEPTION_CPU_OPTIONS),
              None: jax.jit(_inception, static_argnames=("mode", "sharding"))}


def inception_outputs(model, images, mode="adm", sharding=None):
  """uint8 [B, H, W, 3] -> {"pool", "spatial", "logits"} (jitted)."""
  backend = "cpu" if jax.default_backend() == "cpu" else None
  return _INCEPTION[backend](model, images, mode=mode, sharding=sharding)


@functools.partial(jax.jit, static_argnames=("sharding",))
def dinov2_outputs(model, images, sharding=None):
  """uint8 [B, H, W, 3] -> {"dinov2": CLS embeddings}."""
  return _constrain({"dinov2": model(dinov2_lib.preprocess(images))}, sharding)


@functools.partial(jax.jit, static_argnames=("sharding",))
def lpips_outputs(model, a, b, sharding=None):
  """float [-1, 1] pairs -> {"lpips": per-image distances}."""
  return _constrain({"lpips": model(a, b)}, sharding)


@functools.partial(jax.jit, static_argnames=("sharding",))
def ssim_outputs(_, a, b, sharding=None):
  """uint8 pairs -> {"ssim": per-image SSIM}."""
  return _constrain({"ssim": ssim(a, b)}, sharding)


def batched(fn, model, *, batch_size, mesh=None, **static):
  """run(*arrays) = fn(model, *arrays, sharding=..., **static) over fixed batches.

  run takes host arrays of up to batch_size rows (this process's share) and returns a dict
  of host arrays of the same number of rows; a short batch is padded and the padding
  dropped, so one compiled function serves every batch. With a mesh, the batch is sharded
  over all of its axes and the model replicated.
  """
  sharding = None
  if mesh is not None:
    local = len(mesh.local_devices)
    if batch_size % local:
      raise TesseraxError(
          f"batch_size {batch_size} must be a multiple of the {local} local mesh devices")
    sharding = NamedSharding(mesh, P(mesh.axis_names))
    model = jax.device_put(model, NamedSharding(mesh, P()))

  def run(*arrays):
    n = len(arrays[0])
    padded = [np.concatenate([x, np.zeros((batch_size - n,) + x.shape[1:], x.dtype)])
              for x in arrays]
    if sharding is not None:
      padded = [jax.make_array_from_process_local_data(sharding, x) for x in padded]
    out = fn(model, *padded, sharding=sharding, **static)
    return {k: _local_rows(v)[:n] for k, v in out.items()}

  return run


def _local_rows(x):
  """This process's rows of a batch-sharded output, in the order they were fed."""
  if x.is_fully_addressable:
    return np.asarray(x)
  shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
  return np.concatenate([np.asarray(s.data) for s in shards])


def _chunks(images, batch_size, num_samples, name):
  """Batches of at most batch_size rows from an array or an iterable of arrays, stopping
  after num_samples rows (None: all); fewer than num_samples rows is an error."""
  if isinstance(images, (np.ndarray, jax.Array)):
    if num_samples is not None and len(images) < num_samples:
      raise TesseraxError(
          f"{name}: got {len(images)} images, fewer than the {num_samples} asked for")
    images = [images]
  seen = 0
  for batch in images:
    for start in range(0, len(batch), batch_size):
      if num_samples is not None and seen >= num_samples:
        return
      chunk = batch[start:start + batch_size]
      if num_samples is not None:
        chunk = chunk[:num_samples - seen]
      seen += len(chunk)
      yield chunk
  if num_samples is not None and seen < num_samples:
    raise TesseraxError(f"{name}: got {seen} images, fewer than the {num_samples} asked for")


def _process_share(total):
  """This process's share of `total` items split over the processes (None: no limit)."""
  if total is None:
    return None
  count, index = jax.process_count(), jax.process_index()
  return total // count + (index < total % count)


def _fitted_batch(batch_size, images, mesh):
  """batch_size, or the size of an in-memory array smaller than it (padding 10 images to a
  batch of 100 costs 10x). Streams and meshes keep batch_size: every process must run the
  same shapes."""
  if mesh is None and isinstance(images, (np.ndarray, jax.Array)) and 0 < len(images):
    return min(batch_size, len(images))
  return batch_size


def accumulate(images, *, inception=None, dinov2=None, mode="adm", num_samples=None,
               batch_size=100, mesh=None, keep_rows=False, keep_images=0, name="samples"):
  """Runs images through the given backbones and accumulates their statistics.

  images: [N, H, W, 3] uint8 or float [-1, 1], or an iterable of such batches (this
  process's share). num_samples: use exactly this many images over all processes (None:
  all). Returns {"count", and for Inception "pool", "spatial" (FeatureStats over all
  processes), with keep_rows also "pool_rows", "logits" (float32 rows of all processes, in
  process order); for DINOv2 "dinov2"; with keep_images > 0 "images": the first keep_images
  uint8 images of this process}.
  """
  batch_size = _fitted_batch(batch_size, images, mesh)
  runners = []
  if inception is not None:
    runners.append(batched(inception_outputs, inception, batch_size=batch_size, mesh=mesh,
                           mode=mode))
  if dinov2 is not None:
    runners.append(batched(dinov2_outputs, dinov2, batch_size=batch_size, mesh=mesh))
  stats = {k: FeatureStats() for k in ("pool", "spatial", "dinov2")}
  rows, kept, count = {"pool": [], "logits": []}, [], 0
  for chunk in _chunks(images, batch_size, _process_share(num_samples), name):
    chunk = as_uint8(chunk, name)
    count += len(chunk)
    if len(kept) < keep_images:
      kept.extend(chunk[:keep_images - len(kept)])
    for run in runners:
      for key, value in run(chunk).items():
        if key in stats:
          stats[key].update(value)
        if keep_rows and key in rows:
          rows[key].append(value)
  out = {"count": int(np.sum(_gather(np.array([count]))))}
  if out["count"] == 0:
    raise TesseraxError(f"{name}: no images")
  for key, used in (("pool", inception), ("spatial", inception), ("dinov2", dinov2)):
    if used is not None:
      out[key] = all_processes(stats[key])
  if keep_rows:
    for key, dim in (("pool", inception_lib.POOL_DIM), ("logits", inception_lib.NUM_CLASSES)):
      local = np.concatenate(rows[key]) if rows[key] else np.zeros((0, dim), np.float32)
      out["pool_rows" if key == "pool" else key] = _gather(local)
  if keep_images:
    out["images"] = np.stack(kept) if kept else np.zeros((0, 1, 1, 3), np.uint8)
  return out


def _gather(x):
  """Concatenation over processes (in process order) of each process's rows [n, ...],
  bit-exact: rows travel as bytes, process_allgather's device arrays being 32-bit."""
  if jax.process_count() == 1:
    return x
  x = np.ascontiguousarray(x)
  counts = np.asarray(multihost_utils.process_allgather(np.array([len(x)], np.int32))).ravel()
  rows = np.zeros((counts.max(), x[:1].nbytes), np.uint8)
  rows[:len(x)] = x.view(np.uint8).reshape(len(x), -1)
  gathered = np.asarray(multihost_utils.process_allgather(rows))
  return np.concatenate([g[:c] for g, c in zip(gathered, counts)]).view(x.dtype).reshape(
      -1, *x.shape[1:])


# -------------------------------------------------------------------------- metric formulas


def inception_score(logits, splits=IS_SPLITS) -> float:
  """Mean over `splits` consecutive splits of exp(E_x KL(p(y|x) || p(y))), p = softmax(logits)
  in float64 (openai/improved-gan inception_score/model.py)."""
  logits = np.asarray(logits, np.float64)
  n = len(logits)
  if n < splits:
    raise TesseraxError(f"Inception Score needs at least {splits} samples, got {n}")
  log_p = scipy.special.log_softmax(logits, axis=1)
  scores = []
  for i in range(splits):
    part = log_p[i * n // splits:(i + 1) * n // splits]
    log_py = np.log(np.mean(np.exp(part), axis=0))
    kl = np.sum(np.exp(part) * (part - log_py), axis=1)
    scores.append(np.exp(np.mean(kl)))
  return float(np.mean(scores))


@jax.jit
def _sq_distances(u, v):
  """max(|u|^2 - 2 u.v + |v|^2, 0), ADM's _batch_pairwise_distances."""
  uu = jnp.sum(u * u, axis=1)[:, None]
  vv = jnp.sum(v * v, axis=1)[None, :]
  return jnp.maximum(uu - 2 * jnp.dot(u, v.T, precision=HIGHEST) + vv, 0.0)


@functools.partial(jax.jit, static_argnums=2)
def _kth_distance(rows, points, k):
  """Squared distance of each row to its k-th nearest point, the row itself (distance 0)
  counting as the 0-th, like ADM's np.partition(...)[:, k]."""
  return -jax.lax.top_k(-_sq_distances(rows, points), k + 1)[0][:, k]


@jax.jit
def _within(rows, points, radii):
  return jnp.any(_sq_distances(rows, points) <= radii[None, :], axis=1)


def _row_blocks(fn, rows, *args):
  """fn over fixed blocks of PR_BLOCK rows (the last padded), concatenated."""
  return map_batched(lambda block: fn(block, *args), (rows,), PR_BLOCK, None)


def precision_recall(ref_features, sample_features, k=PR_NEIGHBOURS):
  """(precision, recall) of sample features against reference features (ADM conventions)."""
  ref = np.asarray(ref_features, np.float32)
  samples = np.asarray(sample_features, np.float32)
  for name, x in (("reference", ref), ("samples", samples)):
    if x.ndim != 2 or len(x) <= k:
      raise TesseraxError(
          f"precision/recall needs more than {k} {name} features [N, D], got {x.shape}")
  ref_radii = _row_blocks(functools.partial(_kth_distance, k=k), ref, ref)
  sample_radii = _row_blocks(functools.partial(_kth_distance, k=k), samples, samples)
  precision = _row_blocks(_within, samples, ref, ref_radii).mean()
  recall = _row_blocks(_within, ref, samples, sample_radii).mean()
  return float(precision), float(recall)


def _gaussian_window():
  """The normalised 1-D factor of MATLAB's fspecial('gaussian', 11, 1.5)."""
  x = np.arange(SSIM_WINDOW) - SSIM_WINDOW // 2
  g = np.exp(-x ** 2 / (2 * SSIM_SIGMA ** 2))
  return g / g.sum()


def ssim(a, b):
  """Per-image SSIM [N] of uint8 images a, b [N, H, W, C] (jit-able, float32).

  Data are scaled to [0, 1] and each image channel centred on its mean before filtering:
  variances and covariances do not change and the local means are shifted back, which keeps
  E[x^2] - E[x]^2 accurate in float32.
  """
  n, h, w, c = a.shape
  if min(h, w) < SSIM_WINDOW:
    raise TesseraxError(
        f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {h}x{w}")
  x, y = a.astype(jnp.float32) / 255.0, b.astype(jnp.float32) / 255.0
  cx, cy = x.mean(axis=(1, 2), keepdims=True), y.mean(axis=(1, 2), keepdims=True)
  x, y = x - cx, y - cy
  maps = jnp.stack([x, y, x * x, y * y, x * y], axis=-1).reshape(n, h, w, c * 5)
  g = jnp.asarray(_gaussian_window(), jnp.float32)
  filt = functools.partial(jax.lax.conv_general_dilated, window_strides=(1, 1),
                           padding="VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                           feature_group_count=c * 5, precision=HIGHEST)
  maps = filt(maps, jnp.tile(g.reshape(-1, 1, 1, 1), (1, 1, 1, c * 5)))
  maps = filt(maps, jnp.tile(g.reshape(1, -1, 1, 1), (1, 1, 1, c * 5)))
  mx, my, xx, yy, xy = jnp.moveaxis(maps.reshape(*maps.shape[:3], c, 5), -1, 0)
  var_x, var_y, cov = xx - mx * mx, yy - my * my, xy - mx * my
  mx, my = mx + cx, my + cy
  c1, c2 = SSIM_K1 ** 2, SSIM_K2 ** 2
  value = ((2 * mx * my + c1) * (2 * cov + c2)) / (
      (mx * mx + my * my + c1) * (var_x + var_y + c2))
  return value.mean(axis=(1, 2, 3))


def psnr(a, b) -> np.ndarray:
  """Per-image PSNR [N] of uint8 images in dB: 10 log10(255^2 / MSE), float64."""
  mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2, axis=(1, 2, 3))
  with np.errstate(divide="ignore"):
    return 10 * np.log10(255.0 ** 2 / mse)


# ------------------------------------------------------------------------------ entry points


def generation_metrics(samples, ref, metrics=("fid", "sfid", "is", "pr"), *, inception=None,
                       dinov2=None, mode="adm", num_samples=None, batch_size=100,
                       mesh=None) -> dict:
  """Metrics of generated samples against a reference (eval/reference.py:load).

  samples: uint8 or float [-1, 1] images [N, H, W, 3], or an iterable of batches (this
  process's share). inception / dinov2: the backbones (default: weights.load). Returns
  {"fid", "sfid", "is", "precision", "recall", "fd_dinov2"} for the metrics asked, plus
  "num_samples".
  """
  metrics = check_metrics(metrics, GENERATION_METRICS)
  for metric in metrics:
    for key in REFERENCE_KEYS[metric]:
      if key not in ref:
        raise TesseraxError(f"metric {metric!r} needs {key!r} in the reference")
  if not set(metrics) - {"fd_dinov2"}:
    inception = None
  elif inception is None:
    inception = weights.load("inception")
  if "fd_dinov2" not in metrics:
    dinov2 = None
  elif dinov2 is None:
    dinov2 = weights.load("dinov2_vitl14")
  kwargs = dict(mode=mode, batch_size=batch_size, mesh=mesh)
  acc = accumulate(samples, inception=inception, dinov2=dinov2, num_samples=num_samples,
                   keep_rows=bool({"is", "pr"} & set(metrics)), **kwargs)
  out = {"num_samples": acc["count"]}
  if "fid" in metrics:
    out["fid"] = frechet_distance(acc["pool"].mean, acc["pool"].cov, ref["mu"], ref["sigma"])
  if "sfid" in metrics:
    out["sfid"] = frechet_distance(acc["spatial"].mean, acc["spatial"].cov, ref["mu_s"],
                                   ref["sigma_s"])
  if "is" in metrics:
    out["is"] = inception_score(acc["logits"])
  if "pr" in metrics:
    ref_images = ref["arr_0"]
    share = -(-len(ref_images) // jax.process_count())
    mine = ref_images[jax.process_index() * share:(jax.process_index() + 1) * share]
    ref_acc = accumulate([mine], inception=inception, keep_rows=True, name="reference arr_0",
                         **kwargs)
    out["precision"], out["recall"] = precision_recall(ref_acc["pool_rows"], acc["pool_rows"])
  if "fd_dinov2" in metrics:
    out["fd_dinov2"] = frechet_distance(acc["dinov2"].mean, acc["dinov2"].cov,
                                        ref["mu_dinov2"], ref["sigma_dinov2"])
  return out


def _pairs(originals, reconstructions, batch_size):
  """Aligned (original, reconstruction) batches of at most batch_size rows."""
  if isinstance(originals, (np.ndarray, jax.Array)):
    originals, reconstructions = [originals], [reconstructions]
  for orig, recon in zip(originals, reconstructions, strict=True):
    if np.shape(orig) != np.shape(recon):
      raise TesseraxError(f"originals {np.shape(orig)} and reconstructions "
                          f"{np.shape(recon)} differ in shape")
    for start in range(0, len(orig), batch_size):
      yield orig[start:start + batch_size], recon[start:start + batch_size]


def reconstruction_metrics(originals, reconstructions, metrics=RECONSTRUCTION_METRICS, *,
                           inception=None, lpips=None, mode="adm", num_samples=None,
                           batch_size=50, mesh=None) -> dict:
  """Tokenizer metrics of reconstructions against their originals.

  originals, reconstructions: aligned uint8 or float [-1, 1] images [N, H, W, 3], or aligned
  iterables of such batches (this process's share). num_samples: use exactly this many
  pairs over all processes (None: all). Returns {"rfid", "psnr", "ssim", "lpips"} for the
  metrics asked, plus "num_samples".
  """
  metrics = check_metrics(metrics, RECONSTRUCTION_METRICS)
  batch_size = _fitted_batch(batch_size, originals, mesh)
  kwargs = dict(batch_size=batch_size, mesh=mesh)
  if "rfid" in metrics:
    inception = inception if inception is not None else weights.load("inception")
    run_inception = batched(inception_outputs, inception, mode=mode, **kwargs)
  if "lpips" in metrics:
    lpips = lpips if lpips is not None else weights.load("lpips_vgg")
    run_lpips = batched(lpips_outputs, lpips, **kwargs)
  run_ssim = batched(ssim_outputs, None, **kwargs)
  stats = {"real": FeatureStats(), "fake": FeatureStats()}
  values = {"psnr": [], "ssim": [], "lpips": []}  # per image, float64
  limit, seen = _process_share(num_samples), 0
  if isinstance(originals, (np.ndarray, jax.Array)) and limit is not None and len(
      originals) < limit:
    raise TesseraxError(
        f"reconstructions: got {len(originals)} image pairs, fewer than the {limit} asked for")
  for a, b in _pairs(originals, reconstructions, batch_size):
    if limit is not None:
      a, b = a[:limit - seen], b[:limit - seen]
      if not len(a):
        break
    seen += len(a)
    ua, ub = as_uint8(a, "originals"), as_uint8(b, "reconstructions")
    if "psnr" in metrics:
      values["psnr"].append(psnr(ua, ub))
    if "ssim" in metrics:
      values["ssim"].append(run_ssim(ua, ub)["ssim"].astype(np.float64))
    if "lpips" in metrics:
      fa, fb = as_float(a, "originals"), as_float(b, "reconstructions")
      values["lpips"].append(run_lpips(fa, fb)["lpips"].astype(np.float64))
    if "rfid" in metrics:
      stats["real"].update(run_inception(ua)["pool"])
      stats["fake"].update(run_inception(ub)["pool"])
  if limit is not None and seen < limit:
    raise TesseraxError(
        f"reconstructions: got {seen} image pairs, fewer than the {limit} asked for")
  out = {"num_samples": int(np.sum(_gather(np.array([seen]))))}
  if out["num_samples"] == 0:
    raise TesseraxError("reconstructions: no images")
  for key in metrics:
    if key == "rfid":
      real, fake = all_processes(stats["real"]), all_processes(stats["fake"])
      out["rfid"] = frechet_distance(real.mean, real.cov, fake.mean, fake.cov)
    else:
      out[key] = float(np.mean(_gather(np.concatenate(values[key]))))
  return out
