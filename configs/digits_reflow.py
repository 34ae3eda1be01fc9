"""2-rectified flow++ on scikit-learn's digits (16x16, 1 channel), on CPU: the digits demo's DiT
(configs/digits_dit.py) retrained as a 2-RF on the coupling of the trained digits flow model,
starting from its weights (`teacher.init_student`), with 2-RF++'s U-shaped timesteps (a = 4)
and the pseudo-Huber premetric (objectives/reflow.py). Pairs come from the teacher inside each
step (16 Heun steps, the objective's online mode) unless the batch carries them from a pair
cache (data/pairs.py). The LPIPS-Huber premetric (`--config.objective.loss=lpips_huber`) needs
a feature network handed to the objective (the digits network offline). Sampled with one
Euler step, or with 2-RF++'s re-anchoring sampler (`reflow_new`).

Launch:   tesserax train --config digits_dit --workdir workdirs/digits
          tesserax train --config digits_reflow --workdir workdirs/digits_reflow \
              --config.teacher.workdir=workdirs/digits
Runtime:  not measured yet: each step adds 32 teacher evaluations (16 Heun steps) of the batch.
Expected: not measured yet; the target is 1-step FID-digits within 1.5x of the teacher's
          32-step value (README, "The demo").

`get_config("tiny")` is the test size.
"""
from tesserax.core import config as config_lib

ARGS = ("tiny",)


def get_config(arg=None):
  config = config_lib.load("digits_dit:tiny" if arg == "tiny" else "digits_dit")
  config.teacher = dict(workdir="", init_student=True)
  config.objective = dict(name="reflow", time_sampling="u_shaped", u_shape_a=4.0, loss="huber",
                          lpips_divt=False, online_steps=16, online_solver="heun",
                          online_cfg_scale=1.0)
  config.optim.warmup_steps = 0
  config.sample.update(solver="euler", num_steps=1)
  if arg == "tiny":
    config.objective.online_steps = 2
  return config
