"""The trainer: one readable loop over a pure, jitted, sharded training step.

Sections, in order: model and objective from the config; the train state built from shapes
(`jax.eval_shape`) and initialised directly into its shardings; the step compiled with
`jax.jit` over the split NNX state with the state donated; resume (workdir checkpoint, then
--init_from, then scratch); the loop with metrics, progress line, sample grids, checkpoints,
the NaN/Inf guard and SIGTERM handling.

The train state is a plain pytree:
  {"step": int32, "params": pure dict, "ema": pure dict, "opt": optax state,
   "rng": uint32[2] root key, "nonfinite_step": int32 (-1 until a loss/grad is NaN/Inf)}.
The key of step s is fold_in(rng, s), so the randomness of a step does not depend on how the
run was split into processes, devices or restarts.
"""
import functools
import json
import os
import signal
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from tesserax.data import pipeline
from tesserax.errors import TesseraxError
from tesserax.generators import dit
from tesserax.generators.objectives import ddpm, rectified_flow
from tesserax.training import checkpoint, config as config_lib, evaluators, optim, sharding

MODELS = {"dit": dit.DiT}
OBJECTIVES = {"rectified_flow": rectified_flow, "ddpm": ddpm}


def build_model(model_config, seed: int = 0):
  if model_config.name not in MODELS:
    raise TesseraxError(f"unknown model {model_config.name!r}; known: {', '.join(MODELS)}")
  return MODELS[model_config.name](model_config, rngs=nnx.Rngs(seed))


def objective_module(config):
  if config.objective.name not in OBJECTIVES:
    raise TesseraxError(f"unknown objective {config.objective.name!r}; "
                        f"known: {', '.join(OBJECTIVES)}")
  return OBJECTIVES[config.objective.name]


