"""benchmarks/ar_speed.py at a tiny size: the KV-cache and recomputing samplers are compared
before timing (a broken cache is caught and its speed-up withheld), and the analytic FLOP
counts agree with XLA's own count of the compiled forward passes."""
import contextlib
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tesserax.benchmarks import ar_speed
from tesserax.core import config as config_lib
from tesserax.generators import autoregressive
from tesserax.tokenizers import flextok

TINY = ["--hidden", "32", "--depth", "2", "--heads", "2", "--codebook_size", "64",
        "--seq_len", "8", "--batch", "3", "--steps", "2", "--flextok_batch", "2",
        "--tokens", "5", "--matmul_size", "64", "--repeats", "1"]


@pytest.fixture(scope="session")
def tiny_run():
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    ar_rows, flextok_rows = ar_speed.main(TINY)
  return ar_rows, flextok_rows, out.getvalue()


def test_paths_agree_and_speedup_is_printed(tiny_run):
  ar_rows, _, printed = tiny_run
  kv, full = ar_rows
  assert (kv["path"], full["path"]) == ("kv_cache", "recompute")
  assert kv["tokens"].shape == full["tokens"].shape == (3, 8)
  np.testing.assert_array_equal(kv["tokens"], full["tokens"])
  assert kv["tokens_equal"] and kv["equal_fraction"] == 1.0
  assert len(np.unique(kv["tokens"])) > 1  # the redrawn head makes the draws non-trivial
  assert kv["speedup"] == pytest.approx(full["seconds"] / kv["seconds"])
  assert kv["tokens_per_s"] == pytest.approx(3 * 8 / kv["seconds"])
  assert f"{kv['speedup']:.1f}x" in printed
  assert "withheld" not in printed


def test_broken_cache_withholds_the_speedup(tiny_run, monkeypatch):
  _, flextok_rows, _ = tiny_run
  decode = autoregressive.AutoregressiveTransformer.decode

  def favour_zero(self, *a):  # a cache path that disagrees with the full forward pass
    logits, cache = decode(self, *a)
    return logits.at[..., 0].add(30.0), cache

  monkeypatch.setattr(autoregressive.AutoregressiveTransformer, "decode", favour_zero)
  args = ar_speed.parse(TINY)
  rows = ar_speed.bench_ar(args)
  assert not rows[0]["tokens_equal"] and rows[0]["equal_fraction"] < 1.0
  assert rows[0]["speedup"] is None
  assert np.all(rows[0]["tokens"] == 0)
  assert "withheld" in ar_speed.markdown(args, 1.0, rows, flextok_rows)


def xla_flops(fn, *args):
  return jax.jit(fn).lower(*args).compile().cost_analysis()["flops"]


def test_ar_flops_match_xla():
  """The recomputing path's count per position is one full forward pass of K positions; XLA
  counts the same matmuls plus the elementwise work."""
  c = autoregressive.ar_config(codebook_size=512, num_classes=10, seq_len=32, hidden_size=64,
                               depth=2, num_heads=2)
  graphdef, state = nnx.split(autoregressive.AutoregressiveTransformer(c, rngs=nnx.Rngs(0)))
  xla = xla_flops(lambda s, t, y: nnx.merge(graphdef, s)(t, y), state,
                  jnp.zeros((1, 32), jnp.int32), jnp.zeros((1,), jnp.int32))
  flops = ar_speed.ar_flops(c, 1)
  assert 0.9 < flops["recompute"] / 32 / xla <= 1.0
  d, k = 64, 32
  assert flops["model"] == 32 * flops["dense"] + 2 * 2 * d * k * (k + 1)  # causal: sum 4d(p+1)
  assert ar_speed.ar_flops(c, 2)["kv_cache"] == 2 * flops["kv_cache"]


def test_flextok_flops_match_xla(tiny_run):
  _, flextok_rows, _ = tiny_run
  c = config_lib.load("digits_flextok").model
  graphdef, state = nnx.split(flextok.build(c))
  xla = xla_flops(lambda s, x, t, codes: nnx.merge(graphdef, s).velocity(x, t, codes), state,
                  jnp.zeros((1, 16, 16, 1)), jnp.ones((1,)), jnp.zeros((1, 16, 3)))
  per_eval = ar_speed.flextok_flops(c)
  assert 0.9 < per_eval / xla <= 1.0
  assert [(g, s) for g, s, *_ in flextok_rows] == [(False, 2), (True, 2)]
  for guided, steps, rate, flops in flextok_rows:
    assert rate > 0 and flops == per_eval * steps * (2 if guided else 1)
