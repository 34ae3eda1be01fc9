"""`tesserax demo --fewstep`: few-step students of the digits demo's rectified-flow DiT.

The teacher is the pixel demo's model (configs/digits_dit.py), trained in WORKDIR/teacher
unless `--teacher` names a finished run of it. Every student recipe in STUDENTS (by default
DEFAULT_STUDENTS) then starts from the teacher's parameters
(`teacher.init_student`; leaves the teacher lacks, such as a second time input, start fresh;
FlowTurbo's refiner and SlimFlow's smaller student start from scratch), sees the teacher in its
objective context where it distils, and trains in WORKDIR/students/NAME. All models sample the same labels from the same noise and
are scored by the digits feature network. A student that trains on a pair cache (2-RF++,
SlimFlow) first has the teacher write it to WORKDIR/pairs with the recipe's pair solver
(`tesserax pairs`). A two-stage student (SlimFlow) then trains its second recipe in
WORKDIR/students/NAME/distill from the first stage, which is also its teacher there, on the same
cache (`teacher.pairs_workdir` the demo's teacher); the second stage is the one scored.
Writes to the workdir:
  fewstep.json   FID-digits and class accuracy: the teacher with every flow solver at NFE
                 1-32, each student at NFE 1, 2 and 4, and the real-data floor;
  fewstep.png    the same figures against NFE, one curve per model and solver;
  fewstep.md     the table.
Each stage resumes or is skipped when its run is finished; a preempted stage stops the demo
(its checkpoint saved) and the same command resumes it.
"""
import json
import os
from typing import NamedTuple

import jax
import numpy as np

import tesserax.tasks  # noqa: F401  (registers the built-in tasks, objectives and samplers)
from tesserax.core import config as config_lib, files
from tesserax.demos import demo
from tesserax.eval import evaluators
from tesserax.tasks import diffusion

TEACHER_NFE = (1, 2, 4, 8, 16, 32)
STUDENT_NFE = (1, 2, 4)


class Solver(NamedTuple):
  """A sampler setting of the sweep: `solver` at `steps(nfe)` steps (None: not at that NFE)."""
  solver: str
  steps: object = lambda nfe: nfe


