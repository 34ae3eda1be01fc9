"""2-rectified flow++ on scikit-learn's digits (16x16, 1 channel), on CPU: the digits demo's DiT
(configs/digits_dit.py) retrained as a 2-RF on the coupling of the trained digits flow model,
starting from its weights (`teacher.init_student`), with 2-RF++'s U-shaped timesteps (a = 4)
and the pseudo-Huber premetric (objectives/reflow.py). The LPIPS-Huber premetric
(`--config.objective.loss=lpips_huber --config.objective.perceptual=digits_net`) reads the
digits network's head-free LPIPS offline (`lpips` at ImageNet scale). Sampled with one Euler
step, or with 2-RF++'s re-anchoring sampler (`reflow_new`).

Pairs: `objective.online_solver`, `online_steps` and `online_cfg_scale` name the teacher's ODE
(16 Heun steps, no guidance). By default the pairs are drawn from it inside each step (the
objective's online mode). With a pair cache (`tesserax pairs`, data/pairs.py), the dataset
`pairs` serves them instead: `--config.data.name=pairs --config.data.data_dir=CACHE`; the run
refuses, in one line, a cache that the teacher (its workdir and checkpoint step) did not make
with that solver, or of another sample shape.

Launch:   tesserax train --config digits_dit --workdir workdirs/digits
          tesserax train --config digits_reflow --workdir workdirs/digits_reflow \
              --config.teacher.workdir=workdirs/digits
  cached: tesserax pairs --workdir workdirs/digits --out workdirs/digits_pairs --num 4000
          tesserax train --config digits_reflow --workdir workdirs/digits_reflow \
              --config.teacher.workdir=workdirs/digits \
              --config.data.name=pairs --config.data.data_dir=workdirs/digits_pairs
Runtime:  online: not measured; each step adds 32 teacher evaluations (16 Heun steps) of the
          batch. Cached: 4,000 pairs in 26 s, then 1,000 steps in about 2.5 minutes on the
          shared 2-core machine (`tesserax demo --fewstep --students 2rfpp` runs both stages).
Expected: measured on the cache (the demo's 2rfpp student): 1-step FID-digits 18.3, accuracy
          94.8% (2 steps 17.5, 4 steps 17.1) against the teacher's 15.7 at 32 Euler steps
          (1.17x) and 111.4 at one; 2,000 steps gave 17.6 (1.12x), 17.0, 16.8.

`get_config("tiny")` is the test size.
"""
from tesserax.core import config as config_lib

ARGS = ("tiny",)


def get_config(arg=None):
  config = config_lib.load("digits_dit:tiny" if arg == "tiny" else "digits_dit")
  config.teacher = dict(workdir="", init_student=True)
  config.objective = dict(name="reflow", time_sampling="u_shaped", u_shape_a=4.0, loss="huber",
                          lpips_divt=False, perceptual="", online_steps=16,
                          online_solver="heun", online_cfg_scale=1.0)
  config.optim.warmup_steps = 0
  config.sample.update(solver="euler", num_steps=1)
  if arg != "tiny":
    config.num_steps = 1000  # from the teacher's weights
  if arg == "tiny":
    config.objective.online_steps = 2
  return config
