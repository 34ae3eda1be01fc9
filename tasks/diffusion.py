"""The diffusion generator task: a network of config.model.name trained with the objective
config.objective.name, sampled by any registered sampler that consumes one of its predictions.

Covers DiT, SiT and LightningDiT over pixels or a latent cache with rectified flow or DDPM
(training/task.py has the interface). Its train state is core/train_state.py's; the network's
non-trainable buffers (pos_embed, RoPE tables) are recomputed from the config, never
checkpointed. A model trained on a latent cache (data.name "latents" with data.data_dir) has
its samples decoded by the cache's tokenizer; one without a cache (a converted checkpoint)
generates normalised latents.

A distillation or reflow recipe names a trained generator as its teacher
(`config.teacher.workdir`): the objective sees it in its context as `(velocity, params)`, the
teacher's EMA parameters and its velocity prediction, frozen. With `teacher.init_student`
the student starts from the teacher's parameters; student leaves the teacher lacks (a second
time input, an extra head) keep their fresh initialisation. A DDPM teacher (objective `ddpm`,
an epsilon network) converts exactly: with `objective.parameterisation` "epsilon" the task
presents the student network to its objective as a velocity network through
objectives/ddpm.py epsilon_as_velocity, so a CD, ECT, iCT, sCM or rectified-flow student starts
from the DDPM weights and predicts the teacher's denoiser at step 0.

`objective.perceptual` names the frozen network of a perceptual distance the objective reads
from its context (CD/CT's metric "perceptual", reflow's lpips_huber, SlimFlow's lpips): "lpips"
(VGG LPIPS, `tesserax weights fetch lpips_vgg`, on images upsampled bilinearly to 224 as CD's
jcm/losses.py and rfpp do; one channel repeated to three) or "digits_net" (LPIPS's head-free
form over the digits classifier's three convolutions, the offline stand-in). Its parameters
are an argument of the compiled step, not constants in it.

A run on a pair cache (data.name "pairs", data/pairs.py) gets batches {"noise", "image",
"label"}; a cache of another sample shape than the network's is refused in one line, and with a
teacher so is one the teacher did not make with the objective's pair solver
(`objective.online_solver`, `online_steps`, `online_cfg_scale`, the ODE reflow draws its pairs
from without a cache): `write_pairs` (`tesserax pairs`) records the teacher's workdir and
checkpoint step and the solver in the cache, and `pair_maker` is that record. Where another
model made the pairs (SlimFlow's distillation: pairs of the big teacher, flow guidance from the
stage-1 student), `teacher.pairs_workdir` names it and the cache is checked against its newest
checkpoint instead.
"""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tesserax.core import config as config_lib, optim, registry, sharding, train_state
from tesserax.core.errors import TesseraxError
from tesserax.data import pairs
from tesserax.objectives import ddpm
from tesserax.objectives.context import Context
from tesserax.sampling import sample as sample_lib

REFINER = "velocity_refiner"  # the prediction kind of objectives/flowturbo.py
PARAMETERISATIONS = ("velocity", "epsilon")  # what the network outputs natively
PERCEPTUAL_NETS = ("lpips", "digits_net")
LPIPS_SIZE = 224


def build_network(model_config, seed: int = 0):
  return registry.NETWORKS.get(model_config.name)(model_config, rngs=nnx.Rngs(seed))


@functools.lru_cache(maxsize=2)
def _cache_decoder(cache_dir):
  from tesserax.tokenizers import cache_encoder
  return cache_encoder.load_decoder(cache_dir)


