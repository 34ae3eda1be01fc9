"""Rectified-flow objective against analytic answers.

For data x0 ~ N(0, s^2) (per pixel), x_t = (1-t) x0 + t eps and target u = eps - x0, the best
velocity is v*(x, t) = Cov(u, x_t)/Var(x_t) x = (t - (1-t) s^2) / ((1-t)^2 s^2 + t^2) x and the
irreducible loss at time t is Var(u | x_t) = s^2 / ((1-t)^2 s^2 + t^2). With s = 1 and uniform t its expectation is the integral of 1/(2t^2 - 2t + 1), i.e. pi/2.
"""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from scipy import integrate, special

from tesserax.core import registry
from tesserax.objectives import rectified_flow
from tesserax.objectives.context import Context

S = 1.0


def optimal_gaussian_model(x, t, labels):
  tb = t[:, None, None, None]
  return (tb - (1 - tb) * S ** 2) / ((1 - tb) ** 2 * S ** 2 + tb ** 2) * x


def _objective(time_sampling):
  return ml_collections.ConfigDict(dict(name="rectified_flow", time_sampling=time_sampling,
                                        logit_mean=0.0, logit_std=1.0))


def loss_of(model, batch, key, objective, class_dropout=0.0):
  """The loss of the objective registered as `objective.name` for a parameter-free
  `model(x, t, labels)`, at step 0 with 10 classes."""
  config = ml_collections.ConfigDict(dict(objective=objective,
                                          model=dict(class_dropout=class_dropout)))
  made = registry.OBJECTIVES.get(objective.name)(config)
  ctx = Context(step=jnp.zeros((), jnp.int32), key=key, num_classes=10)
  return made.loss(lambda params, x, t, labels: model(x, t, labels), None, batch, ctx)


def _expected_loss(density):
  residual = lambda t: S ** 2 / ((1 - t) ** 2 * S ** 2 + t ** 2)
  return integrate.quad(lambda t: residual(t) * density(t), 0, 1)[0]


def _mc_loss(time_sampling, n=8192):
  batch = {"image": S * jax.random.normal(jax.random.PRNGKey(3), (n, 4, 4, 1)),
           "label": jnp.zeros((n,), jnp.int32)}
  loss, _ = loss_of(optimal_gaussian_model, batch, jax.random.PRNGKey(4),
                    _objective(time_sampling))
  return float(loss)


def test_optimal_velocity_reaches_the_analytic_loss_uniform_time():
  assert abs(_expected_loss(lambda t: 1.0) - np.pi / 2) < 1e-9
  assert abs(_mc_loss("uniform") / (np.pi / 2) - 1) < 0.02


def test_optimal_velocity_reaches_the_analytic_loss_logit_normal_time():
  density = lambda t: np.exp(-special.logit(t) ** 2 / 2) / np.sqrt(2 * np.pi) / (t * (1 - t))
  assert abs(_mc_loss("logit_normal") / _expected_loss(density) - 1) < 0.02


def test_a_point_mass_is_fit_exactly():
  """All data at c: v*(x, t) = (x - c) / t reproduces eps - x0 exactly, so the loss is 0."""
  c = 0.3
  batch = {"image": jnp.full((64, 2, 2, 1), c), "label": jnp.zeros((64,), jnp.int32)}
  model = lambda x, t, labels: (x - c) / t[:, None, None, None]
  loss, _ = loss_of(model, batch, jax.random.PRNGKey(0), _objective("uniform"))
  assert float(loss) < 1e-8


def test_logit_normal_times():
  t = rectified_flow.sample_time(jax.random.PRNGKey(0), 200_000, _objective("logit_normal"))
  logit = np.asarray(special.logit(np.asarray(t, np.float64)))
  assert abs(logit.mean()) < 0.01 and abs(logit.std() - 1) < 0.01


def test_label_dropout_uses_the_null_class():
  labels = jnp.arange(100_000) % 10
  dropped = rectified_flow.drop_labels(jax.random.PRNGKey(0), labels, 0.1, 10)
  changed = np.asarray(dropped != labels)
  assert abs(changed.mean() - 0.1) < 0.005
  assert np.all(np.asarray(dropped)[changed] == 10)
  assert np.all(np.asarray(rectified_flow.drop_labels(None, labels, 0.0, 10)) == labels)