TEACHER_SOLVERS = {
    "euler": Solver("euler"),
    "heun": Solver("heun", lambda nfe: nfe // 2 if nfe % 2 == 0 else None),
    "dpm_solver_2m": Solver("dpm_solver_2m"),
    "unipc": Solver("unipc"),
}


class Student(NamedTuple):
  """A student recipe in configs/ and its sample settings at each NFE (overrides of the
  recipe's `sample` section); `pairs` > 0 trains it on a cache of that many teacher pairs;
  `distill` names the recipe of a second stage trained from the first; `variants` are more
  samplers scored as rows NAME/VARIANT ({variant: {nfe: overrides}})."""
  recipe: str
  settings: dict
  pairs: int = 0
  distill: str = ""
  variants: dict = {}


def _jumps(nfe):
  return {"num_steps": nfe}


def _flowturbo(nfe):
  """FlowTurbo's step mix H1 P(nfe-2) R2 (one Heun step, pseudo-corrector steps reusing the
  last velocity, two refiner steps): nfe + 1 grid steps for nfe evaluations."""
  return {"num_steps": nfe + 1, "heun_steps": 1, "refine_steps": 2}


def _consistency(nfe):
  """Multistep consistency sampling: ECT's CIFAR-10 mid-point 0.821 for two steps, and for
  four the ImageNet-64 one (1.526) plus a lower level of our choosing (0.3)."""
  sigmas = {1: (80.0,), 2: (80.0, 0.821), 4: (80.0, 1.526, 0.821, 0.3)}[nfe]
  return {"num_steps": nfe, "sigmas": sigmas}


STUDENTS = {
    "ect": Student("digits_ect", {n: _consistency(n) for n in STUDENT_NFE}),
    "ict": Student("digits_ict", {n: _consistency(n) for n in STUDENT_NFE}),
    "cd": Student("digits_cd", {n: _consistency(n) for n in STUDENT_NFE}),
    "meanflow": Student("digits_meanflow", {n: _jumps(n) for n in STUDENT_NFE}),
    "shortcut": Student("digits_shortcut", {n: _jumps(n) for n in STUDENT_NFE}),
    "scd": Student("digits_scm", {n: {"num_steps": n} for n in (1, 2)}),
    "ctm": Student("digits_ctm", {n: _consistency(n) for n in STUDENT_NFE}),
    "flowturbo": Student("digits_flowturbo", {n: _flowturbo(n) for n in (2, 4)}),
    "slimflow": Student("digits_slimflow", {n: _jumps(n) for n in STUDENT_NFE}, pairs=4000,
                        distill="digits_slimflow:distill"),
    # 4,000 pairs of 16 Heun steps: about 30 s of sampling on 2 CPU cores. Also sampled with
    # 2-RF++'s re-anchoring sampler at 4 NFE (at 1 and 2 steps it is the Euler sampler).
    "2rfpp": Student("digits_reflow", {n: _jumps(n) for n in STUDENT_NFE}, pairs=4000,
                     variants={"new": {4: {"solver": "reflow_new", "num_steps": 4}}}),
}
# The default run: every consistency, flow-map and straightened student the issues name. Named
# only (--students ctm,flowturbo): CTM (barely moves from the teacher at one step in 600 steps)
# and FlowTurbo's refiner (2 and 4 NFE only).
DEFAULT_STUDENTS = ("ect", "ict", "cd", "scd", "meanflow", "shortcut", "2rfpp", "slimflow")


def run(workdir: str, teacher_workdir: str | None = None, students=DEFAULT_STUDENTS,
        overrides=None, size: str = "", teacher_nfe=TEACHER_NFE) -> dict | None:
  """Train (or resume) the teacher and `students`, score them all; None if preempted.
  `overrides` ({"KEY": "VALUE"}, the command's --config.KEY=VALUE) apply to every student;
  `size` "tiny" runs every recipe at its test size."""
  recipe = lambda name: f"{name}:{size}" if size else name
  def load(name):
    config = config_lib.load(name)
    config_lib.apply_overrides(config, overrides or {})
    config_lib.validate(config)
    return config

  configs = {name: load(recipe(STUDENTS[name].recipe)) for name in students}
  if teacher_workdir is None:
    teacher_workdir = os.path.join(workdir, "teacher")
    teacher_config = config_lib.load(recipe("digits_dit"))
    if demo._train(teacher_config, teacher_workdir) is None:
      return None
  from tesserax.training import task as task_lib
  teacher_task, teacher_state = task_lib.load_workdir(teacher_workdir)
  c = teacher_task.config
  digits = c.evals.digits
  score = evaluators.digits_scorer(c.data.resolution)
  labels = np.arange(digits.num_samples, dtype=np.int32) % c.model.num_classes
  key = jax.random.PRNGKey(c.seed + 1)

  def score_at(task, params, name, nfe, settings):
    images = task.predict["generate"](params, labels, key, settings,
                                      batch_size=digits.batch_size)
    results["models"].setdefault(name, {})[str(nfe)] = score(images, labels)
    demo._print_row(name, nfe, results["models"][name][str(nfe)])

  from tesserax.data import pipeline
  train_images, train_labels = pipeline.load_split(pipeline.image_config(c.data), "train")
  results = {"floor": score(train_images, train_labels), "num_samples": digits.num_samples,
             "teacher": teacher_workdir, "models": {}}
  for solver, entry in TEACHER_SOLVERS.items():
    for nfe in teacher_nfe:
      if entry.steps(nfe) is not None:
        score_at(teacher_task, teacher_state["ema"], f"teacher/{solver}", nfe,
                 demo.sweep_settings(entry.solver, entry.steps(nfe), 1.0))
  for name, config in configs.items():
    init_student = config.teacher.init_student if "teacher" in config else True
    config.teacher = dict(workdir=os.path.abspath(teacher_workdir), init_student=init_student)
    config.data.data_dir = c.data.data_dir
    if STUDENTS[name].pairs:
      num_pairs = config.batch_size if size else STUDENTS[name].pairs
      config.data.update(name="pairs",
                         data_dir=write_pairs(teacher_workdir, workdir, config, num_pairs))
    student_dir = os.path.join(workdir, "students", name)
    trained = demo._train(config, student_dir)
    if trained is not None and STUDENTS[name].distill:
      stage2 = load(STUDENTS[name].distill + ("_tiny" if size else ""))
      stage2.teacher.update(workdir=os.path.abspath(student_dir),
                            pairs_workdir=os.path.abspath(teacher_workdir))
      stage2.data = config.data
      trained = demo._train(stage2, os.path.join(student_dir, "distill"))
    if trained is None:
      return None
    task, state = trained
    rows = {name: STUDENTS[name].settings}
    rows.update({f"{name}/{variant}": per_nfe
                 for variant, per_nfe in STUDENTS[name].variants.items()})
    for row, per_nfe in rows.items():
      for nfe, sample_overrides in per_nfe.items():
        settings = config.sample.copy_and_resolve_references()
        settings.update(sample_overrides)
        score_at(task, state["ema"], row, nfe, settings)
  if jax.process_index() == 0:
    with files.atomic_output(os.path.join(workdir, "fewstep.json")) as tmp, open(tmp, "w") as f:
      json.dump(results, f, indent=2)
    with files.atomic_output(os.path.join(workdir, "fewstep.png")) as tmp:
      demo.plot_nfe(results["models"], results["floor"], tmp)
    with files.atomic_output(os.path.join(workdir, "fewstep.md")) as tmp, open(tmp, "w") as f:
      f.write(table(results))
    print(table(results))
    print(f"wrote {workdir}/fewstep.json, fewstep.png and fewstep.md")
  return results


def write_pairs(teacher_workdir, workdir, config, num_pairs):
  """WORKDIR/pairs: `num_pairs` teacher pairs made with the student recipe's pair solver
  (objective.online_solver, online_steps, online_cfg_scale, which its run checks). A complete
  cache is kept, an interrupted one resumed."""
  o = config.objective
  return diffusion.write_pairs(teacher_workdir, os.path.join(workdir, "pairs"), num_pairs,
                               solver=o.online_solver, num_steps=o.online_steps,
                               cfg_scale=o.online_cfg_scale)


def table(results: dict) -> str:
  """A markdown table: one row per model and solver, FID-digits / accuracy per NFE."""
  nfes = sorted({int(n) for runs in results["models"].values() for n in runs})
  lines = ["| model | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
           "|---|" + "---|" * len(nfes)]
  for name, runs in results["models"].items():
    cells = [f"{runs[str(n)]['fid']:.1f} / {100 * runs[str(n)]['accuracy']:.1f}%"
             if str(n) in runs else "–" for n in nfes]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  floor = results["floor"]
  lines.append(f"| real-data floor | {floor['fid']:.1f} / {100 * floor['accuracy']:.1f}% |"
               + " |" * (len(nfes) - 1))
  return "\n".join(lines) + "\n\nCells: FID-digits / class accuracy.\n"
