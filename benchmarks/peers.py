"""tesserax beside the PyTorch code researchers run instead: the same work on the same weights,
timed in one run, printed as time ratios tesserax / peer (below 1: tesserax is faster).

  python -m tesserax.benchmarks.peers                          # CPU: DiT-S/2, 32x32x4 latents
  python -m tesserax.benchmarks.peers --size XL --batch 32 --vae_resolution 256   # accelerator
  python -m tesserax.benchmarks.peers --only fid --rounds 3     # FID peers only (~6 min, 2 cores)

Peers (`pip install 'tesserax[bench]'`): diffusers' DiTTransformer2DModel, AutoencoderKL and
DPMSolverMultistepScheduler, each given tesserax's weights through tesserax's converters:
- DiT: a random DiT-{size}/2 (adaLN-zero layers randomised too, so every path matters) written
  as the official state_dict (convert/dit_checkpoints.py) and mapped to diffusers' names
  (qkv split into to_q/to_k/to_v; the t and y embedders copied into every block, whose
  gradients are summed back). diffusers' DiT embeds time with `downscale_freq_shift=1`, the
  official DiT with 0; the peer is set to 0 so both compute the official function, and its
  LayerNorms use the official eps 1e-6.
  - forward: one batch, eval mode;
  - sampling: DPM-Solver++(2M) at 8 and 25 steps on the flow grid of diffusers'
    DPMSolverMultistepScheduler (use_flow_sigmas, flow_prediction), the DiT read as a velocity
    network of t = sigma (fed 1000 t), labels fixed, no guidance;
  - training step: rectified flow with logit-normal t and 10% label dropout, MSE on the first
    4 channels, backward, AdamW (torch.optim.AdamW, foreach) and EMA, as DiT train.py steps;
    tesserax's step is the diffusion task's (configs/digits_dit.py optimizer), which also
    computes the gradient norm and the NaN guard.
- SD-VAE (f8, 4 latent channels): a random diffusers AutoencoderKL saved as safetensors and
  read by convert/vae_checkpoints.py; posterior-mean encode and decode of one batch.

Before timing, each pair is checked on the same inputs (DiT forward to 1e-4 of the output's
scale in float32, DiT gradients to 1e-4 of the gradient norm, sampling and the VAE to 1e-3);
a pair that disagrees prints the difference and no ratio. The checks always run in float32 and
eager PyTorch; the timed calls then run each side in its fast mode: `--dtype bfloat16` gives
tesserax's DiT and SD-VAE bfloat16 compute (float32 parameters, `model.dtype`) and the peer
`torch.autocast(dtype=torch.bfloat16)`; `--torch_compile` times `torch.compile`d peer networks.
Where jax runs on a GPU and torch sees one, the peer runs on CUDA (timed with
torch.cuda.synchronize) and torch-fidelity and pytorch-fid on the GPU too; otherwise on the CPU.
Timing: a warm-up call each, then
`--rounds` rounds alternating the two sides (`--order blocks`: one side's rounds, then the
other's), medians. torch runs `--threads` threads
(torch.set_num_threads); XLA:CPU uses the machine's cores, so run with as many cores as
threads (taskset -c 0,1 on a larger machine).

FID (`--only fid`): pytorch-fid and torch-fidelity on one random FID Inception, written as the
official pt_inception-2015-12-05 state_dict (.pth) and read by each tool's own loader:
tesserax's weights.inception_params, pytorch-fid's InceptionV3([3]) with its URL loader
patched to return it, torch-fidelity's `feature_extractor_weights_path`. Each peer resizes
256 -> 299 its own way, and tesserax has the matching `inception.preprocess` mode:
pytorch-fid x / 255, F.interpolate bilinear (half-pixel centres), 2x - 1 ("pytorch_fid");
torch-fidelity TF1 ResizeBilinear (src = dst * in / out), (x - 128) / 128 ("adm").
- FID: two sets of --fid_num images written as PNG folders, each tool end to end on them
  (tesserax: reference.compute + eval.metrics.generation_metrics; pytorch-fid:
  calculate_fid_given_paths; torch-fidelity: calculate_metrics(fid=True)), to 1e-3;
- features: pool_3 of one --fid_batch batch to 1e-4, then timed (uint8 in, pool_3 out).
"""
import argparse
import contextlib
import functools
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
import types
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import tesserax.tasks  # noqa: F401  (registers the diffusion task)
from tesserax.backbones import inception, weights
from tesserax.convert import dit_checkpoints, vae_checkpoints
from tesserax.core import config as config_lib, host, sharding
from tesserax.eval import metrics, reference
from tesserax.generators import dit
from tesserax.sampling import multistep
from tesserax.tokenizers import kl_autoencoder
from tesserax.training import task as task_lib

