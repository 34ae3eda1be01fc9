"""Class-conditional MeanFlow on scikit-learn's digits (16x16, 1 channel), on CPU: the digits
demo's DiT (configs/digits_dit.py: width 128, 4 blocks, patch 4, optimizer, EMA) with a second
time input for h = t - r, trained with the MeanFlow objective (objectives/meanflow.py): t, r
logit-normal(-0.4, 1.0), 75% of the batch r = t, adaptive weight p = 1 (the official
settings). Two departures, because the student starts from the few-step demo's teacher: times
on the teacher's scale (time_scale 1000, where Gsunshine/meanflow feeds them raw), and no
guidance folded into the target (omega 1, kappa 0), as the teacher samples unguided; the
official ImageNet recipe's omega 1, kappa 0.5 gives nearly perfectly classified, undiverse
digits (FID-digits 101.8 at 1 jump). Sampled with one flow-map jump.

Launch:   tesserax train --config digits_meanflow --workdir workdirs/digits_meanflow
          tesserax sample --workdir workdirs/digits_meanflow --num 1000 --sampler flow_map \
              --steps 1 --out mf.npz && tesserax eval --samples mf.npz --metrics fid_digits,accuracy
Runtime:  not measured yet: a MeanFlow step costs a forward-mode JVP and one guidance pass on
          top of a flow-matching step (the pixel demo's 2,000 flow steps take ~3.4 minutes).
Expected: not measured yet; the target is 1-jump FID-digits within 1.5x of the flow model's
          32-step value (README, "The demo").

`get_config("tiny")` is the test size.
"""
from tesserax.core import config as config_lib

ARGS = ("tiny",)


def get_config(arg=None):
  config = config_lib.load("digits_dit:tiny" if arg == "tiny" else "digits_dit")
  if arg != "tiny":
    config.num_steps = 600  # from the teacher's weights: the few-step demo's length
  config.model.update(second_time=True)  # time_scale stays the teacher's 1000
  config.objective = dict(name="meanflow", time_mean=-0.4, time_std=1.0, data_proportion=0.75,
                          adaptive_p=1.0, adaptive_eps=0.01, cfg_omega=1.0, cfg_kappa=0.0,
                          cfg_interval=(0.0, 1.0))
  config.sample.update(solver="flow_map", num_steps=1)
  return config
