"""Easy consistency tuning (objectives/ect.py) of the digits demo's rectified-flow DiT
(configs/digits_dit.py, trained first into workdirs/digits), started from its weights as ECT
starts from EDM: sigma_t log-normal (-1.1, 2.0), the sigmoid r(t) mapping (k = 8, b = 1,
q = 2) with a new stage every quarter of the run (CIFAR-10: every 25k of 200k steps), the L2
norm divided by (t - r), the online network as target. Sampled with one consistency step from
sigma 80 (--steps 2: through ECT's CIFAR-10 mid-point 0.821).

Launch:   tesserax train --config digits_ect --workdir workdirs/digits_ect \
              [--config.teacher.workdir=workdirs/digits]
          tesserax sample --workdir workdirs/digits_ect --num 1000 --sampler consistency \
              --steps 2 --out ect.npz && tesserax eval --samples ect.npz --metrics fid_digits,accuracy
Runtime:  600 steps at 12-13 steps/s on 2 quiet CPU cores, under a minute (`tesserax demo
          --fewstep`, 2026-12-01).
Expected: in the default few-step demo (600 steps from its teacher): FID-digits 28.7 / 22.9 / 20.0
          at 1 / 2 / 4 steps, class accuracy 91.0 / 93.8 / 95.5% (README, "Few-step students").

`get_config("tiny")` is the test size.
"""
from tesserax.core import config as config_lib
from tesserax.objectives import ect

ARGS = ("tiny",)


def get_config(arg=None):
  config = config_lib.load("digits_dit:tiny" if arg == "tiny" else "digits_dit")
  if arg != "tiny":
    config.num_steps = 600  # from the teacher's weights: the few-step demo's length
  config.teacher = dict(workdir="workdirs/digits", init_student=True)
  config.objective = ect.defaults(double_every=max(1, config.num_steps // 4))
  config.optim.update(lr=1e-4, warmup_steps=0, schedule="constant")
  config.sample.update(solver="consistency", num_steps=1, sigmas=(80.0, 0.821), sigma_min=0.002)
  return config
