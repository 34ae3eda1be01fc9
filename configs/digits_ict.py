"""Improved consistency training (objectives/ict.py) on digits: the digits demo's DiT
(configs/digits_dit.py) started from the trained rectified-flow model's weights (iCT trains
from scratch; on CPU the start from a flow model is what makes minutes enough), with the
paper's settings: pseudo-Huber on the full norm, log-normal proposal (-1.1, 2.0) over the
Karras grid, N from 10 doubling to 1280 over the run, weight 1 / (sigma_{i+1} - sigma_i), no
target EMA. Sampled with one consistency step from sigma 80 (--steps 2: through 0.821).

Launch:   tesserax train --config digits_ict --workdir workdirs/digits_ict \
              [--config.teacher.workdir=workdirs/digits]
          tesserax sample --workdir workdirs/digits_ict --num 1000 --sampler consistency \
              --steps 1 --out ict.npz && tesserax eval --samples ict.npz --metrics fid_digits,accuracy
Runtime:  600 steps at 12-13 steps/s on 2 quiet CPU cores, under a minute (`tesserax demo
          --fewstep`, 2026-12-01).
Expected: in the default few-step demo (600 steps from its teacher): FID-digits 28.7 / 22.6 / 18.5
          at 1 / 2 / 4 steps, class accuracy 86.3 / 89.4 / 92.4% (README, "Few-step students").

`get_config("tiny")` is the test size.
"""
from tesserax.core import config as config_lib
from tesserax.objectives import ict

ARGS = ("tiny",)


def get_config(arg=None):
  config = config_lib.load("digits_dit:tiny" if arg == "tiny" else "digits_dit")
  if arg != "tiny":
    config.num_steps = 600  # from the teacher's weights: the few-step demo's length
  config.teacher = dict(workdir="workdirs/digits", init_student=True)
  config.objective = ict.defaults()
  config.optim.update(lr=1e-4, warmup_steps=0, schedule="constant")
  config.sample.update(solver="consistency", num_steps=1, sigmas=(80.0, 0.821), sigma_min=0.002)
  return config