INSTALL = "pip install 'tesserax[bench]'  (torch, diffusers, pytorch-fid, torch-fidelity)"
PEERS = {"dit": ("torch", "diffusers"), "vae": ("torch", "diffusers", "safetensors"),
         "fid": ("torch", "torchvision", "pytorch_fid", "torch_fidelity")}


def require_peers(sections):
  for name in sorted({m for s in sections for m in PEERS[s]}):
    if importlib.util.find_spec(name) is None:
      raise SystemExit(f"peers missing ({name}); install them with: {INSTALL}")


def timed(sides: dict, rounds: int, order: str) -> dict:
  """{side: median seconds} of each zero-argument callable over `rounds` calls after a warm-up
  call. order "interleaved": rounds call the sides in turn; "blocks": each side's warm-up and
  rounds back to back, one side after the other, so that no call directly follows the other
  side's (a PyTorch training step leaves memory behind that makes the kernel compact pages
  for XLA's next fresh buffers: DiT-S/2's step then spends up to 3.7 s in the kernel)."""
  times = {name: [] for name in sides}
  if order == "interleaved":
    for fn in sides.values():
      fn()
    schedule = [name for _ in range(rounds) for name in sides]
  else:
    schedule = [name for name in sides for _ in range(rounds + 1)]
  for i, name in enumerate(schedule):
    start = time.perf_counter()
    sides[name]()
    if order == "interleaved" or (i and schedule[i - 1] == name):  # blocks: first is warm-up
      times[name].append(time.perf_counter() - start)
  return {name: float(np.median(t)) for name, t in times.items()}


def compare(name, ours, theirs, tol):
  """The relative difference max|ours - theirs| / max|theirs|, and whether it is within tol."""
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  error = float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))
  return {"check": name, "relative_difference": error, "tolerance": tol, "agree": error <= tol}


def torch_device() -> str:
  """"cuda" where jax runs on a GPU and torch sees one, else "cpu": the peer on the same kind
  of device as tesserax."""
  import torch
  return "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"


def autocast(device: str, dtype: str | None):
  """torch.autocast to `dtype` ("bfloat16") on `device`, or a context that changes nothing."""
  import torch
  return (contextlib.nullcontext() if dtype is None
          else torch.autocast(device, dtype=getattr(torch, dtype)))


def torch_call(fn, device: str, dtype: str | None = None):
  """fn as a zero-argument call of the peer's side, under `autocast(device, dtype)`, returning
  only once CUDA's queue has run (torch.cuda.synchronize)."""
  import torch

  def call():
    with autocast(device, dtype):
      out = fn()
    if device == "cuda":
      torch.cuda.synchronize()
    return out
  return call


@contextlib.contextmanager
def float32_checks(device: str):
  """Full float32 products on both sides while checking on a GPU, where XLA's dots and cuDNN's
  convolutions default to TF32 (the timed calls keep each side's defaults); on the CPU, where
  both compute in float32 anyway, nothing changes."""
  if device != "cuda":
    yield
    return
  import torch
  allow_tf32 = torch.backends.cudnn.allow_tf32
  torch.backends.cudnn.allow_tf32 = False
  try:
    with jax.default_matmul_precision("highest"):
      yield
  finally:
    torch.backends.cudnn.allow_tf32 = allow_tf32


def to_numpy_nhwc(x):
  """A torch NCHW tensor on any device as a float32 NHWC NumPy array."""
  return x.detach().float().cpu().numpy().transpose(0, 2, 3, 1)


def row(work, check, seconds, **extra):
  out = {"work": work, **extra, **check}
  if check["agree"]:
    out.update(tesserax_s=seconds["tesserax"], peer_s=seconds["peer"],
               ratio_tesserax_over_peer=seconds["tesserax"] / seconds["peer"])
  else:
    out["refused"] = "outputs differ beyond the tolerance: no ratio"
  print(json.dumps(out), flush=True)
  return out


# --- DiT ---------------------------------------------------------------------------------

def dit_task_config(size: str, batch: int):
  """The diffusion task on DiT-{size}/2 over 32x32x4 latents (learned sigma, 1000 classes),
  rectified flow and the digits recipe's AdamW settings with DiT's learning rate."""
  config = config_lib.load("digits_dit")
  config.model = dit.dit_config(f"{size}/2")
  config.data.resolution, config.data.num_classes = 32, 1000
  config.batch_size = batch
  config.optim.lr, config.optim.warmup_steps, config.optim.grad_clip = 1e-4, 0, 0.0
  config.optim.schedule = "constant"
  config.ema_decay = 0.9999
  return config


