"""SlimFlow on scikit-learn's digits (16x16, 1 channel), on CPU: a one-step student a quarter
the size of the digits flow model (width 64, 332k parameters, against the teacher's width 128,
1.28M), trained in SlimFlow's two stages (objectives/slimflow.py; yuanzhi-zhu/SlimFlow):

1. annealing reflow (`get_config()`): from scratch, on pairs drawn from the teacher inside
   each step (4 Heun steps, to keep the CPU run short; or a pair cache's), the coupling
   annealed from independent noise to the teacher's pairs over the first half of the run;
2. flow-guided distillation (`get_config("distill")`): from the stage-1 student, which is also
   the flow-guidance teacher; the pairs then come from that student's own 4-step ODE (the
   paper takes them from the big teacher; a pair cache is checked against the run's teacher,
   so a cache of the big teacher is refused here).
Sampled with one Euler step.

Launch:   tesserax train --config digits_dit --workdir workdirs/digits
          tesserax train --config digits_slimflow --workdir workdirs/digits_slimflow \
              --config.teacher.workdir=workdirs/digits
          tesserax train --config digits_slimflow:distill --workdir workdirs/digits_slimflow2 \
              --config.teacher.workdir=workdirs/digits_slimflow
Runtime:  stage 1 about 20 minutes (600 steps, 8 teacher evaluations each), stage 2 about 6,
          on the shared, loaded 2-core machine.
Expected: measured once: not digits yet at this length (1-step FID-digits 520.7 after stage 1,
          284.7 after stage 2, accuracy 12%); the paper trains its students 500k iterations.

`get_config("tiny")` is the test size (stage 1).
"""
from tesserax.core import config as config_lib

ARGS = ("tiny", "distill")


def get_config(arg=None):
  config = config_lib.load("digits_dit:tiny" if arg == "tiny" else "digits_dit")
  config.teacher = dict(workdir="", init_student=False, pairs_workdir="")
  config.objective = dict(name="slimflow", anneal_steps=config.num_steps // 2,
                          time_sampling="uniform", loss="mse", perceptual="", flow_guidance=False,
                          h_flip=False, online_steps=4, online_solver="heun",
                          online_cfg_scale=1.0)
  config.sample.update(solver="euler", num_steps=1)
  if arg == "tiny":
    config.objective.online_steps = 2
    return config
  config.num_steps = 600  # the few-step demo's length
  config.objective.anneal_steps = config.num_steps // 2
  config.model.update(hidden_size=64, num_heads=2)
  if arg == "distill":
    config.teacher.init_student = True
    config.optim.warmup_steps = 0
    config.objective.update(anneal_steps=0, time_sampling="one_step", flow_guidance=True)
  return config