def shard_abstract(abstract, shardings):
  """ShapeDtypeStructs of `abstract` carrying `shardings` (what orbax restores into)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      abstract, shardings)


def optimizer_shardings(tx, abstract_opt, param_sh, mesh):
  """Shardings of an optax state: each moment like its parameter, counters replicated."""
  rep = sharding.replicated(mesh)
  return optax.tree_utils.tree_map_params(
      tx, lambda _, s: s, abstract_opt, param_sh, transform_non_params=lambda _: rep,
      is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))


def guarded_update(state, new: dict, finite):
  """The next state: `new` entries applied and the step advanced, unless this step's loss or
  gradients are not finite or an earlier step's were (then the old entries stay); the first
  non-finite step is recorded in `nonfinite_step` (the NaN/Inf guard)."""
  healthy = finite & (state["nonfinite_step"] < 0)
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(healthy, a, b), new, old)
  return dict(state, **{k: keep(v, state[k]) for k, v in new.items()},
              step=state["step"] + 1,
              nonfinite_step=jnp.where((state["nonfinite_step"] < 0) & ~finite, state["step"],
                                       state["nonfinite_step"]))


def make_setup(config, mesh):
  """The Setup of a generator (`Setup`) or a tokenizer (tokenizers/training.py) recipe."""
  from tesserax.tokenizers import training as tokenizer_training
  if config.model.name in tokenizer_training.TOKENIZERS:
    return tokenizer_training.TokenizerSetup(config, mesh)
  return Setup(config, mesh)


class Setup:
  """Everything derived from (config, mesh) once: graph, shardings, optimizer, jitted fns."""

  def __init__(self, config, mesh):
    self.config, self.mesh = config, mesh
    abstract_model = nnx.eval_shape(lambda: build_model(config.model, config.seed))
    self.graphdef, abstract_params, abstract_buffers = nnx.split(abstract_model, nnx.Param, ...)
    self.names = sharding.logical_names(abstract_params)
    self.tx = optim.make_optimizer(config.optim, config.num_steps)
    self.objective = objective_module(config)
    param_sh = sharding.param_shardings(nnx.to_pure_dict(abstract_params), self.names, mesh)
    rep = sharding.replicated(mesh)
    abstract_state = jax.eval_shape(self._init)
    self.state_shardings = {"step": rep, "params": param_sh, "ema": param_sh,
                            "opt": optimizer_shardings(self.tx, abstract_state["opt"], param_sh,
                                                       mesh),
                            "rng": rep, "nonfinite_step": rep}
    self.abstract_state = shard_abstract(abstract_state, self.state_shardings)
    # Non-trainable buffers (pos_embed) are recomputed from the config, never checkpointed.
    self.buffers = jax.device_put(nnx.to_pure_dict(nnx.state(
        build_model(config.model, config.seed), nnx.Not(nnx.Param))), rep)
    self.init = jax.jit(self._init, out_shardings=self.state_shardings)
    image_shape = (config.data.resolution, config.data.resolution, config.model.in_channels)
    batch_sh = {"image": sharding.batch_sharding(mesh, 1 + len(image_shape)),
                "label": sharding.batch_sharding(mesh, 1)}
    self.train_step = jax.jit(
        self._train_step, in_shardings=(self.state_shardings, batch_sh),
        out_shardings=(self.state_shardings, rep), donate_argnums=(0,))

  def model(self, params):
    return nnx.merge(self.graphdef, params, self.buffers)

  def apply_velocity(self, params, x, t, labels):
    """apply_fn for the samplers: the velocity field of the network at `params`."""
    return self.objective.velocity(self.model(params), x, t, labels)

  def make_evaluator(self):
    return evaluators.make_evaluator(self.config, generate)

  def save_sample_grid(self, params, path):
    save_sample_grid(self, params, path)

  def _init(self):
    model = build_model(self.config.model, self.config.seed)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return {"step": jnp.zeros((), jnp.int32), "params": params,
            "ema": jax.tree.map(jnp.copy, params), "opt": self.tx.init(params),
            "rng": jax.random.PRNGKey(self.config.seed),
            "nonfinite_step": jnp.full((), -1, jnp.int32)}

  def _train_step(self, state, batch):
    c = self.config
    key = jax.random.fold_in(state["rng"], state["step"])

    def loss_fn(params):
      return self.objective.loss(self.model(params), batch, key, objective=c.objective,
                                 num_classes=c.model.num_classes,
                                 class_dropout=c.model.class_dropout)

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    grad_norm = optim.global_norm(grads)
    updates, opt = self.tx.update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    ema = optim.ema_update(state["ema"], params, c.ema_decay)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new_state = guarded_update(state, {"params": params, "ema": ema, "opt": opt}, finite)
    metrics = dict(metrics, grad_norm=grad_norm,
                   lr=optim.learning_rate_schedule(c.optim, c.num_steps)(state["step"]))
    return new_state, metrics


class MetricsLog:
  """metrics.jsonl plus clu writers (TensorBoard), from process 0 only."""

  def __init__(self, workdir: str, resume_step: int):
    self.active = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    if not self.active:
      return
    # A resumed run re-logs the steps after its checkpoint; drop their earlier lines.
    if os.path.exists(self.path):
      with open(self.path) as f:
        kept = [line for line in f if line.strip() and json.loads(line)["step"] <= resume_step]
      with open(self.path + ".tmp", "w") as f:
        f.writelines(kept)
      os.replace(self.path + ".tmp", self.path)
    import tensorflow as tf  # clu's TensorBoard writer; TF must not take the accelerators
    tf.config.set_visible_devices([], "GPU")
    from clu import metric_writers
    self.writer = metric_writers.create_default_writer(os.path.join(workdir, "tensorboard"),
                                                       asynchronous=True)

  def write(self, step: int, scalars: dict) -> None:
    if not self.active:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": step, **scalars}) + "\n")
    self.writer.write_scalars(step, scalars)

  def close(self):
    if self.active:
      self.writer.flush()
      self.writer.close()


class Progress:
  """The progress line: step, loss, steps/s, images/s and ETA."""

  def __init__(self, start_step: int, num_steps: int, batch_size: int):
    self.num_steps, self.batch_size = num_steps, batch_size
    self.last_step, self.last_time = start_step, None

  def line(self, step: int, scalars: dict) -> str:
    now = time.time()
    if self.last_time is None:  # the first interval includes compilation
      rate = float("nan")
    else:
      rate = (step - self.last_step) / max(now - self.last_time, 1e-9)
    self.last_step, self.last_time = step, now
    eta = (self.num_steps - step) / rate if rate == rate and rate > 0 else float("nan")
    eta_text = "--" if eta != eta else time.strftime("%H:%M:%S", time.gmtime(eta))
    return (f"step {step}/{self.num_steps} | loss {scalars['loss']:.4f} | "
            f"{rate:.2f} steps/s | {rate * self.batch_size:.0f} images/s | ETA {eta_text}")


class _Preemption:
  """SIGTERM sets a flag; the loop saves a checkpoint and exits cleanly."""

  def __init__(self):
    self.requested = False
    self.previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    self.requested = True

  def restore(self):
    signal.signal(signal.SIGTERM, self.previous)


def _check_finite(state):
  bad = int(jax.device_get(state["nonfinite_step"]))
  if bad >= 0:
    raise TesseraxError(f"non-finite loss or gradients at step {bad}; stopping. The last good "
                        "checkpoint is kept; lower the learning rate or enable optim.grad_clip")


def train(config, workdir: str, init_from: str | None = None, log=print):
  """Train `config` in `workdir`; resumes from the workdir's latest checkpoint. Returns
  (setup, state) at the end of training."""
  workdir = os.path.abspath(workdir)
  is_main = jax.process_index() == 0
  config_lib.check_or_write_workdir_config(config, workdir, write=False)
  mesh = sharding.make_mesh(config.mesh)
  setup = make_setup(config, mesh)
  loader = pipeline.make_train_loader(config.data, config.batch_size, config.seed)
  manager = checkpoint.make_manager(os.path.join(workdir, "checkpoints"), config.checkpoint)

  latest = manager.latest_step()
  if latest is not None:
    state, data_state = checkpoint.restore(manager, latest, setup.abstract_state)
    loader.set_state(data_state)
    log(f"resumed from {manager.directory}/{latest}")
  elif init_from:
    state = setup.init()
    loaded = checkpoint.restore_params(init_from, setup.abstract_state, config.checkpoint)
    state = dict(state, params=loaded["params"], ema=loaded["ema"])
    log(f"initialised params and EMA from {init_from}")
  else:
    state = setup.init()
  config_lib.check_or_write_workdir_config(config, workdir, write=is_main)
  start = int(jax.device_get(state["step"]))
  metrics_log = MetricsLog(workdir, start)
  progress = Progress(start, config.num_steps, config.batch_size)
  evaluate = setup.make_evaluator()
  preemption = _Preemption()
  try:
    step = start
    while step < config.num_steps:
      batch = sharding.global_batch(next(loader), mesh)
      state, metrics = setup.train_step(state, batch)
      step += 1
      preempted = preemption.requested or manager.reached_preemption(step)
      if step % config.log_every_steps == 0 or step == config.num_steps:
        _check_finite(state)
        scalars = jax.device_get(metrics)
        metrics_log.write(step, scalars)
        if is_main:
          log(progress.line(step, scalars))
      if evaluate and step % config.eval.every_steps == 0:
        scores = evaluate(setup, state["ema"])
        metrics_log.write(step, scores)
        if is_main:
          log(f"step {step} | " + " | ".join(f"{k} {v:.4f}" for k, v in scores.items()))
      if config.sample.every_steps and step % config.sample.every_steps == 0:
        setup.save_sample_grid(state["ema"], os.path.join(workdir, "samples", f"{step:08d}.png"))
      if step % config.checkpoint.every_steps == 0 or step == config.num_steps or preempted:
        _check_finite(state)
        checkpoint.save(manager, step, state, loader.get_state(), force=preempted)
      if preempted:
        manager.wait_until_finished()
        log(f"preempted at step {step}: checkpoint saved, exiting")
        break
  finally:
    preemption.restore()
    manager.wait_until_finished()
    manager.close()
    metrics_log.close()
  if hasattr(setup, "export") and int(jax.device_get(state["step"])) == config.num_steps:
    setup.export(state, workdir, log)  # a trained tokenizer becomes a tokenizer directory
  return setup, state


def save_sample_grid(setup, params, path: str):
  """A PNG grid of EMA samples, one row per class, with the config's sample settings."""
  from tesserax.eval import grid
  c = setup.config
  per_class = c.sample.num_per_class
  labels = np.repeat(np.arange(c.model.num_classes, dtype=np.int32), per_class)
  s = c.sample
  images = generate(setup, params, labels, jax.random.PRNGKey(c.seed), s.solver, s.num_steps,
                    s.shift, s.cfg_scale, tuple(s.interval), guided_channels=s.guided_channels)
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    grid.save_grid(path, images, nrow=per_class)


