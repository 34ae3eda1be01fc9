"""Consistency distillation (objectives/cd.py) of the digits demo's rectified-flow DiT
(configs/digits_dit.py, trained first into workdirs/digits): the student is the same network,
started from the teacher's EMA weights (teacher.init_student), read as a consistency function
with the boundary condition at sigma_min = 0.002. CIFAR-10 settings: N = 18 Karras levels in
[0.002, 80], sigma_data 0.5, Heun teacher steps, l2 metric, the online network as target
(mu = 0). Sampled with one consistency step from sigma 80 (--steps 2: through ECT's 0.821).

Launch:   tesserax train --config digits_dit --workdir workdirs/digits
          tesserax train --config digits_cd --workdir workdirs/digits_cd \
              [--config.teacher.workdir=workdirs/digits]
          tesserax sample --workdir workdirs/digits_cd --num 1000 --sampler consistency \
              --steps 1 --out cd.npz && tesserax eval --samples cd.npz --metrics fid_digits,accuracy
Runtime:  600 steps at about 11 steps/s on 2 quiet CPU cores, under a minute (`tesserax demo
          --fewstep`, 2026-12-01).
Expected: in the default few-step demo (600 steps from its teacher): FID-digits 19.8 / 18.6 / 18.0
          at 1 / 2 / 4 steps, class accuracy 91.3 / 93.8 / 94.5% (1.26x and 1.18x the teacher's
          32-step Euler 15.7 at 1 and 2 steps) (README, "Few-step students").

`get_config("tiny")` is the test size (its teacher is a tiny digits_dit workdir).
"""
from tesserax.core import config as config_lib
from tesserax.objectives import cd

ARGS = ("tiny",)


def get_config(arg=None):
  config = config_lib.load("digits_dit:tiny" if arg == "tiny" else "digits_dit")
  if arg != "tiny":
    config.num_steps = 600  # from the teacher's weights: the few-step demo's length
  config.teacher = dict(workdir="workdirs/digits", init_student=True)
  config.objective = cd.defaults()
  config.optim.update(lr=1e-4, warmup_steps=0, schedule="constant")
  config.sample.update(solver="consistency", num_steps=1, sigmas=(80.0, 0.821), sigma_min=0.002)
  return config