@registry.TASKS.register("diffusion")
class DiffusionTask:
  """Everything derived from (config, mesh) once: graph, shardings, optimizer, jitted fns."""

  def __init__(self, config, mesh):
    self.config, self.mesh = config, mesh
    self.model_config = _for_mesh(config.model, mesh)
    abstract_model = nnx.eval_shape(lambda: build_network(self.model_config, config.seed))
    self.graphdef, abstract_params, _ = nnx.split(abstract_model, nnx.Param, ...)
    self.tx = optim.make_optimizer(config.optim, config.num_steps)
    self.objective = registry.OBJECTIVES.get(config.objective.name)(config)
    self.epsilon_network = _parameterisation(config) == "epsilon"
    names = sharding.logical_names(abstract_params)
    param_sh = sharding.param_shardings(nnx.to_pure_dict(abstract_params), names, mesh)
    self.teacher, teacher_sh = _load_teacher(config)
    self.perceptual = _perceptual_network(config)
    abstract_state = jax.eval_shape(self._init)
    self.state_shardings = train_state.state_shardings(abstract_state, param_sh, self.tx, mesh)
    self.abstract_state = train_state.shard_abstract(abstract_state, self.state_shardings)
    rep = sharding.replicated(mesh)
    self.buffers = jax.device_put(nnx.to_pure_dict(nnx.state(
        build_network(self.model_config, config.seed), nnx.Not(nnx.Param))), rep)
    self.init = jax.jit(self._init, out_shardings=self.state_shardings)
    image_shape = (config.data.resolution, config.data.resolution, config.model.in_channels)
    batch_sh = {"image": sharding.batch_sharding(mesh, 1 + len(image_shape)),
                "label": sharding.batch_sharding(mesh, 1)}
    if config.data.name == "pairs":
      batch_sh["noise"] = batch_sh["image"]
    step = jax.jit(self._train_step,
                   in_shardings=(self.state_shardings, batch_sh, teacher_sh, rep),
                   out_shardings=(self.state_shardings, rep), donate_argnums=(0,))
    teacher_params = self.teacher[1] if self.teacher else None
    perceptual_params = (jax.device_put(self.perceptual[1], rep) if self.perceptual
                         else None)
    self.train_step = lambda state, batch: step(state, batch, teacher_params, perceptual_params)
    self.predict = {"generate": self.generate}

  def apply(self, params, x, t, labels, *, train=False, s=None, guidance=None):
    """The network at `params` (the `apply` objectives and samplers see); `guidance` the
    network's guidance conditions where it has them (iMF, `model.guidance_conditions`). The
    network runs under the task's mesh, whose tensor axis its activations' layout follows
    (core/sharding.py `constrain`)."""
    model = nnx.merge(self.graphdef, params, self.buffers)
    conditions = {} if guidance is None else {"guidance": guidance}

    def network(x, t):
      with jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh):
        return model(x, t, labels, train, s=s, **conditions)

    if not self.epsilon_network:
      return network(x, t)
    return ddpm.epsilon_as_velocity(network, x, t)

  def predictions(self):
    """{kind: predict(params, x, time, labels)} of the objective, for the samplers. A refiner
    of the teacher's velocity (FlowTurbo, kind "velocity_refiner") samples together with its
    teacher: its entry is the pair (teacher velocity, refiner)."""
    kinds = {kind: functools.partial(fn, self.apply)
             for kind, fn in self.objective.predictions.items()}
    if REFINER in kinds:
      if not self.teacher:
        raise TesseraxError("a velocity refiner samples with its teacher; set teacher.workdir")
      kinds[REFINER] = (self.teacher[0], kinds[REFINER])
    return kinds

  def _init(self):
    model = build_network(self.model_config, self.config.seed)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    if self.teacher and self.config.teacher.init_student:
      params = student_from_teacher(params, self.teacher[1])
    return train_state.new_state(params, self.tx, self.config.seed)

  def _train_step(self, state, batch, teacher_params, perceptual_params):
    c = self.config
    teacher = (self.teacher[0], teacher_params) if self.teacher else None
    perceptual = None
    if self.perceptual:
      graphdef, _, distance = self.perceptual
      perceptual = lambda a, b: distance(nnx.merge(graphdef, perceptual_params), a, b)
    ctx = Context(step=state["step"], key=train_state.step_key(state),
                  num_classes=c.model.num_classes, ema=state["ema"], teacher=teacher,
                  perceptual=perceptual)
    (loss, metrics), grads = jax.value_and_grad(
        lambda p: self.objective.loss(self.apply, p, batch, ctx), has_aux=True)(state["params"])
    new_state, step_metrics = train_state.optimizer_step(state, loss, grads, self.tx, c)
    return new_state, dict(metrics, **step_metrics)

  def generate(self, params, labels, key, settings=None, batch_size=None, decode=True):
    """Samples for `labels` (host int32) as host float32 NHWC; `settings` (default
    config.sample) choose the sampler (sampling/sample.py). Batches of `batch_size` (default
    all) are split over the mesh; batch i starts from normal noise of fold_in(key, i) and
    draws any sampler noise from fold_in(fold_in(key, i), 1). A velocity refiner's sampler
    gets (teacher params, params) and noise of the teacher's shape. A model trained on a latent
    cache returns images decoded by the cache's tokenizer unless `decode` is False; otherwise
    its normalised latents."""
    c = self.config
    settings = settings or c.sample
    sample = sample_lib.build(settings, self.predictions(), null_label=c.model.num_classes,
                              mesh=self.mesh)
    channels = c.model.in_channels
    if registry.SAMPLERS.get(settings.solver).consumes == REFINER:
      params, channels = (self.teacher[1], params), channels // 2  # the refiner takes [x | v]
    shape = (c.data.resolution, c.data.resolution, channels)

    def run(i, labels):
      noise = sharding.sharded_normal(jax.random.fold_in(key, i), labels.shape + shape,
                                      self.mesh)
      return sample(params, noise, labels, jax.random.fold_in(jax.random.fold_in(key, i), 1))

    samples = sharding.map_batched(run, (np.asarray(labels, np.int32),),
                                   batch_size or len(labels), self.mesh, fixed_shape=False,
                                   with_index=True)
    if decode and c.data.name == "latents" and c.data.data_dir:
      return _cache_decoder(os.path.abspath(c.data.data_dir))(samples)
    return samples

  def sample_grid(self, params):
    """EMA samples with the config's sample settings, one row per class."""
    c = self.config
    per_class = c.sample.num_per_class
    labels = np.repeat(np.arange(c.model.num_classes, dtype=np.int32), per_class)
    return self.generate(params, labels, jax.random.PRNGKey(c.seed)), per_class, 1

  def export(self, state, workdir, log=print):
    del state, workdir, log  # a generator's checkpoints are its export