def random_params(params, seed=0, std=0.02):
  """Params with every leaf perturbed (the zero-initialised adaLN and output layers too)."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree.unflatten(treedef, [x + std * jax.random.normal(k, x.shape, x.dtype)
                                      for x, k in zip(leaves, keys)])


def diffusers_dit_state(official: dict, depth: int) -> dict:
  """diffusers DiTTransformer2DModel names of an official DiT state_dict (torch layout)."""
  sd = {"pos_embed.proj.weight": official["x_embedder.proj.weight"],
        "pos_embed.proj.bias": official["x_embedder.proj.bias"],
        "proj_out_1.weight": official["final_layer.adaLN_modulation.1.weight"],
        "proj_out_1.bias": official["final_layer.adaLN_modulation.1.bias"],
        "proj_out_2.weight": official["final_layer.linear.weight"],
        "proj_out_2.bias": official["final_layer.linear.bias"]}
  for i in range(depth):
    ours, theirs = f"blocks.{i}.", f"transformer_blocks.{i}."
    emb = theirs + "norm1.emb."
    for j, name in ((0, "linear_1"), (2, "linear_2")):
      for kind in ("weight", "bias"):
        sd[f"{emb}timestep_embedder.{name}.{kind}"] = official[f"t_embedder.mlp.{j}.{kind}"]
    sd[emb + "class_embedder.embedding_table.weight"] = official[
        "y_embedder.embedding_table.weight"]
    for kind in ("weight", "bias"):
      q, k, v = np.split(official[f"{ours}attn.qkv.{kind}"], 3)
      sd.update({f"{theirs}attn1.to_q.{kind}": q, f"{theirs}attn1.to_k.{kind}": k,
                 f"{theirs}attn1.to_v.{kind}": v,
                 f"{theirs}attn1.to_out.0.{kind}": official[f"{ours}attn.proj.{kind}"],
                 f"{theirs}norm1.linear.{kind}": official[f"{ours}adaLN_modulation.1.{kind}"],
                 f"{theirs}ff.net.0.proj.{kind}": official[f"{ours}mlp.fc1.{kind}"],
                 f"{theirs}ff.net.2.{kind}": official[f"{ours}mlp.fc2.{kind}"]})
  return sd


def official_dit_grads(torch_model, depth: int) -> dict:
  """The peer's gradients under official DiT names (copies of the embedders summed)."""
  g = {k: p.grad.double().cpu().numpy() for k, p in torch_model.named_parameters()}
  out = {"x_embedder.proj.weight": g["pos_embed.proj.weight"],
         "x_embedder.proj.bias": g["pos_embed.proj.bias"],
         "final_layer.adaLN_modulation.1.weight": g["proj_out_1.weight"],
         "final_layer.adaLN_modulation.1.bias": g["proj_out_1.bias"],
         "final_layer.linear.weight": g["proj_out_2.weight"],
         "final_layer.linear.bias": g["proj_out_2.bias"]}
  emb = lambda i, name: g[f"transformer_blocks.{i}.norm1.emb.{name}"]  # noqa: E731
  for j, name in ((0, "linear_1"), (2, "linear_2")):
    for kind in ("weight", "bias"):
      out[f"t_embedder.mlp.{j}.{kind}"] = sum(
          emb(i, f"timestep_embedder.{name}.{kind}") for i in range(depth))
  out["y_embedder.embedding_table.weight"] = sum(
      emb(i, "class_embedder.embedding_table.weight") for i in range(depth))
  for i in range(depth):
    theirs = lambda name: g[f"transformer_blocks.{i}.{name}"]  # noqa: E731
    for kind in ("weight", "bias"):
      out[f"blocks.{i}.attn.qkv.{kind}"] = np.concatenate(
          [theirs(f"attn1.to_{n}.{kind}") for n in "qkv"])
      out[f"blocks.{i}.attn.proj.{kind}"] = theirs(f"attn1.to_out.0.{kind}")
      out[f"blocks.{i}.adaLN_modulation.1.{kind}"] = theirs(f"norm1.linear.{kind}")
      out[f"blocks.{i}.mlp.fc1.{kind}"] = theirs(f"ff.net.0.proj.{kind}")
      out[f"blocks.{i}.mlp.fc2.{kind}"] = theirs(f"ff.net.2.{kind}")
  return out


