"""The train state every task checkpoints, its shardings and the NaN/Inf guard.

A train state is a plain pytree:
  {"step": int32, "params": pure dict, "ema": pure dict, "opt": optax state,
   "rng": uint32[2] root key, "nonfinite_step": int32 (-1 until a loss/grad is NaN/Inf),
   ...task entries (a discriminator, its optimizer, ...)}.
The key of step s is fold_in(rng, s), so the randomness of a step does not depend on how the
run was split into processes, devices or restarts.
"""
import jax
import jax.numpy as jnp
import optax

from tesserax.core import optim, sharding


def new_state(params, tx, seed: int, ema=None, **extra) -> dict:
  """The state at step 0: `params`, EMA `ema` (default a copy of params), `tx`'s optimizer
  state, the root key of `seed`, and any task `extra` entries."""
  return {"step": jnp.zeros((), jnp.int32), "params": params,
          "ema": jax.tree.map(jnp.copy, params) if ema is None else ema,
          "opt": tx.init(params), **extra, "rng": jax.random.PRNGKey(seed),
          "nonfinite_step": jnp.full((), -1, jnp.int32)}


def step_key(state):
  """The random key of the state's current step."""
  return jax.random.fold_in(state["rng"], state["step"])


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


def state_shardings(abstract_state, param_sh, tx, mesh) -> dict:
  """Shardings of a state from `new_state`: params and EMA as `param_sh`, the optimizer
  state like its parameters, everything else replicated."""
  rep = sharding.replicated(mesh)
  shardings = jax.tree.map(lambda _: rep, abstract_state)
  return dict(shardings, params=param_sh, ema=param_sh,
              opt=optimizer_shardings(tx, abstract_state["opt"], param_sh, mesh))


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


def optimizer_step(state, loss, grads, tx, config):
  """The state after one step of `tx` on `grads`: params, their EMA at `config.ema_decay`
  and the optimizer state, through the NaN/Inf guard of `loss` and the gradient norm; with
  the metrics {grad_norm, lr} of the step."""
  grad_norm = optim.global_norm(grads)
  updates, opt = tx.update(grads, state["opt"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  ema = optim.ema_update(state["ema"], params, config.ema_decay)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  new_state = guarded_update(state, {"params": params, "ema": ema, "opt": opt}, finite)
  lr = optim.learning_rate_schedule(config.optim, config.num_steps)(state["step"])
  return new_state, {"grad_norm": grad_norm, "lr": lr}
