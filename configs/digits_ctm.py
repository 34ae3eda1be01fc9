"""Consistency trajectory model (objectives/ctm.py) distilled from the digits demo's
rectified-flow DiT (configs/digits_dit.py, trained first into workdirs/digits): the same
network with a second time input s (model.second_time), started from the teacher's weights,
trained with soft consistency matching (one Heun teacher step on the N = 18 Karras grid, the
EMA as target network) plus DSM; no GAN term. Sampled with gamma-sampling: one jump from
sigma 80 (--steps 2: through 0.821; --config.sample.gamma for stochastic steps).

Launch:   tesserax train --config digits_ctm --workdir workdirs/digits_ctm \
              [--config.teacher.workdir=workdirs/digits]
          tesserax sample --workdir workdirs/digits_ctm --num 1000 --sampler ctm \
              --steps 1 --out ctm.npz && tesserax eval --samples ctm.npz --metrics fid_digits,accuracy
Runtime:  not measured yet: a CTM step costs two teacher passes, three target passes and a DSM
          pass on top of the student's.
Expected: not measured yet (README, "The demo").

`get_config("tiny")` is the test size.
"""
from tesserax.core import config as config_lib
from tesserax.objectives import ctm

ARGS = ("tiny",)


def get_config(arg=None):
  config = config_lib.load("digits_dit:tiny" if arg == "tiny" else "digits_dit")
  if arg != "tiny":
    config.num_steps = 600  # from the teacher's weights: the few-step demo's length
  config.teacher = dict(workdir="workdirs/digits", init_student=True)
  config.model.second_time = True
  config.objective = ctm.defaults()
  config.optim.update(lr=1e-4, warmup_steps=0, schedule="constant")
  config.sample.update(solver="ctm", num_steps=1, sigmas=(80.0, 0.821), gamma=0.0)
  return config