def diffusers_dit(model_config, official: dict):
  import torch
  from diffusers import DiTTransformer2DModel
  c = model_config
  model = DiTTransformer2DModel(
      num_attention_heads=c.num_heads, attention_head_dim=c.hidden_size // c.num_heads,
      in_channels=c.in_channels, out_channels=2 * c.in_channels, num_layers=c.depth,
      sample_size=c.input_size, patch_size=c.patch_size, num_embeds_ada_norm=c.num_classes,
      norm_eps=1e-6)
  for block in model.transformer_blocks:
    block.norm1.emb.time_proj.downscale_freq_shift = 0  # the official DiT's frequencies
  sd = diffusers_dit_state(official, c.depth)
  model.load_state_dict({k: torch.from_numpy(np.array(v, np.float32)) for k, v in sd.items()},
                        strict=True)
  return model


def fast_modes(args):
  """(tesserax dtype, torch autocast dtype or None) of the timed calls (the checks: float32)."""
  return args.dtype, (None if args.dtype == "float32" else args.dtype)


def bench_dit(args):
  import torch
  from diffusers import DPMSolverMultistepScheduler
  dev = torch_device()
  dtype, peer_dtype = fast_modes(args)
  config = dit_task_config(args.size, args.batch)
  mc = config.model
  setup = task_lib.build(config, sharding.make_mesh(config.mesh))
  fast = setup
  if dtype != "float32":
    fast_config = config.copy_and_resolve_references()
    fast_config.model.dtype = dtype
    fast = task_lib.build(fast_config, setup.mesh)
  state = setup.init()
  state = dict(state, params=random_params(state["params"]))
  state["ema"] = jax.tree.map(jnp.copy, state["params"])
  params = jax.device_get(state["params"])
  official = dit_checkpoints.state_dict_from_params(params, mc)
  peer = diffusers_dit(mc, official).to(dev)
  fast_peer = torch.compile(peer) if args.torch_compile else peer
  rng = np.random.default_rng(0)
  b, r, ch = args.batch, mc.input_size, mc.in_channels
  x = rng.standard_normal((b, r, r, ch)).astype(np.float32)
  t = rng.uniform(0.05, 0.95, b).astype(np.float32)
  labels = rng.integers(0, mc.num_classes, b).astype(np.int32)
  x_t, t_t, y_t = (torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(dev),
                   torch.from_numpy(1000 * t).to(dev),
                   torch.from_numpy(labels.astype(np.int64)).to(dev))
  rows = []

  # Forward. (ours_* are cached per task: one compilation where the checks' task is the fast one.)
  @functools.cache
  def ours_forward(task):
    forward = jax.jit(lambda p: task.apply(p, x, t, labels))
    return lambda: jax.block_until_ready(forward(state["params"]))

  def theirs_forward(model):
    with torch.no_grad():
      return model(x_t, timestep=t_t, class_labels=y_t).sample

  peer.eval()
  with float32_checks(dev):
    check = compare("dit forward", ours_forward(setup)(),
                    to_numpy_nhwc(torch_call(lambda: theirs_forward(peer), dev)()), 1e-4)
  sides = {"tesserax": ours_forward(fast),
           "peer": torch_call(lambda: theirs_forward(fast_peer), dev, peer_dtype)}
  seconds = timed(sides, args.rounds, args.order) if check["agree"] else {}
  rows.append(row(f"DiT-{args.size}/2 forward", check, seconds, batch=b))

  # Sampling: DPM-Solver++(2M), the DiT as a velocity network of t = sigma.
  for steps in args.steps:
    scheduler = DPMSolverMultistepScheduler(
        use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=1.0,
        final_sigmas_type="zero", solver_order=2)
    scheduler.set_timesteps(steps)
    sigmas = scheduler.sigmas.double().numpy()

    @functools.cache
    def ours_solve(task):
      solve = jax.jit(lambda p, noise: multistep.dpm_solver_pp(
          lambda x, s: task.apply(p, x, jnp.full((x.shape[0],), s), labels)[..., :ch],
          noise, sigmas, order=2))
      return lambda: jax.block_until_ready(solve(state["params"], x))

    def theirs_solve(model):
      scheduler.set_timesteps(steps)
      sample = x_t.clone()
      with torch.no_grad():
        for i, timestep in enumerate(scheduler.timesteps):
          s = torch.full((b,), 1000 * float(sigmas[i]), device=dev)
          v = model(sample, timestep=s, class_labels=y_t).sample[:, :ch]
          sample = scheduler.step(v.float(), timestep, sample).prev_sample
      return sample

    with float32_checks(dev):
      check = compare(f"dpm-solver++ {steps} steps", ours_solve(setup)(),
                      to_numpy_nhwc(torch_call(lambda: theirs_solve(peer), dev)()), 1e-3)
    sides = {"tesserax": ours_solve(fast),
             "peer": torch_call(lambda: theirs_solve(fast_peer), dev, peer_dtype)}
    seconds = (timed(sides, max(1, args.rounds // 2), args.order) if check["agree"] else {})
    rows.append(row(f"DiT-{args.size}/2 DPM-Solver++(2M) {steps} steps", check, seconds,
                    batch=b, nfe=steps))

  # Gradients of the same loss on the same inputs, then the training step.
  target = rng.standard_normal((b, r, r, ch)).astype(np.float32)

  def loss(p):
    return jnp.mean(jnp.square(setup.apply(p, x, t, labels)[..., :ch] - target))

  peer.train()
  for block in peer.transformer_blocks:  # no label dropout for the check
    block.norm1.emb.class_embedder.dropout_prob = 0.0
  target_t = torch.from_numpy(np.ascontiguousarray(target.transpose(0, 3, 1, 2))).to(dev)
  with float32_checks(dev):
    grads = dit_checkpoints.state_dict_from_params(
        jax.device_get(jax.jit(jax.grad(loss))(state["params"])), mc)
    out = peer(x_t, timestep=t_t, class_labels=y_t).sample[:, :ch]
    torch.mean(torch.square(out - target_t)).backward()
  peer_grads = official_dit_grads(peer, mc.depth)
  peer.zero_grad(set_to_none=True)
  for block in peer.transformer_blocks:
    block.norm1.emb.class_embedder.dropout_prob = mc.class_dropout
  flat = lambda d: np.concatenate([np.ravel(d[k]) for k in sorted(peer_grads)])  # noqa: E731
  ours_g, theirs_g = flat(grads).astype(np.float64), flat(peer_grads)
  error = float(np.linalg.norm(ours_g - theirs_g) / np.linalg.norm(theirs_g))
  check = {"check": "dit gradients (norm of the difference / norm)",
           "relative_difference": error, "tolerance": 1e-4, "agree": error <= 1e-4}

  batch = sharding.global_batch({"image": x, "label": labels}, setup.mesh)
  holder = {"state": state}

  def ours():
    holder["state"], metrics = fast.train_step(holder["state"], batch)
    jax.block_until_ready(metrics["loss"])

  c = config.optim
  opt = torch.optim.AdamW(peer.parameters(), lr=c.lr, betas=(c.b1, c.b2), eps=c.eps,
                          weight_decay=c.weight_decay, foreach=True)
  ema = [p.detach().clone() for p in peer.parameters()]
  x0 = x_t

  def forward_loss():
    tt = torch.sigmoid(torch.randn(b, device=dev))
    eps = torch.randn_like(x0)
    xt = (1 - tt[:, None, None, None]) * x0 + tt[:, None, None, None] * eps
    pred = fast_peer(xt, timestep=1000 * tt, class_labels=y_t).sample[:, :ch]
    return torch.mean(torch.square(pred.float() - (eps - x0)))

  def theirs():
    with autocast(dev, peer_dtype):
      step_loss = forward_loss()
    opt.zero_grad(set_to_none=True)
    step_loss.backward()
    opt.step()
    with torch.no_grad():
      torch._foreach_lerp_(ema, list(peer.parameters()), 1 - config.ema_decay)

  seconds = (timed({"tesserax": ours, "peer": torch_call(theirs, dev)}, args.rounds, args.order)
             if check["agree"] else {})
  rows.append(row(f"DiT-{args.size}/2 training step (fwd+bwd+AdamW+EMA)", check, seconds,
                  batch=b))
  return rows


# --- SD-VAE ------------------------------------------------------------------------------

def bench_vae(args):
  import torch
  from diffusers import AutoencoderKL
  from safetensors.torch import save_file
  dev = torch_device()
  dtype, peer_dtype = fast_modes(args)
  config = kl_autoencoder.sd_vae_f8d4()
  config.resolution = args.vae_resolution
  torch.manual_seed(0)
  peer = AutoencoderKL(
      in_channels=3, out_channels=3, latent_channels=config.embed_dim,
      down_block_types=("DownEncoderBlock2D",) * len(config.ch_mult),
      up_block_types=("UpDecoderBlock2D",) * len(config.ch_mult),
      block_out_channels=tuple(config.ch * m for m in config.ch_mult),
      layers_per_block=config.num_res_blocks, norm_num_groups=32).eval()
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "vae.safetensors")
    save_file({k: v.contiguous() for k, v in peer.state_dict().items()}, path)
    params = vae_checkpoints.diffusers_params(path, config)
  peer = peer.to(dev)
  fast_peer = torch.compile(peer) if args.torch_compile else peer

  def jitted(vae_config):
    graphdef, state = nnx.split(
        weights.with_params(lambda: kl_autoencoder.build(vae_config), params, "vae"))
    return (jax.jit(lambda s, x: nnx.merge(graphdef, s).encode(x)),
            jax.jit(lambda s, z: nnx.merge(graphdef, s).decode(z)), state)

  encode, decode, state = jitted(config)
  fast_encode, fast_decode, fast_state = encode, decode, state
  if dtype != "float32":
    fast_config = config.copy_and_resolve_references()
    fast_config.dtype = dtype
    fast_encode, fast_decode, fast_state = jitted(fast_config)
  rng = np.random.default_rng(0)
  b, res = args.vae_batch, args.vae_resolution
  images = rng.uniform(-1, 1, (b, res, res, 3)).astype(np.float32)
  images_t = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(dev)
  rows = []

  def theirs_encode(model):
    with torch.no_grad():
      return model.encode(images_t).latent_dist.mean

  with float32_checks(dev):
    latents = jax.block_until_ready(encode(state, images))
    check = compare("vae encode", latents,
                    to_numpy_nhwc(torch_call(lambda: theirs_encode(peer), dev)()), 1e-3)
  sides = {"tesserax": lambda: jax.block_until_ready(fast_encode(fast_state, images)),
           "peer": torch_call(lambda: theirs_encode(fast_peer), dev, peer_dtype)}
  seconds = timed(sides, args.rounds, args.order) if check["agree"] else {}
  rows.append(row(f"SD-VAE encode {res}x{res}", check, seconds, batch=b))
  latents_t = torch.from_numpy(
      np.ascontiguousarray(np.asarray(latents).transpose(0, 3, 1, 2))).to(dev)

  def theirs_decode(model):
    with torch.no_grad():
      return model.decode(latents_t).sample

  with float32_checks(dev):
    check = compare("vae decode", decode(state, latents),
                    to_numpy_nhwc(torch_call(lambda: theirs_decode(peer), dev)()), 1e-3)
  sides = {"tesserax": lambda: jax.block_until_ready(fast_decode(fast_state, latents)),
           "peer": torch_call(lambda: theirs_decode(fast_peer), dev, peer_dtype)}
  seconds = timed(sides, args.rounds, args.order) if check["agree"] else {}
  rows.append(row(f"SD-VAE decode {res}x{res}", check, seconds, batch=b))
  return rows


# --- FID Inception -----------------------------------------------------------------------

FID_PAIRS = (("pytorch-fid", "pytorch_fid"), ("torch-fidelity", "adm"))  # peer, tesserax mode


def random_inception_state(seed=0) -> dict:
  """A random FID Inception as the official pt_inception-2015-12-05 state_dict ({torch key:
  float32 array}, the keys and shapes weights.inception_params reads, fc.bias included).
  Convolutions and fc are He-normal; BatchNorm (eps 1e-3) gets running means near 0,
  variances around 1 and affine parameters near identity, so activations keep their scale
  through the network and every tensor changes the output."""
  rng = np.random.default_rng(seed)
  state = {}
  for key, (_, flax_shape, perm) in weights.inception_rules().items():
    shape = weights.source_shape(flax_shape, perm)
    leaf = key.rsplit(".", 1)[1]
    if len(shape) > 1:  # conv OIHW, fc [out, in]
      x = rng.standard_normal(shape) * np.sqrt(2 / np.prod(shape[1:]))
    else:
      x = {"weight": lambda: rng.uniform(0.8, 1.2, shape),
           "bias": lambda: rng.normal(0, 0.1, shape),
           "running_mean": lambda: rng.normal(0, 0.1, shape),
           "running_var": lambda: rng.uniform(0.5, 1.5, shape)}[leaf]()
    state[key] = x.astype(np.float32)
  state["fc.bias"] = rng.normal(0, 0.01, inception.NUM_CLASSES).astype(np.float32)
  return state


def image_set(seed, num, res, cells):
  """uint8 [num, res, res, 3]: random colours on a cells x cells grid plus pixel noise (edges
  everywhere, so the resize matters)."""
  rng = np.random.default_rng(seed)
  grid, reps = rng.uniform(0, 255, (num, cells, cells, 3)), -(-res // cells)
  images = np.repeat(np.repeat(grid, reps, axis=1), reps, axis=2)[:, :res, :res]
  return np.clip(images + rng.normal(0, 20, images.shape), 0, 255).astype(np.uint8)


def import_torchvision():
  """torchvision's Python side. PyPI's torchvision wheels are CUDA builds; beside a CPU torch
  their C++ ops library does not load, which torchvision tolerates except in
  _meta_registrations.py (0.28: the nms/qnms fake kernels are registered without the
  extension._has_ops() guard, so the import fails, and diffusers' with it). No peer here uses
  those detection ops: on that failure the module is skipped and torchvision imported again."""
  try:
    import torchvision
  except RuntimeError as e:
    if "torchvision::nms" not in str(e):
      raise
    for name in [m for m in sys.modules if m.split(".")[0] == "torchvision"]:
      del sys.modules[name]
    name = "torchvision._meta_registrations"
    sys.modules[name] = types.ModuleType(name)
    import torchvision
  return torchvision


def bench_fid(args):
  import torch
  import torch_fidelity
  from PIL import Image
  from pytorch_fid import fid_score, inception as pf_inception
  from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
  dev = torch_device()
  state = random_inception_state()
  b, n, res = args.fid_batch, args.fid_num, args.fid_resolution
  sets = {"a": image_set(1, n, res, 8), "b": image_set(2, n, res, 16)}
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "pt_inception-2015-12-05-random.pth")
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, path)
    model = weights.with_params(weights.FACTORIES["inception"], weights.inception_params(path),
                                "inception")
    dirs = {}
    for name, images in sets.items():
      dirs[name] = os.path.join(tmp, name)
      os.makedirs(dirs[name])
      for i, image in enumerate(images):
        Image.fromarray(image).save(os.path.join(dirs[name], f"{i:05d}.png"))
    loader = mock.patch.object(pf_inception, "load_state_dict_from_url",
                               lambda *a, **k: torch.load(path, weights_only=True))

    # FID end to end: each tool reads the two folders.
    fids = {}
    for mode in inception.MODES:
      ref = reference.compute(reference.read_images(dirs["b"]), inception=model, mode=mode,
                              keep_images=0, batch_size=b)
      fids[f"tesserax_{mode}"] = metrics.generation_metrics(
          reference.read_images(dirs["a"]), ref, ("fid",), inception=model, mode=mode,
          batch_size=b)["fid"]
    with loader, float32_checks(dev):
      fids["pytorch-fid"] = float(fid_score.calculate_fid_given_paths(
          [dirs["a"], dirs["b"]], b, dev, 2048, num_workers=0))
    with float32_checks(dev):
      fids["torch-fidelity"] = torch_fidelity.calculate_metrics(
          input1=dirs["a"], input2=dirs["b"], fid=True, cuda=dev == "cuda", batch_size=b,
          cache=False, verbose=False, feature_extractor_weights_path=path,
          save_cpu_ram=True)["frechet_inception_distance"]  # no DataLoader workers forked

    with loader:
      pf_model = pf_inception.InceptionV3([3]).eval().to(dev)
    tf_model = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                           feature_extractor_weights_path=path).to(dev)
  fid_checks = {peer: compare(f"FID {peer}", fids[f"tesserax_{mode}"], fids[peer], 1e-3)
                for peer, mode in FID_PAIRS}
  rows = [{"work": f"FID, {n} vs {n} images {res}x{res}", **fids,
           "pytorch-fid_vs_torch-fidelity": abs(fids["pytorch-fid"] / fids["torch-fidelity"] - 1),
           "checks": list(fid_checks.values())}]
  print(json.dumps(rows[0]), flush=True)

  # pool_3 features of one batch, checked then timed.
  batch = sets["a"][:b]
  batch_t = torch.from_numpy(np.ascontiguousarray(batch.transpose(0, 3, 1, 2))).to(dev)
  sides = {}
  for mode in inception.MODES:
    run = metrics.batched(metrics.inception_outputs, model, batch_size=b, mode=mode)
    sides[mode] = functools.partial(lambda run: run(batch)["pool"], run)

  def pytorch_fid():
    with torch.no_grad():
      return pf_model(batch_t.float() / 255)[0][:, :, 0, 0].cpu().numpy()

  def torch_fidelity_():
    with torch.no_grad():
      return tf_model(batch_t)[0].cpu().numpy()

  sides["pytorch-fid"] = torch_call(pytorch_fid, dev)
  sides["torch-fidelity"] = torch_call(torch_fidelity_, dev)
  # The 299x299 input each network sees (the peers': caught entering their first conv).
  inputs = {mode: np.asarray(inception.preprocess(batch, mode)) for mode in inception.MODES}

  def keep(name, _, args):
    inputs[name] = to_numpy_nhwc(args[0])

  hooks = [pf_model.blocks[0][0].register_forward_pre_hook(functools.partial(keep, "pytorch-fid")),
           tf_model.Conv2d_1a_3x3.register_forward_pre_hook(
               functools.partial(keep, "torch-fidelity"))]
  with float32_checks(dev):
    features = {name: fn() for name, fn in sides.items()}
  for hook in hooks:
    hook.remove()
  gap = lambda a, b: float(np.max(np.abs(inputs[a] - inputs[b])))  # noqa: E731
  checks = {peer: compare(f"pool_3 features, {mode} preprocessing", features[mode],
                          features[peer], 1e-4) for peer, mode in FID_PAIRS}
  agree = {peer: checks[peer]["agree"] and fid_checks[peer]["agree"] for peer in checks}
  timed_sides = {k: sides[k] for peer, mode in FID_PAIRS if agree[peer] for k in (mode, peer)}
  seconds = timed(timed_sides, args.rounds, args.order) if timed_sides else {}
  cross = compare("pool_3 features, pytorch-fid vs torch-fidelity", features["pytorch-fid"],
                  features["torch-fidelity"], 1e-4)["relative_difference"]
  for peer, mode in FID_PAIRS:
    check = dict(checks[peer], agree=agree[peer], fid_relative_difference=fid_checks[peer][
        "relative_difference"], fid_tolerance=1e-3)
    pair = {"tesserax": seconds[mode], "peer": seconds[peer]} if agree[peer] else {}
    extra = {"peer": peer, "mode": mode, "batch": b, "resolution": res,
             "input_max_abs_difference": gap(mode, peer),
             "input_vs_other_peer": gap("pytorch-fid", "torch-fidelity"),
             "features_vs_other_peer": cross}
    if agree[peer]:
      extra.update(tesserax_images_per_s=b / pair["tesserax"], peer_images_per_s=b / pair["peer"])
    rows.append(row(f"Inception pool_3 features {res}->299", check, pair, **extra))
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--size", default="S", choices=("S", "B", "L", "XL"),
                      help="DiT size at patch 2 on 32x32x4 latents (XL on an accelerator)")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--steps", type=int, nargs="+", default=[8, 25])
  parser.add_argument("--vae_resolution", type=int, default=128)
  parser.add_argument("--vae_batch", type=int, default=1)
  parser.add_argument("--fid_num", type=int, default=64, help="images in each FID set")
  parser.add_argument("--fid_batch", type=int, default=16)
  parser.add_argument("--fid_resolution", type=int, default=256)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--order", default="interleaved", choices=("interleaved", "blocks"),
                      help="interleaved: the sides take turns each round; blocks: all of one "
                           "side's rounds, then the other's (no call right after the other "
                           "side's)")
  parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                      help="compute of the timed DiT and SD-VAE calls (tesserax model.dtype, "
                           "the peer's torch.autocast); the checks run in float32")
  parser.add_argument("--torch_compile", action="store_true",
                      help="time torch.compile'd peer networks (the checks run eager)")
  parser.add_argument("--only", nargs="+", default=list(PEERS), choices=tuple(PEERS))
  parser.add_argument("--out", default=None, help="append the rows as JSON lines here")
  args = parser.parse_args()
  require_peers(args.only)
  import torch
  torch.set_num_threads(args.threads)
  header = {"device": jax.devices()[0].device_kind, "cpu": platform.processor() or
            platform.machine(), "cores": os.cpu_count(), "jax": jax.__version__,
            "torch": torch.__version__, "torch_threads": args.threads, "order": args.order,
            "torch_device": torch_device(), "dtype": args.dtype,
            "torch_compile": args.torch_compile,
            "date": time.strftime("%Y-%m-%d"), "load_before": os.getloadavg()}
  if importlib.util.find_spec("torchvision") is not None:  # before diffusers or the FID peers
    header["torchvision"] = import_torchvision().__version__
  if {"dit", "vae"} & set(args.only):
    import diffusers
    header["diffusers"] = diffusers.__version__
  if "fid" in args.only:
    import pytorch_fid
    import torch_fidelity
    header.update(pytorch_fid=pytorch_fid.__version__, torch_fidelity=torch_fidelity.__version__)
  print(json.dumps(header), flush=True)
  rows = []
  if "dit" in args.only:
    rows += bench_dit(args)
  if "vae" in args.only:
    rows += bench_vae(args)
  if "fid" in args.only:
    rows += bench_fid(args)
  footer = {"load_after": os.getloadavg()}
  print(json.dumps(footer))
  if args.out:
    with open(args.out, "a") as f:
      f.writelines(json.dumps(r) + "\n" for r in [header] + rows + [footer])


if __name__ == "__main__":
  host.prepare(__spec__.name)
  main()