@functools.lru_cache(maxsize=2)
def _latent_decoder(cache_dir):
  from tesserax.data import latents
  return latents.load_decoder(cache_dir)


def generate(setup, params, labels, key, solver, num_steps, shift=1.0, cfg_scale=1.0,
             interval=(0.0, 1.0), final_correction=True, batch_size=None, guided_channels=None):
  """Samples for `labels` (host numpy int32) as a host float32 NHWC array in [-1, 1]; a model
  trained on a latent cache (data.data_dir set) has its samples decoded by the cache's
  tokenizer, one without a cache (a converted checkpoint) returns its normalised latents.

  solver: a flow solver (euler, heun; with shift, interval, final_correction) or, for a DDPM
  model (objective ddpm, e.g. a converted DiT), ddpm (ancestral) or ddim, with num_steps
  respaced steps of the 1000 (sampling/ddpm.py). guided_channels: None guides every channel,
  k only the first k (the official DiT/LightningDiT quirk)."""
  from tesserax.sampling import ddpm as ddpm_sampling
  from tesserax.sampling.sample import make_sampler
  c = setup.config
  if solver in ddpm_sampling.METHODS:
    if c.objective.name != "ddpm":
      raise TesseraxError(f"sampler {solver} needs a DDPM model (objective ddpm, e.g. a "
                          f"converted DiT); this one is {c.objective.name}: use euler or heun")
    predict = lambda params, x, steps, y: ddpm.predict(setup.model(params), x, steps, y)
    sampler = ddpm_sampling.make_ddpm_sampler(
        predict, method=solver, num_steps=num_steps, cfg_scale=cfg_scale,
        guided_channels=guided_channels, null_label=c.model.num_classes)
  else:
    flow_sampler = make_sampler(
        setup.apply_velocity, solver=solver, num_steps=num_steps, shift=shift,
        cfg_scale=cfg_scale, interval=interval, null_label=c.model.num_classes,
        final_correction=final_correction, mesh=setup.mesh, guided_channels=guided_channels)
    sampler = lambda params, noise, labels, key: flow_sampler(params, noise, labels)
  shape = (c.data.resolution, c.data.resolution, c.model.in_channels)
  batch_size = batch_size or len(labels)
  devices = setup.mesh.shape["data"] * setup.mesh.shape["fsdp"]
  out = []
  for i, start in enumerate(range(0, len(labels), batch_size)):
    chunk = labels[start:start + batch_size]
    padded = -(-len(chunk) // devices) * devices
    noise = sharding.sharded_normal(jax.random.fold_in(key, i), (padded,) + shape, setup.mesh)
    chunk = sharding.host_to_global(np.pad(chunk, (0, padded - len(chunk))), setup.mesh)
    ancestral_key = jax.random.fold_in(jax.random.fold_in(key, i), 1)  # DDPM's noise draws
    x0 = sharding.global_to_host(sampler(params, noise, chunk, ancestral_key))
    out.append(x0[:min(batch_size, len(labels) - start)])
  samples = np.concatenate(out)
  if c.data.name == "latents" and c.data.data_dir:
    return _latent_decoder(os.path.abspath(c.data.data_dir))(samples)
  return samples


def load_workdir(workdir: str):
  """(setup, state) of the latest checkpoint of a training workdir, on all devices."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise TesseraxError(f"not a training workdir (no config.json): {workdir}")
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  setup = make_setup(config, sharding.make_mesh(config.mesh))
  manager = checkpoint.make_manager(os.path.join(workdir, "checkpoints"), config.checkpoint,
                                    read_only=True)
  step = manager.latest_step()
  if step is None:
    raise TesseraxError(f"workdir has no checkpoint yet: {workdir}/checkpoints")
  state, _ = checkpoint.restore(manager, step, setup.abstract_state)
  manager.close()
  return setup, state
