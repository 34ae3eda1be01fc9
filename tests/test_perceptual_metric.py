"""The frozen perceptual distance objectives read from their context (`objective.perceptual`,
tasks/diffusion.py): CD/CT's metric "perceptual", reflow's lpips_huber, SlimFlow's lpips."""
import jax
import numpy as np
import pytest

from tesserax.backbones.digits_net import load_classifier
from tesserax.core import sharding, train_state
from tesserax.core.errors import TesseraxError
from tesserax.objectives import cd
from tesserax.objectives.context import Context
from tesserax.tasks import diffusion


def numpy_headless(taps_a, taps_b):
  """float64 LPIPS form without heads: unit-normalise over channels (eps 1e-10), squared
  difference summed over channels, mean over positions, sum over maps."""
  unit = lambda f: f / (np.sqrt(np.sum(f * f, -1, keepdims=True)) + 1e-10)
  return sum(np.mean(np.sum((unit(fa) - unit(fb)) ** 2, -1).reshape(len(fa), -1), 1)
             for fa, fb in zip(taps_a, taps_b))


def test_the_digits_stand_in_is_lpips_without_heads_over_its_three_convolutions():
  net = load_classifier(16)
  rng = np.random.default_rng(0)
  a = rng.uniform(-1, 1, (4, 16, 16, 1)).astype(np.float32)
  b = np.clip(a + 0.3 * rng.standard_normal(a.shape), -1, 1).astype(np.float32)
  taps = lambda x: [np.asarray(t, np.float64) for t in net.taps(x)]
  assert [t.shape[1:] for t in taps(a)] == [(16, 16, 16), (8, 8, 32), (4, 4, 64)]
  ours = np.asarray(net.perceptual_distance(a, b))
  np.testing.assert_allclose(ours, numpy_headless(taps(a), taps(b)), rtol=1e-5)
  assert np.all(ours > 0)
  np.testing.assert_array_equal(np.asarray(net.perceptual_distance(a, a)), 0.0)


def test_lpips_inputs_are_upsampled_bilinearly_to_224_as_torch_does():
  """F.interpolate(mode="bilinear", align_corners=False): half-pixel centres, edges clamped."""
  seen = []

  def stub(x0, x1):
    seen.append(np.asarray(x0, np.float64))
    return np.zeros(len(x0))

  image = np.random.default_rng(1).uniform(-1, 1, (2, 16, 16, 1)).astype(np.float32)
  diffusion._lpips_distance(stub, image, image)
  src = (np.arange(224) + 0.5) * 16 / 224 - 0.5
  lo = np.clip(np.floor(src).astype(int), 0, 15)
  hi = np.clip(lo + 1, 0, 15)
  w = np.clip(src - np.floor(src), 0, 1)
  w = np.where(src < 0, 0.0, w)  # left of the first centre: the edge pixel
  rows = image[:, lo] * (1 - w)[None, :, None, None] + image[:, hi] * w[None, :, None, None]
  expected = rows[:, :, lo] * (1 - w)[None, None, :, None] + rows[:, :, hi] * w[None, None, :, None]
  assert seen[0].shape == (2, 224, 224, 3)
  np.testing.assert_allclose(seen[0], np.repeat(expected, 3, -1), atol=1e-5)


def test_cd_with_the_perceptual_metric_reads_the_frozen_digits_network(tiny_config,
                                                                       tiny_teacher_workdir):
  config = tiny_config.copy_and_resolve_references()
  config.teacher = dict(workdir=tiny_teacher_workdir, init_student=False)
  config.objective = cd.defaults(metric="perceptual", perceptual="digits_net", target="ema")
  task = diffusion.DiffusionTask(config, sharding.local_mesh())
  # A target far from the fresh student: the teacher's parameters, copied (the step donates).
  state = dict(task.init(), ema=jax.tree.map(np.array, task.teacher[1]))
  rng = np.random.default_rng(2)
  batch = {"image": rng.uniform(-1, 1, (8, 16, 16, 1)).astype(np.float32),
           "label": np.arange(8, dtype=np.int32)}
  net = load_classifier(16)
  ctx = lambda perceptual: Context(step=state["step"], key=train_state.step_key(state),
                                   num_classes=10, ema=state["ema"], teacher=task.teacher,
                                   perceptual=perceptual)
  expected, _ = cd.make(config).loss(task.apply, state["params"], batch,
                                     ctx(net.perceptual_distance))
  l2_config = config.copy_and_resolve_references()
  l2_config.objective.metric = "l2"
  l2, _ = cd.make(l2_config).loss(task.apply, state["params"], batch, ctx(None))
  _, metrics = task.train_step(state, batch)
  np.testing.assert_allclose(float(metrics["loss"]), float(expected), rtol=1e-5)
  assert float(expected) > 0 and abs(float(expected) / float(l2) - 1) > 0.1


@pytest.mark.parametrize("objective, data, match", [
    (dict(metric="perceptual"), {}, "needs objective.perceptual"),
    (dict(metric="l2", perceptual="vgg"), {}, "choose from lpips, digits_net"),
    (dict(metric="perceptual", perceptual="digits_net"), dict(name="latents"),
     "compares images"),
])
def test_a_perceptual_metric_without_its_network_is_refused_in_one_line(
    tiny_config, tiny_teacher_workdir, objective, data, match):
  config = tiny_config.copy_and_resolve_references()
  config.teacher = dict(workdir=tiny_teacher_workdir, init_student=True)
  config.objective = cd.defaults(**objective)
  config.data.update(data)
  with pytest.raises(TesseraxError, match=match) as error:
    diffusion.DiffusionTask(config, sharding.local_mesh())
  assert "\n" not in str(error.value)
