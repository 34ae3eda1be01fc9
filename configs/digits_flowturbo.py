"""FlowTurbo's velocity refiner for the digits flow model (16x16, 1 channel), on CPU: the
digits demo's DiT (configs/digits_dit.py) at depth 1, its patch embedding taking [x | v] (2
channels), trained against the frozen teacher (objectives/flowturbo.py; shiml20/FlowTurbo's
refiner is its SiT-XL/2 at depth 1, dt ~ U[0, 0.12]). The official recipe (AdamW, lr 5e-5,
batch 18, ~30k steps) is scaled to the digits demo: lr 1e-3 with the demo's schedule, batch 64, 600 steps.
Sampled with H1 P3 R4 (sampling/flowturbo_sampler.py: 5 teacher evaluations over 8 steps).

Launch:   tesserax train --config digits_dit --workdir workdirs/digits
          tesserax train --config digits_flowturbo --workdir workdirs/digits_flowturbo \
              --config.teacher.workdir=workdirs/digits
          tesserax sample --workdir workdirs/digits_flowturbo --num 1000 --sampler flowturbo \
              --steps 8 --sample.heun_steps=1 --sample.refine_steps=4 --out ft.npz
Runtime:  about 6 minutes for 600 steps on the shared, loaded 2-core machine.
Expected: measured once (1,000 samples, FID-digits / accuracy): H1P2R2 (4 NFE) 26.8 / 95.2%,
          H2P4R3 (8 NFE) 20.2 / 94.5%; the teacher's Heun 29.9 / 22.5 and Euler 22.1 / 17.8
          at 4 / 8 NFE. The refiner steps help the H/P mix, but on this teacher the trained
          refiner is no better than a zero one (README).

`get_config("tiny")` is the test size.
"""
from tesserax.core import config as config_lib

ARGS = ("tiny",)


def get_config(arg=None):
  config = config_lib.load("digits_dit:tiny" if arg == "tiny" else "digits_dit")
  config.teacher = dict(workdir="", init_student=False)
  config.model.update(in_channels=2 * config.model.in_channels, depth=1)
  config.objective = dict(name="flowturbo", max_dt=0.12)
  config.sample.update(solver="flowturbo", num_steps=8, heun_steps=1, refine_steps=4)
  if arg != "tiny":
    config.num_steps = 600  # the few-step demo's length
  return config
