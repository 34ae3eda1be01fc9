"""Continuous-time consistency distillation, sCD (objectives/scm.py), of the digits demo's
rectified-flow DiT (configs/digits_dit.py, trained first into workdirs/digits): the student is
the same network read in TrigFlow, started from the teacher's weights, plus a zero-initialised
log-variance head (model.logvar_head) for the adaptive weighting. CIFAR-10 settings: sigma_data
0.5, log-normal (-1.0, 1.4), tangent normalisation c = 0.1, prior weight 1 / (sigma_d tan t);
the tangent warm-up is a quarter of the run (the paper: 10k steps). `sct` is consistency
training with the same settings (no teacher in the loss). Sampled with sCM's sampler: one step
from sigma 80, --steps 2 through tau = 1.1.

Launch:   tesserax train --config digits_scm --workdir workdirs/digits_scm \
              [--config.teacher.workdir=workdirs/digits] [--config.objective.name=sct]
          tesserax sample --workdir workdirs/digits_scm --num 1000 --sampler scm \
              --steps 2 --out scm.npz && tesserax eval --samples scm.npz --metrics fid_digits,accuracy
Runtime:  600 steps at about 10 steps/s on 2 quiet CPU cores, under a minute (`tesserax demo
          --fewstep`, 2026-12-01).
Expected: in the default few-step demo (600 steps from its teacher): FID-digits 103.9 / 34.6 at 1 /
          2 steps, class accuracy 91.4 / 94.9% (README, "Few-step students").

`get_config("tiny")` is the test size.
"""
from tesserax.core import config as config_lib
from tesserax.objectives import scm

ARGS = ("tiny",)


def get_config(arg=None):
  config = config_lib.load("digits_dit:tiny" if arg == "tiny" else "digits_dit")
  if arg != "tiny":
    config.num_steps = 600  # from the teacher's weights: the few-step demo's length
  config.teacher = dict(workdir="workdirs/digits", init_student=True)
  config.model.logvar_head = True
  config.objective = scm.defaults("scd", warmup_steps=max(1, config.num_steps // 4))
  config.optim.update(lr=1e-4, warmup_steps=0, schedule="constant")
  config.sample.update(solver="scm", num_steps=1, sigma_max=80.0, mid_angles=(1.1,),
                       sigma_data=0.5)
  return config