def _for_mesh(model_config, mesh):
  """The model config to build on `mesh`: DiT-family blocks run unrolled where the mesh shards
  parameters (fsdp or tensor > 1), since the scanned blocks' stacked parameters lose their
  sharding (generators/dit.py run_blocks); `model.scan_blocks` chooses elsewhere. (Every DiT
  config carries the key, so this holds whatever it says.)"""
  if mesh.shape["fsdp"] == 1 and mesh.shape["tensor"] == 1:
    return model_config
  model_config = model_config.copy_and_resolve_references()
  model_config.scan_blocks = False
  return model_config


def _load_teacher(config):
  """((velocity, EMA params), their shardings) of `config.teacher.workdir`, or (None, None),
  once a pair cache the run trains on is checked against the teacher."""
  workdir = config.get("teacher", {}).get("workdir")
  if not workdir:
    _check_pairs(config)
    return None, None
  from tesserax.training import task as task_lib
  teacher_task, teacher_state = task_lib.load_workdir(workdir)
  predictions = teacher_task.predictions()
  if "velocity" not in predictions:
    raise TesseraxError(f"teacher {workdir} gives {', '.join(predictions)}; a teacher must give "
                        "a velocity")
  native = next(iter(predictions))
  if config.teacher.get("init_student") and native != _parameterisation(config):
    raise TesseraxError(f"teacher {workdir} predicts {native} natively; a student starting from "
                        f"its weights needs objective.parameterisation={native!r}")
  if teacher_task.config.model.num_classes != config.model.num_classes:
    raise TesseraxError(f"teacher {workdir} has {teacher_task.config.model.num_classes} classes; "
                        f"this model has {config.model.num_classes}")
  pairs_workdir = config.teacher.get("pairs_workdir")
  _check_pairs(config, (pairs_workdir, task_lib.newest_step(pairs_workdir)) if pairs_workdir
               else (workdir, teacher_state["step"]))
  teacher_sh = teacher_task.state_shardings["ema"]
  return (predictions["velocity"], teacher_state["ema"]), teacher_sh


def _lpips_distance(net, a, b):
  """VGG LPIPS of images upsampled bilinearly to 224 (one channel repeated to three)."""
  def prepare(x):
    x = jax.image.resize(x, (x.shape[0], LPIPS_SIZE, LPIPS_SIZE, x.shape[-1]), "bilinear")
    return jnp.broadcast_to(x, x.shape[:3] + (3,)) if x.shape[-1] == 1 else x
  return net(prepare(a), prepare(b))


def _digits_distance(net, a, b):
  gray = lambda x: x.mean(axis=-1, keepdims=True)
  return net.perceptual_distance(gray(a), gray(b))


def _perceptual_network(config):
  """(graphdef, params, distance(net, a, b)) of `objective.perceptual`, or None."""
  name = config.objective.get("perceptual")
  if not name:
    return None
  if name not in PERCEPTUAL_NETS:
    raise TesseraxError(f"objective.perceptual={name!r}; choose from {', '.join(PERCEPTUAL_NETS)}")
  if config.data.name == "latents":
    raise TesseraxError("objective.perceptual compares images; this model generates latents")
  if name == "lpips":
    from tesserax.backbones import weights
    net, distance = weights.load("lpips_vgg"), _lpips_distance
  else:
    from tesserax.backbones.digits_net import load_classifier
    net, distance = load_classifier(config.data.resolution), _digits_distance
  graphdef, params = nnx.split(net)
  return graphdef, params, distance


