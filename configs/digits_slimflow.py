"""SlimFlow on scikit-learn's digits (16x16, 1 channel), on CPU: a one-step student a quarter
the size of the digits flow model (width 64, 332k parameters, against the teacher's width 128,
1.28M), trained in SlimFlow's two stages (objectives/slimflow.py; yuanzhi-zhu/SlimFlow):

1. annealing reflow (`get_config()`, 1,500 steps): from scratch, on the big teacher's pairs
   (16 Heun steps: the 2-RF++ recipe's, so the two share a cache; drawn inside each step
   without one, 32 teacher evaluations a step), the coupling annealed from independent noise
   to the teacher's pairs over the first half of the run;
2. flow-guided distillation (`get_config("distill")`, 1,000 steps): from the stage-1 student,
   which is also the flow-guidance teacher, on the big teacher's pairs as the paper does
   (`teacher.pairs_workdir` names the model that made the cache).
Sampled with one Euler step.

Launch:   tesserax train --config digits_dit --workdir workdirs/digits
          tesserax pairs --workdir workdirs/digits --out workdirs/digits_pairs --num 4000
          tesserax train --config digits_slimflow --workdir workdirs/digits_slimflow \
              --config.teacher.workdir=workdirs/digits \
              --config.data.name=pairs --config.data.data_dir=workdirs/digits_pairs
          tesserax train --config digits_slimflow:distill --workdir workdirs/digits_slimflow2 \
              --config.teacher.workdir=workdirs/digits_slimflow \
              --config.teacher.pairs_workdir=workdirs/digits \
              --config.data.name=pairs --config.data.data_dir=workdirs/digits_pairs
          (`tesserax demo --fewstep` runs all of it beside the other students)
Runtime:  on the cache, stage 1 about 100 s and stage 2 about 110 s on 2 CPU cores.
Expected: 1-NFE FID-digits 139.4 / 72.5% accuracy after stage 1, 47.6 / 88.8% after stage 2
          (the teacher: 111.4 at one Euler step, 15.7 at 32; README, "Few-step students").

`get_config("tiny")` and `get_config("distill_tiny")` are the test sizes.
"""
from tesserax.core import config as config_lib

ARGS = ("tiny", "distill", "distill_tiny")


def get_config(arg=None):
  tiny = arg in ("tiny", "distill_tiny")
  config = config_lib.load("digits_dit:tiny" if tiny else "digits_dit")
  config.teacher = dict(workdir="", init_student=False, pairs_workdir="")
  config.objective = dict(name="slimflow", anneal_steps=config.num_steps // 2,
                          time_sampling="uniform", loss="mse", perceptual="", flow_guidance=False,
                          h_flip=False, online_steps=2 if tiny else 16, online_solver="heun",
                          online_cfg_scale=1.0)
  config.sample.update(solver="euler", num_steps=1)
  if not tiny:
    config.num_steps = 1500
    config.objective.anneal_steps = config.num_steps // 2
    config.model.update(hidden_size=64, num_heads=2)
  if arg in ("distill", "distill_tiny"):
    config.num_steps = config.num_steps if tiny else 1000
    config.teacher.init_student = True
    config.optim.warmup_steps = 0
    config.objective.update(anneal_steps=0, time_sampling="one_step", flow_guidance=True)
  return config
