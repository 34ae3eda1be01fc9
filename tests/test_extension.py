"""A new family is new files: a toy network, objective, sampler and task registered from this
module alone train, checkpoint, resume (equal to an uninterrupted run), are scored by two
evaluators and sample through the unchanged trainer and command line; a sampler that needs
another prediction is refused."""
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from tesserax import cli
from tesserax.core import optim, registry, sharding, train_state
from tesserax.objectives.context import Context, Objective
from tesserax.sampling.sample import Sampler
from tesserax.training import loop, task as task_lib


class ToyNet(nnx.Module):
  """x0 = a per-class image plus a linear map of the noisy input."""

  def __init__(self, config, *, rngs):
    size = config.input_size ** 2 * config.in_channels
    self.mix = nnx.Linear(size + 1, size, rngs=rngs)
    self.classes = nnx.Embed(config.num_classes + 1, size, rngs=rngs)

  def __call__(self, x, t, labels, train=False, s=None):
    flat = jnp.concatenate([x.reshape(x.shape[0], -1), t[:, None]], axis=-1)
    return (self.mix(flat) + self.classes(labels)).reshape(x.shape)


def x0_loss(apply, params, batch, ctx):
  key_t, key_eps = jax.random.split(ctx.key)
  x0 = batch["image"]
  t = jax.random.uniform(key_t, x0.shape[:1])
  x_t = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * jax.random.normal(
      key_eps, x0.shape)
  loss = jnp.mean(jnp.square(apply(params, x_t, t, batch["label"]) - x0))
  return loss, {"loss": loss}


def predict_x0(apply, params, x, t, labels):
  return apply(params, x, t, labels)


def make_one_step(predict, settings, *, null_label, mesh):
  """x0 straight from pure noise at t = 1."""
  del settings, null_label, mesh
  return jax.jit(lambda params, noise, labels, key: predict(
      params, noise, jnp.ones(noise.shape[:1]), labels))


class ToyTask:
  """The Task interface (training/task.py) in a few lines: no EMA decay, plain AdamW."""

  def __init__(self, config, mesh):
    self.config, self.mesh = config, mesh
    build = lambda: registry.NETWORKS.get(config.model.name)(config.model, rngs=nnx.Rngs(0))
    self.graphdef, _ = nnx.split(nnx.eval_shape(build))
    self.objective = registry.OBJECTIVES.get(config.objective.name)(config)
    self.tx = optim.make_optimizer(config.optim, config.num_steps)
    init = lambda: train_state.new_state(nnx.to_pure_dict(nnx.state(build())), self.tx,
                                         config.seed)
    abstract = jax.eval_shape(init)
    shardings = jax.tree.map(lambda _: sharding.replicated(mesh), abstract)
    self.abstract_state = train_state.shard_abstract(abstract, shardings)
    self.init = jax.jit(init, out_shardings=shardings)
    self.train_step = jax.jit(self._train_step, donate_argnums=(0,))
    self.predict = {"generate": self.generate}

  def apply(self, params, x, t, labels, *, train=False, s=None):
    return nnx.merge(self.graphdef, params)(x, t, labels, train, s=s)

  def _train_step(self, state, batch):
    ctx = Context(step=state["step"], key=train_state.step_key(state),
                  num_classes=self.config.model.num_classes, ema=state["ema"])
    (loss, metrics), grads = jax.value_and_grad(
        lambda p: self.objective.loss(self.apply, p, batch, ctx), has_aux=True)(state["params"])
    updates, opt = self.tx.update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    return train_state.guarded_update(state, {"params": params, "ema": params, "opt": opt},
                                      jnp.isfinite(loss)), metrics

  def generate(self, params, labels, key, settings=None, batch_size=None):
    from tesserax.sampling import sample
    c = self.config
    predictions = {k: functools.partial(f, self.apply)
                   for k, f in self.objective.predictions.items()}
    run = sample.build(settings or c.sample, predictions, null_label=c.model.num_classes)
    noise = jax.random.normal(key, (len(labels), c.data.resolution, c.data.resolution, 1))
    return np.asarray(run(params, noise, jnp.asarray(labels), key))

  def sample_grid(self, params):
    labels = np.arange(self.config.model.num_classes, dtype=np.int32)
    return self.generate(params, labels, jax.random.PRNGKey(0)), 10, 1

  def export(self, state, workdir, log):
    pass


@pytest.fixture(scope="module", autouse=True)
def toy_family():
  registry.NETWORKS.register("toy_net", ToyNet)
  registry.OBJECTIVES.register("toy_x0", lambda config: Objective(x0_loss, {"x0": predict_x0}))
  registry.SAMPLERS.register("toy_one_step", Sampler("x0", make_one_step))
  registry.TASKS.register("toy", ToyTask)


def toy_config(tiny_config, num_steps):
  config = tiny_config
  config.task = "toy"
  config.model.name = "toy_net"
  config.objective = dict(name="toy_x0")
  config.sample.update(solver="toy_one_step", every_steps=2)
  config.num_steps = num_steps
  config.checkpoint.every_steps = 2
  config.evals.often = dict(type="digits", every_steps=1, num_samples=10, batch_size=10)
  config.evals.rarely = dict(type="digits", every_steps=2, num_samples=20, batch_size=10)
  return config


def test_a_registered_family_trains_resumes_and_samples(tiny_config, tmp_path, capsys):
  quiet = lambda *_: None
  straight = str(tmp_path / "straight")
  loop.train(toy_config(tiny_config.copy_and_resolve_references(), 3), straight, log=quiet)
  resumed, lines = str(tmp_path / "resumed"), []
  loop.train(toy_config(tiny_config.copy_and_resolve_references(), 2), resumed, log=quiet)
  task, state = loop.train(toy_config(tiny_config, 3), resumed, log=lines.append)
  assert any(line.startswith("resumed from") for line in lines)
  assert int(state["step"]) == 3 and (tmp_path / "resumed" / "samples" / "00000002.png").exists()
  with open(os.path.join(resumed, "metrics.jsonl")) as f:
    scored = {(row["step"], key.split("/")[1]) for row in map(json.loads, f) for key in row
              if key.startswith("eval/")}
  assert scored == {(1, "often"), (2, "often"), (3, "often"), (2, "rarely")}
  _, reference = task_lib.load_workdir(straight)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(reference)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  out = str(tmp_path / "samples.npz")
  assert cli.main(["sample", "--workdir", resumed, "--num", "5", "--sampler", "toy_one_step",
                   "--out", out]) == 0
  with np.load(out) as data:
    assert data["arr_0"].shape == (5, 16, 16, 1)
  capsys.readouterr()
  assert cli.main(["sample", "--workdir", resumed, "--num", "5", "--out", out]) == 2
  assert "euler needs velocity; this model gives x0" in capsys.readouterr().err