def _parameterisation(config) -> str:
  """config.objective.parameterisation (default "velocity"), refused in one line where it
  cannot hold: an epsilon network takes no second time input and is not trained by `ddpm`
  itself this way (that objective reads the epsilon directly)."""
  kind = config.objective.get("parameterisation", "velocity")
  if kind not in PARAMETERISATIONS:
    raise TesseraxError(f"objective.parameterisation={kind!r}; choose from "
                        f"{', '.join(PARAMETERISATIONS)}")
  if kind == "epsilon" and config.objective.name == "ddpm":
    raise TesseraxError("objective ddpm trains the epsilon network directly; drop "
                        "objective.parameterisation")
  if kind == "epsilon" and config.model.get("second_time"):
    raise TesseraxError("an epsilon (DDPM) network has no second time input; flow-map and CTM "
                        "students need a velocity network")
  return kind


def _check_pairs(config, teacher=None):
  """Refuses in one line a pair cache (data.name "pairs") of another sample shape than the
  network's, or, with a `teacher` (workdir, checkpoint step), one that the teacher did not
  make with the objective's pair solver."""
  if config.data.name != "pairs":
    return
  maker = None
  if teacher:
    o = config.objective
    if "online_solver" not in o:
      raise TesseraxError(f"objective {o.name} does not train on pairs from a teacher (it has "
                          "no objective.online_solver); use an image dataset")
    maker = pair_maker(*teacher, o.online_solver, o.online_steps, o.online_cfg_scale)
  shape = (config.data.resolution, config.data.resolution, config.model.in_channels)
  pairs.check(config.data.data_dir, maker, shape)


def pair_maker(workdir, step, solver, num_steps, cfg_scale) -> dict:
  """The `maker` of a pair cache (data/pairs.py): a trained generator's workdir (absolute) and
  checkpoint step, the flow solver, its steps and the guidance scale it sampled with."""
  return {"workdir": os.path.abspath(workdir), "step": int(step), "solver": solver,
          "num_steps": int(num_steps), "cfg_scale": float(cfg_scale)}


def write_pairs(workdir, out_dir, num_pairs: int, *, solver="heun", num_steps=16,
                cfg_scale=1.0, seed=0, batch_size=64, log=print) -> str:
  """Writes a pair cache (data/pairs.py `generate`: resumable, the same for any device count)
  of the trained generator in `workdir`: its newest checkpoint's EMA params sampled from the
  pairs' noise with the flow solver `solver` (a sampler over a velocity: euler, heun,
  dpm_solver_2m, unipc, ...) over `num_steps` plain time-grid steps, guided with `cfg_scale`.
  Returns the absolute out_dir."""
  from tesserax.training import task as task_lib
  if registry.SAMPLERS.get(solver).consumes != "velocity":
    raise TesseraxError(f"pairs are sampled with a flow solver over a velocity; {solver} "
                        f"consumes {registry.SAMPLERS.get(solver).consumes}")
  task, state = task_lib.load_workdir(workdir, log)
  c = task.config
  settings = c.sample.copy_and_resolve_references()
  settings.update(solver=solver, num_steps=num_steps, shift=1.0, cfg_scale=cfg_scale,
                  interval=(0.0, 1.0), guided_channels=None, final_correction=True)
  config_lib.validate_sample(settings)
  mesh = sharding.local_mesh()  # each process samples its own shards
  params = jax.device_put(jax.tree.map(sharding.global_to_host, state["ema"]),
                          sharding.replicated(mesh))
  sample = sample_lib.build(settings, task.predictions(), null_label=c.model.num_classes,
                            mesh=mesh)
  return pairs.generate(
      lambda noise, labels: sample(params, noise, labels, None), out_dir,
      maker=pair_maker(workdir, state["step"], solver, num_steps, cfg_scale),
      shape=(c.data.resolution, c.data.resolution, c.model.in_channels),
      num_classes=c.model.num_classes, num_pairs=num_pairs, seed=seed, batch_size=batch_size,
      mesh=mesh, log=log)


def student_from_teacher(student: dict, teacher: dict) -> dict:
  """`student` params with every leaf the teacher has replaced by the teacher's; a teacher leaf
  the student lacks, or of another shape, means another architecture and is refused."""
  flat_student = dict(jax.tree_util.tree_flatten_with_path(student)[0])
  mismatched = []
  for path, value in jax.tree_util.tree_flatten_with_path(teacher)[0]:
    if path not in flat_student:
      mismatched.append(f"{jax.tree_util.keystr(path)} (not in the student)")
    elif flat_student[path].shape != value.shape:
      mismatched.append(f"{jax.tree_util.keystr(path)} {value.shape} vs student "
                        f"{flat_student[path].shape}")
    else:
      flat_student[path] = value
  if mismatched:
    raise TesseraxError("the teacher has another architecture than the student: "
                        + "; ".join(mismatched[:5]) + (" ..." if len(mismatched) > 5 else ""))
  leaves = [flat_student[path] for path, _ in jax.tree_util.tree_flatten_with_path(student)[0]]
  return jax.tree.unflatten(jax.tree.structure(student), leaves)
