"""The `tesserax` command.

  tesserax demo   [--latent | --fewstep | --tokens | --flextok] [--workdir DIR] [--config.KEY=VALUE ...]
  tesserax train  --config NAME_OR_PATH[:ARG] --workdir DIR [--init_from DIR] [--config.KEY=VALUE ...]
  tesserax sample --workdir DIR --num N [--sampler NAME] [--steps K] [--cfg S]
                  [--interval LO HI] [--guided_channels K] [--sample.KEY=VALUE ...]
                  [--tokenizer DIR] --out FILE.npz
  tesserax pairs  --workdir DIR --out CACHE --num N [--solver NAME] [--steps K] [--cfg_scale S]
                  [--seed S] [--batch_size B]
  tesserax eval   --samples FILE.npz|DIR [--ref REF.npz] --metrics fid,sfid,is,pr,fd_dinov2
  tesserax eval   --samples FILE.npz --metrics fid_digits,accuracy
  tesserax reconstruct --tokenizer DIR --data FOLDER|NAME [--split S] [--resolution R] [--num N]
                       [--tokens K] [--steps S] [--guidance_scale G] [--guidance apg|cfg] --out DIR
  tesserax eval-recon --originals FILE|DIR --reconstructions FILE|DIR [--metrics rfid,psnr,ssim,lpips]
  tesserax eval-recon --tokenizer DIR --data FOLDER|NAME [--split S] [--resolution R] [--num N]
                      [--tokens K1,K2,..] [--steps S] [--guidance_scale G] [--guidance apg|cfg]
                      [--metrics rfid,psnr,ssim,lpips]
  tesserax data build NAME [--manual_dir DIR] [--data_dir DIR] [--resolution R]
  tesserax data reference NAME --split S --resolution R --out REF.npz
  tesserax data encode NAME --tokenizer DIR --out CACHE [--splits train] [--resolution R]
  tesserax weights fetch NAME
  tesserax convert --kind KIND --src OFFICIAL_FILE --out DIR [--stats latents_stats.pt] [--export]

Bad input ends with one line, `error: ...`, and exit status 2.
"""
import argparse
import json
import os
import sys

from tesserax.core import host
from tesserax.core.errors import TesseraxError

IMAGE_DATASETS = ("digits", "image_folder", "imagenet2012")
MULTIHOST_HELP = ("multi-host: on TPU pods and SLURM the processes find each other automatically; "
                  "otherwise pass --coordinator_address HOST:PORT --num_processes N --process_id I "
                  "to every process")


def _add_distributed_flags(parser):
  group = parser.add_argument_group("multi-host", MULTIHOST_HELP)
  group.add_argument("--coordinator_address", default=None, help="HOST:PORT of process 0")
  group.add_argument("--num_processes", type=int, default=None)
  group.add_argument("--process_id", type=int, default=None)


def _split_overrides(argv, prefix):
  """Separate `--PREFIX.KEY=VALUE` / `--PREFIX.KEY VALUE` from the other arguments."""
  overrides, rest, i = {}, [], 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith(f"--{prefix}."):
      key, eq, value = arg[len(prefix) + 3:].partition("=")
      if not eq:
        if i + 1 >= len(argv):
          raise TesseraxError(f"{arg} needs a value")
        value, i = argv[i + 1], i + 1
      overrides[key] = value
    else:
      rest.append(arg)
    i += 1
  return overrides, rest


def _parser():
  from tesserax.core import registry
  import tesserax.convert  # noqa: F401  (registers every built-in entry, converters included)
  parser = argparse.ArgumentParser(
      prog="tesserax", description="JAX/Flax generative image modelling: train, sample, evaluate.",
      epilog="train and demo take --config.KEY=VALUE overrides of the recipe; sample takes "
             "--sample.KEY=VALUE overrides of the workdir's sample settings.")
  sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

  demo = sub.add_parser(
      "demo", help="train a class-conditional rectified-flow DiT on digits and evaluate it",
      description="Trains configs/digits_dit.py on CPU (a few minutes), then samples with Euler "
                  "and Heun at NFE 1-32 and writes samples_grid.png and metrics.json (FID-digits, "
                  "class accuracy, the real-data floor) to the workdir. Run again, it resumes. "
                  "With --latent: trains the digits KL autoencoder (configs/digits_kl.py, the "
                  "VA-VAE loss), reports PSNR and FID-digits of its reconstructions, encodes "
                  "digits into a latent cache and trains and evaluates the DiT on it "
                  "(configs/digits_latent_dit.py); --config.* overrides then apply to the DiT.")
  demo.add_argument("--workdir", default=None,
                    help="default workdirs/demo (workdirs/demo_latent with --latent)")
  demo.add_argument("--latent", action="store_true",
                    help="the latent pipeline: tokenizer, latent cache, latent DiT")
  demo.add_argument("--fewstep", action="store_true",
                    help="few-step students of the demo's DiT (demos/fewstep.py): each student "
                         "recipe starts from the teacher; FID-digits and accuracy at 1, 2, 4 NFE "
                         "beside the teacher's solvers at 1-32 NFE (default workdir "
                         "workdirs/demo_fewstep)")
  demo.add_argument("--tokens", action="store_true",
                    help="1D tokens (demos/tokens.py): digits TiToks with 2-16 tokens, their "
                         "reconstruction PSNR / FID-digits, a token cache and a MaskGIT "
                         "generator scored at 2-16 steps (default workdir workdirs/demo_tokens)")
  demo.add_argument("--flextok", action="store_true",
                    help="flexible-length tokens (demos/flextok_demo.py): a digits FlexTok trained "
                         "end to end, its reconstructions from 1-16 tokens (PSNR / FID-digits "
                         "per K), a token cache and an autoregressive generator scored per K "
                         "(default workdir workdirs/demo_flextok)")
  demo.add_argument("--teacher", default=None,
                    help="with --fewstep: a finished `tesserax demo` workdir to use as the "
                         "teacher (default: train one in WORKDIR/teacher)")
  demo.add_argument("--students", default=None,
                    help="with --fewstep: comma-separated student names (default: every one "
                         "of demos/fewstep.py DEFAULT_STUDENTS: ect, ict, cd, scd, meanflow, "
                         "shortcut, 2rfpp, slimflow; ctm and flowturbo run when named)")

  train = sub.add_parser("train", help="train a recipe",
                         description="Train a recipe from configs/; resumes from the workdir's "
                                     "latest checkpoint, else --init_from, else from scratch.")
  train.add_argument("--config", required=True,
                     help="a file in configs/ (e.g. digits_dit) or a path, optionally :ARG")
  train.add_argument("--workdir", required=True)
  train.add_argument("--init_from", default=None,
                     help="a checkpoints/ directory whose latest params and EMA start the run")
  _add_distributed_flags(train)

  sample = sub.add_parser(
      "sample", help="sample from a trained workdir into an ADM-style .npz",
      description="Writes arr_0 (uint8 NHWC images) and arr_1 (labels). The sampler settings "
                  "are the flags below (default: euler, 32 steps, no shift, no guidance); any "
                  "key of the sample config can also be set as --sample.KEY=VALUE (solver, "
                  "num_steps, shift, cfg_scale, interval, guided_channels, "
                  "final_correction), and a flag given explicitly wins. A sampler that needs "
                  "another prediction than the model gives is refused in one line.")
  sample.add_argument("--workdir", required=True)
  sample.add_argument("--num", type=int, required=True, help="number of samples")
  sample.add_argument("--sampler", default=None, choices=registry.SAMPLERS.names(),
                      help="flow solvers euler, heun (velocity); ddpm (ancestral) and ddim "
                           "(eta 0) for DDPM models (epsilon: a converted DiT, whose published "
                           "setting is ddpm 250)")
  sample.add_argument("--steps", type=int, default=None, help="solver steps (Heun: 2 NFE "
                      "each; ddpm/ddim: respaced steps of the 1000; default 32)")
  sample.add_argument("--shift", type=float, default=None, help="timestep shift s (SD3 form)")
  sample.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale")
  sample.add_argument("--guided_channels", type=int, default=None, metavar="K",
                      help="guide only the first K output channels, the official DiT and "
                           "LightningDiT behaviour (K=3) behind their published FIDs; default: "
                           "all channels")
  sample.add_argument("--interval", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                      help="guide only for t in (LO, HI] (t = 1 is noise)")
  sample.add_argument("--label", type=int, default=None, help="one class for all samples "
                      "(default: classes in turn)")
  sample.add_argument("--seed", type=int, default=0)
  sample.add_argument("--raw", action="store_true", help="use the raw params, not the EMA")
  sample.add_argument("--tokenizer", default=None, metavar="DIR",
                      help="decode latent samples with this tokenizer directory (`tesserax "
                           "convert --kind vavae-f16d32|sd-vae-ft-ema ...`), for a model "
                           "without its latent cache, e.g. a converted DiT or LightningDiT")
  sample.add_argument("--out", required=True)
  _add_distributed_flags(sample)

  flow_solvers = [n for n in registry.SAMPLERS.names()
                  if registry.SAMPLERS.get(n).consumes == "velocity"]
  pair_cmd = sub.add_parser(
      "pairs", help="write a pair cache (noise, teacher sample) for reflow and distillation",
      description="Samples a trained flow model (its newest checkpoint's EMA parameters) from "
                  "normal noise with an ODE solver and writes the pairs (noise, sample, label) "
                  "to a pair cache (tfds/array_record) that reflow and SlimFlow recipes train "
                  "on with --config.data.name=pairs --config.data.data_dir=CACHE "
                  "--config.teacher.workdir=WORKDIR; that run refuses a cache its teacher did "
                  "not make with the recipe's objective.online_solver, online_steps and "
                  "online_cfg_scale. Pair i starts from the noise of fold_in(PRNGKey(seed), i) "
                  "with label i mod num_classes, so the cache depends on the seed only, not on "
                  "the devices, processes or batch size. A killed run resumes: run the same "
                  "command again (complete shards of 1,000 pairs are kept).")
  pair_cmd.add_argument("--workdir", required=True, metavar="DIR",
                        help="the teacher's training workdir (a model that predicts a velocity)")
  pair_cmd.add_argument("--out", required=True, metavar="CACHE",
                        help="the cache directory: new, or the one an interrupted run wrote")
  pair_cmd.add_argument("--num", type=int, required=True, metavar="N", help="number of pairs")
  pair_cmd.add_argument("--solver", default="heun", choices=flow_solvers, metavar="NAME",
                        help=f"ODE solver over the velocity: {', '.join(flow_solvers)} "
                             "(dpm_solver_*: DPM-Solver++; reflow_new*: 2-RF++'s re-anchoring "
                             "sampler; heun: 2 NFE a step); default heun")
  pair_cmd.add_argument("--steps", type=int, default=16, metavar="K",
                        help="solver steps on the plain time grid (default 16)")
  pair_cmd.add_argument("--cfg_scale", type=float, default=1.0, metavar="S",
                        help="classifier-free guidance scale (default 1: none)")
  pair_cmd.add_argument("--seed", type=int, default=0, help="the seed of the pairs' noise")
  pair_cmd.add_argument("--batch_size", type=int, default=64, metavar="B",
                        help="pairs sampled at once (split over this process's devices)")
  _add_distributed_flags(pair_cmd)

  evaluate = sub.add_parser(
      "eval", help="score samples against a reference batch",
      description="Inception FID, sFID, Inception Score, precision/recall (k=3) and FD-DINOv2 "
                  "against an ADM-format reference .npz (ADM-evaluator preprocessing), or for "
                  "digits samples FID-digits and class accuracy against the digits test split.")
  evaluate.add_argument("--samples", required=True, help="an ADM .npz (arr_0) or an image folder")
  evaluate.add_argument("--ref", default=None, help="reference .npz (arr_0, mu, sigma, mu_s, "
                        "sigma_s; mu_dinov2, sigma_dinov2 for fd_dinov2)")
  evaluate.add_argument("--metrics", default="fid,sfid,is,pr",
                        help="comma-separated: fid,sfid,is,pr,fd_dinov2 or fid_digits,accuracy")
  evaluate.add_argument("--num", type=int, default=None, help="use exactly this many samples")
  evaluate.add_argument("--preprocess", default="adm", choices=("adm", "pytorch_fid"),
                        help="Inception resize: ADM evaluator (TF1 bilinear) or pytorch-fid")
  evaluate.add_argument("--out", default=None, help="also write the results as JSON here")

  reconstruct = sub.add_parser(
      "reconstruct", help="reconstruct an evaluation set with a tokenizer into PNG pairs",
      description="Encodes each image to the posterior mean and decodes it, streaming in "
                  "batches; writes OUT/originals/NNNNN.png and OUT/reconstructions/NNNNN.png "
                  "(the same names, for `eval-recon --originals --reconstructions`) and "
                  "OUT/pairs.png, the first 16 pairs side by side. " + EVAL_SET_HELP)
  _add_eval_set_flags(reconstruct)
  _add_decode_flags(reconstruct, several=False)
  reconstruct.add_argument("--out", required=True, help="a new directory")

  recon = sub.add_parser(
      "eval-recon", help="score reconstructions against their originals",
      description="rFID, PSNR (uint8), SSIM (Gaussian window, sigma 1.5) and LPIPS (VGG) of "
                  "paired image sets in the same order (--originals --reconstructions), or of "
                  "a tokenizer's reconstructions of an evaluation set made on the fly, "
                  "streaming (--tokenizer --data). " + EVAL_SET_HELP)
  recon.add_argument("--originals", default=None, help="an .npz (arr_0) or an image folder")
  recon.add_argument("--reconstructions", default=None, help="the same, in the same order")
  _add_eval_set_flags(recon, required=False)
  _add_decode_flags(recon, several=True)
  recon.add_argument("--metrics", default="rfid,psnr,ssim,lpips")
  recon.add_argument("--out", default=None, help="also write the results as JSON here")

  convert = sub.add_parser(
      "convert", help="convert an official checkpoint into a tesserax directory",
      description="DiT-family kinds become a training workdir (config.json + checkpoints/0) "
                  "that `tesserax sample --workdir` samples from, with the model's time "
                  "convention wrapped at the boundary; VAE kinds become a tokenizer directory. "
                  "Every source key is used once; unknown, missing or misshapen keys are an "
                  "error that lists them. --export writes a DiT-family workdir back to the "
                  "official layout.")
  convert.add_argument("--kind", required=True, choices=registry.CONVERTERS.names())
  convert.add_argument("--src", required=True, help="the official file (.pt needs the torch "
                       "extra; .safetensors needs nothing)")
  convert.add_argument("--out", required=True, help="a new directory")
  convert.add_argument("--stats", default=None, help="VA-VAE latents_stats.pt (default: next "
                       "to --src)")
  convert.add_argument("--export", action="store_true",
                       help="the reverse: --src is a DiT-family workdir, --out the official "
                            "file (.safetensors, or .pt with torch)")

  from tesserax.backbones import weights
  weights_cmd = sub.add_parser("weights", help="official weights: evaluation networks, tokenizers")
  weights_sub = weights_cmd.add_subparsers(dest="weights_command", required=True, metavar="ACTION")
  fetch = weights_sub.add_parser(
      "fetch", help="download official weights and check their sha256",
      description="NAME is an evaluation backbone (inception, dinov2_vitl14, lpips_vgg; loaded "
                  "from the cache directory when needed) or a released tokenizer (vavae_f16d32 "
                  "with its latents_stats.pt, sd_vae_ft_ema, sd_vae_ft_mse; then `tesserax "
                  "convert --kind ... --src FILE`). Offline, the error says which file to place "
                  "in which directory.")
  fetch.add_argument("name", choices=tuple(weights.REGISTRY))
  fetch.add_argument("--dest", default=None, help="default $TESSERAX_CACHE or ~/.cache/tesserax")

  data = sub.add_parser("data", help="prepare datasets")
  data_sub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
  build = data_sub.add_parser("build", help="prepare a dataset (tfds, array_record)",
                              description="NAME is digits, image_folder or imagenet2012.")
  build.add_argument("name", choices=IMAGE_DATASETS)
  build.add_argument("--manual_dir", default=None,
                     help="image_folder: the root folder; imagenet2012: the ILSVRC2012 tars")
  build.add_argument("--data_dir", default="", help="default $TFDS_DATA_DIR or ~/tensorflow_datasets")
  build.add_argument("--resolution", type=int, default=None, help="image size (center crop)")
  ref = data_sub.add_parser("reference", help="Inception reference statistics of a split",
                            description="Writes an ADM-format .npz (arr_0 with --keep images, "
                                        "mu, sigma, mu_s, sigma_s; with --dinov2 also "
                                        "mu_dinov2, sigma_dinov2) of a prepared dataset split.")
  ref.add_argument("name", choices=IMAGE_DATASETS)
  ref.add_argument("--split", default="train")
  ref.add_argument("--resolution", type=int, required=True)
  ref.add_argument("--manual_dir", default="", help="image_folder: the folder it was built from")
  ref.add_argument("--data_dir", default="")
  ref.add_argument("--num", type=int, default=None, help="at most this many images")
  ref.add_argument("--keep", type=int, default=10000, help="images kept as arr_0 (for P/R)")
  ref.add_argument("--dinov2", action="store_true", help="also FD-DINOv2 statistics")
  ref.add_argument("--out", required=True)
  encode = data_sub.add_parser(
      "encode", help="encode a dataset into a latent cache",
      description="Encode a dataset once with a tokenizer into a latent cache (tfds/"
                  "array_record; each example with its horizontally flipped copy; per-channel "
                  "mean/std) that generators train on with --config.data.name=latents "
                  "--config.data.data_dir=CACHE.")
  encode.add_argument("name", choices=IMAGE_DATASETS)
  encode.add_argument("--tokenizer", required=True, help="a tokenizer directory (tesserax "
                      "convert)")
  encode.add_argument("--out", required=True, help="the cache directory")
  encode.add_argument("--splits", default="train", help="comma-separated splits to encode")
  encode.add_argument("--resolution", type=int, default=None,
                      help="image size (default: the tokenizer's)")
  encode.add_argument("--data_dir", default="")
  encode.add_argument("--manual_dir", default="", help="image_folder: the folder it was built "
                      "from")
  encode.add_argument("--batch_size", type=int, default=64)
  encode.add_argument("--seed", type=int, default=0)
  return parser


EVAL_SET_HELP = (
    "--data is an image folder (.png/.jpg/.jpeg, recursive, sorted; e.g. the extracted "
    "ImageNet val) read as the official VA-VAE evaluation reads it (torchvision Resize + "
    "CenterCrop to --resolution, default 256), or a prepared dataset (digits, imagenet2012) "
    "at --resolution, default the tokenizer's.")


def _add_eval_set_flags(parser, required=True):
  parser.add_argument("--tokenizer", required=required, help="a tokenizer directory (tesserax "
                      "convert)")
  parser.add_argument("--data", required=required, help="an image folder or a dataset name")
  parser.add_argument("--split", default=None, help="dataset split (default: digits test, "
                      "imagenet2012 validation)")
  parser.add_argument("--resolution", type=int, default=None,
                      help="must equal the tokenizer's")
  parser.add_argument("--data_dir", default="", help="default $TFDS_DATA_DIR or "
                      "~/tensorflow_datasets")
  parser.add_argument("--num", type=int, default=None, help="at most this many images")
  parser.add_argument("--batch_size", type=int, default=32)


DECODE_HELP = ("a flexible-length tokenizer (FlexTok) decodes any prefix of an image's tokens "
               "with its rectified-flow decoder; the defaults are the tokenizer's config")


def _add_decode_flags(parser, several):
  group = parser.add_argument_group("flexible-length decoding", DECODE_HELP)
  if several:
    group.add_argument("--tokens", default=None, metavar="K1,K2,..",
                       help="decode from the first K tokens, K in 1..256, for each K given: "
                            "metrics per K (default: all tokens)")
  else:
    group.add_argument("--tokens", type=int, default=None, metavar="K",
                       help="decode from the first K tokens, K in 1..256 (default: all)")
  group.add_argument("--steps", type=int, default=None, help="decoder Euler steps")
  group.add_argument("--guidance_scale", type=float, default=None,
                     help="decoder guidance scale (1: no guidance)")
  group.add_argument("--guidance", default=None, choices=("apg", "cfg"),
                     help="adaptive projected guidance or classifier-free guidance")


def _token_counts(text):
  """The K of `--tokens K1,K2,..` (None: all tokens)."""
  if text is None:
    return [None]
  try:
    counts = [int(k) for k in text.split(",") if k.strip()]
  except ValueError:
    raise TesseraxError(f"--tokens {text!r}: expected comma-separated integers") from None
  if not counts:
    raise TesseraxError("--tokens names no token count")
  return counts


def _initialize_distributed(args):
  from tesserax.core import distributed
  distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)


def _cmd_train(args, overrides):
  import tesserax.tasks  # noqa: F401  (registers the built-in tasks)
  from tesserax.core import config as config_lib
  from tesserax.training import loop
  _initialize_distributed(args)
  config = config_lib.load(args.config)
  config_lib.apply_overrides(config, overrides)
  loop.train(config, args.workdir, init_from=args.init_from)


def _cmd_demo(args, overrides):
  from tesserax.core import config as config_lib
  from tesserax.demos import demo
  if args.flextok:
    if overrides:
      raise TesseraxError("--config.* overrides do not apply to demo --flextok (it runs "
                          "digits_flextok and digits_ar as they are)")
    from tesserax.demos import flextok_demo
    flextok_demo.run(args.workdir or "workdirs/demo_flextok")
    return
  if args.tokens:
    if overrides:
      raise TesseraxError("--config.* overrides do not apply to demo --tokens (it runs "
                          "digits_titok and digits_maskgit as they are)")
    from tesserax.demos import tokens
    tokens.run(args.workdir or "workdirs/demo_tokens")
    return
  if args.fewstep:
    from tesserax.demos import fewstep
    names = args.students.split(",") if args.students else fewstep.DEFAULT_STUDENTS
    unknown = [n for n in names if n not in fewstep.STUDENTS]
    if unknown:
      raise TesseraxError(f"unknown student {unknown[0]!r}; known: "
                          f"{', '.join(fewstep.STUDENTS)}")
    fewstep.run(args.workdir or "workdirs/demo_fewstep", args.teacher, names, overrides)
    return
  config = config_lib.load("digits_latent_dit" if args.latent else "digits_dit")
  config_lib.apply_overrides(config, overrides)
  if args.latent:
    demo.run_latent(config_lib.load("digits_kl"), config, args.workdir or "workdirs/demo_latent")
  else:
    demo.run(config, args.workdir or "workdirs/demo")


SAMPLE_DEFAULTS = dict(solver="euler", num_steps=32, shift=1.0, cfg_scale=1.0,
                       interval=(0.0, 1.0), guided_channels=None, final_correction=True)


# Predictions over token ids: their samplers have settings of their own (sampling/
# maskgit_decode.py, sampling/autoregressive_decode.py), not the flow defaults above.
TOKEN_KINDS = ("token_logits", "next_token_logits")


def _sample_settings(config, args, overrides):
  """The sample config with the command's defaults, then --sample.KEY=VALUE, then the flags
  given explicitly."""
  from tesserax.core import config as config_lib, registry
  settings = config.sample.copy_and_resolve_references()
  if registry.SAMPLERS.get(settings.solver).consumes not in TOKEN_KINDS:
    settings.update(SAMPLE_DEFAULTS)  # token samplers start from the recipe's own settings
  config_lib.apply_overrides(settings, overrides, flag="sample")
  flags = {"solver": args.sampler, "num_steps": args.steps, "shift": args.shift,
           "cfg_scale": args.cfg, "guided_channels": args.guided_channels,
           "interval": None if args.interval is None else tuple(args.interval)}
  settings.update({k: v for k, v in flags.items() if v is not None})
  return settings


def _cmd_sample(args, overrides):
  import numpy as np
  import tesserax.tasks  # noqa: F401  (registers the built-in tasks)
  from tesserax.core import config as config_lib
  from tesserax.core.files import atomic_output
  from tesserax.data.preprocess import to_uint8
  from tesserax.training.task import load_workdir
  _initialize_distributed(args)
  task, state = load_workdir(args.workdir)
  settings = _sample_settings(task.config, args, overrides)
  config_lib.validate_sample(settings)
  num_classes = task.config.model.num_classes
  if args.num < 1:
    raise TesseraxError(f"--num must be positive, got {args.num}")
  if args.label is not None and not 0 <= args.label < num_classes:
    raise TesseraxError(f"--label {args.label} is outside [0, {num_classes})")
  labels = (np.full(args.num, args.label, np.int32) if args.label is not None
            else np.arange(args.num, dtype=np.int32) % num_classes)
  data = task.config.data
  without_cache = data.name == "latents" and not data.data_dir
  if without_cache and not args.tokenizer:
    raise TesseraxError("this model samples latents and has no latent cache to decode them "
                        "with; pass --tokenizer DIR (a converted VA-VAE / SD-VAE)")
  if args.tokenizer:
    if not without_cache:
      raise TesseraxError("--tokenizer is for latent models without a cache; this one's "
                          "samples are decoded already" if data.name == "latents" else
                          "--tokenizer is for latent models; this one samples images")
    from tesserax.tokenizers import tokenizer
    decoder = tokenizer.load(args.tokenizer)
  import jax
  images = task.predict["generate"](state["params" if args.raw else "ema"], labels,
                                    jax.random.PRNGKey(args.seed), settings, batch_size=512)
  if args.tokenizer:
    images = decoder.decode_normalized(images)
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with atomic_output(args.out) as tmp, open(tmp, "wb") as f:  # a file: no ".npz" appended
      np.savez(f, arr_0=to_uint8(images), arr_1=labels)
    print(f"wrote {args.num} samples to {args.out}")


def _cmd_pairs(args, overrides):
  import tesserax.tasks  # noqa: F401  (registers the built-in tasks)
  from tesserax.tasks import diffusion
  for flag in ("num", "steps", "batch_size"):
    if getattr(args, flag) < 1:
      raise TesseraxError(f"--{flag} must be positive, got {getattr(args, flag)}")
  _initialize_distributed(args)
  out = diffusion.write_pairs(args.workdir, args.out, args.num, solver=args.solver,
                              num_steps=args.steps, cfg_scale=args.cfg_scale, seed=args.seed,
                              batch_size=args.batch_size)
  print(f"wrote {args.num} pairs to {out}")


def _report(results, out):
  from tesserax.core.files import atomic_output
  width = max(len(k) for k in results)
  for key, value in results.items():
    print(f"{key:<{width}}  {value:.4f}" if isinstance(value, float)
          else f"{key:<{width}}  {value}")
  if out:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with atomic_output(out) as tmp, open(tmp, "w") as f:
      json.dump(results, f, indent=2)


def _cmd_eval(args, overrides):
  metrics = [m for m in args.metrics.split(",") if m]
  digits = {"fid_digits", "accuracy"}
  if set(metrics) & digits:
    from tesserax.demos import demo
    if not set(metrics) <= digits:
      raise TesseraxError("fid_digits/accuracy cannot be mixed with the Inception metrics")
    _report(demo.evaluate_samples_file(args.samples, metrics), args.out)
    return
  from tesserax.eval import metrics as metrics_lib, reference
  if args.ref is None:
    raise TesseraxError("--ref REF.npz is needed for " + ",".join(metrics))
  ref = reference.load(args.ref, metrics=metrics)
  samples = reference.read_images(args.samples)
  results = metrics_lib.generation_metrics(samples, ref, metrics, mode=args.preprocess,
                                           num_samples=args.num)
  _report(results, args.out)


def _eval_set_tokenizer(args):
  """The network of --tokenizer, once the eval-set flags are checked."""
  from tesserax.tokenizers import tokenizer
  if args.num is not None and args.num < 1:
    raise TesseraxError(f"--num must be positive, got {args.num}")
  if args.batch_size < 1:
    raise TesseraxError(f"--batch_size must be positive, got {args.batch_size}")
  return tokenizer.load(args.tokenizer).model


def _reconstruction_pairs(args, model, tokens):
  """The streamed (originals, reconstructions) of the tokenizer `model` on --data, decoded from
  the first `tokens` tokens (None: all) with the decoder flags."""
  from tesserax.tokenizers import reconstruct
  settings = reconstruct.decode_settings(model, tokens, args.steps, args.guidance_scale,
                                         args.guidance)
  folder = os.path.isdir(args.data)
  resolution = args.resolution or (reconstruct.OFFICIAL_RESOLUTION if folder
                                   else model.resolution)
  reconstruct.check_resolution(model, resolution)
  batches, total = reconstruct.eval_set(args.data, resolution, split=args.split,
                                        data_dir=args.data_dir, num=args.num,
                                        batch_size=args.batch_size)
  return reconstruct.pairs(model, batches, args.batch_size, total=total, settings=settings)


def _cmd_reconstruct(args, overrides):
  from tesserax.data.preprocess import to_model_range
  from tesserax.eval.grid import save_grid
  from tesserax.tokenizers import reconstruct
  pairs = _reconstruction_pairs(args, _eval_set_tokenizer(args), args.tokens)
  count, side_by_side = reconstruct.write_pairs(pairs, args.out)
  save_grid(os.path.join(args.out, "pairs.png"), to_model_range(side_by_side), nrow=4,
            upscale=max(1, 64 // side_by_side.shape[1]))
  print(f"wrote {count} original/reconstruction pairs and pairs.png to {args.out}")


def _cmd_eval_recon(args, overrides):
  import itertools
  from tesserax.eval import metrics as metrics_lib, reference
  metrics = [m for m in args.metrics.split(",") if m]
  paired = args.originals is not None or args.reconstructions is not None
  if paired == (args.tokenizer is not None or args.data is not None):
    raise TesseraxError("eval-recon takes either --originals and --reconstructions, or "
                        "--tokenizer and --data")
  if paired:
    decoding = [f for f in ("tokens", "steps", "guidance_scale", "guidance")
                if getattr(args, f) is not None]
    if decoding:
      raise TesseraxError(f"--{decoding[0]} decodes with --tokenizer; paired images are "
                          "decoded already")
    if args.originals is None or args.reconstructions is None:
      raise TesseraxError("--originals and --reconstructions go together")
    originals = reference.read_images(args.originals)
    reconstructions = reference.read_images(args.reconstructions)
    if originals.shape != reconstructions.shape:
      raise TesseraxError(f"{args.originals} holds images {list(originals.shape)} and "
                          f"{args.reconstructions} {list(reconstructions.shape)}; "
                          "reconstructions pair with their originals one for one")
    _report(metrics_lib.reconstruction_metrics(originals, reconstructions, metrics,
                                               num_samples=args.num), args.out)
    return
  if args.tokenizer is None or args.data is None:
    raise TesseraxError("--tokenizer and --data go together")
  from tesserax.tokenizers import reconstruct
  counts = _token_counts(args.tokens)
  model = _eval_set_tokenizer(args)
  for k in counts:  # every K checked before any is computed
    reconstruct.decode_settings(model, k, args.steps, args.guidance_scale, args.guidance)
  results = {}
  for k in counts:
    first, second = itertools.tee(_reconstruction_pairs(args, model, k))
    results[k] = metrics_lib.reconstruction_metrics((a for a, _ in first),
                                                    (b for _, b in second), metrics)
  if counts == [None]:
    _report(results[None], args.out)
    return
  for k, scores in results.items():
    print(f"tokens {k:>3}: " + "  ".join(f"{m} {v:.4f}" for m, v in scores.items()
                                         if m != "num_samples")
          + f"  ({scores['num_samples']} images)")
  if args.out:
    from tesserax.core.files import atomic_output
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with atomic_output(args.out) as tmp, open(tmp, "w") as f:
      json.dump({"tokens": {str(k): v for k, v in results.items()}}, f, indent=2)


def _cmd_convert(args, overrides):
  from tesserax.core import registry
  converter = registry.CONVERTERS.get(args.kind)
  if args.export:
    if converter.export is None:
      raise TesseraxError(f"--export is not available for --kind {args.kind}")
    converter.export(args.src, args.out)
    print(f"wrote {args.out}")
  else:
    print(f"wrote {converter.convert(args.kind, args.src, args.out, stats=args.stats)}")


def _cmd_weights(args, overrides):
  from tesserax.backbones import weights
  for path in weights.fetch(args.name, args.dest):
    print(f"{args.name}: {path}")


def _cmd_data(args, overrides):
  from tesserax.data import pipeline
  if args.data_command == "reference":
    _data_reference(args)
    return
  if args.data_command == "encode":
    _data_encode(args)
    return
  if args.manual_dir is not None and not os.path.isdir(args.manual_dir):
    raise TesseraxError(f"--manual_dir does not exist: {args.manual_dir}")
  pipeline.build(args.name, args.data_dir, manual_dir=args.manual_dir, resolution=args.resolution)
  print(f"prepared {args.name}")


def _data_config(name, data_dir, manual_dir, resolution, split):
  import ml_collections
  num_classes = {"digits": 10, "imagenet2012": 1000}.get(name)
  if num_classes is None and not os.path.isdir(manual_dir):
    raise TesseraxError(f"{name} needs --manual_dir, the folder it was built from")
  return ml_collections.ConfigDict(dict(
      name=name, data_dir=data_dir, manual_dir=manual_dir, resolution=resolution, split=split,
      random_flip=False,
      num_classes=num_classes or len([d for d in os.listdir(manual_dir)
                                      if os.path.isdir(os.path.join(manual_dir, d))])))


def _data_reference(args):
  from tesserax.backbones import weights
  from tesserax.data import pipeline
  from tesserax.eval import reference
  data = _data_config(args.name, args.data_dir, args.manual_dir, args.resolution, args.split)
  batches = pipeline.iterate_split(data, args.split, limit=args.num)
  ref = reference.compute(batches, dinov2=weights.load("dinov2_vitl14") if args.dinov2 else None,
                          keep_images=args.keep)
  reference.save(args.out, ref)
  print(f"wrote {args.out}")


def _data_encode(args):
  from tesserax.tokenizers import cache_encoder, tokenizer
  splits = [s for s in args.splits.split(",") if s]
  if not splits:
    raise TesseraxError("--splits names no split")
  resolution = args.resolution
  if resolution is None:
    resolution = tokenizer.read_config(args.tokenizer)["model"].resolution
  data = _data_config(args.name, args.data_dir, args.manual_dir, resolution, splits[0])
  cache_encoder.encode(args.tokenizer, data, args.out, splits=splits, batch_size=args.batch_size,
                 seed=args.seed, log=print)
  print(f"wrote {args.out}")


COMMANDS = {"demo": _cmd_demo, "train": _cmd_train, "sample": _cmd_sample, "eval": _cmd_eval,
            "reconstruct": _cmd_reconstruct, "eval-recon": _cmd_eval_recon, "weights": _cmd_weights, "convert": _cmd_convert,
            "data": _cmd_data, "pairs": _cmd_pairs}


def _chain(exc):
  """exc and every exception it was raised from or during, exception groups included."""
  seen, todo = [], [exc]
  while todo:
    e = todo.pop()
    if e is not None and not any(e is s for s in seen):
      seen.append(e)
      group = e.exceptions if isinstance(e, BaseExceptionGroup) else ()
      todo += [e.__cause__, e.__context__, *group]
  return seen


PLUGINS = {"cuda": "pip install 'tesserax[cuda]'", "tpu": "pip install 'tesserax[tpu]'"}


def _machine_error(exc) -> str | None:
  """The one line for a failure of the machine, not of the code: a full disk, an accelerator
  jax cannot initialise, an out-of-memory. None for anything else (a bug keeps its traceback)."""
  import errno
  import re
  import traceback
  for e in _chain(exc):
    text = str(e)
    if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left on device" in text:
      where = f" ({e.filename})" if getattr(e, "filename", None) else ""
      return (f"no space left on device{where}: free some disk space and run the same command "
              "again; the last checkpoint is kept and a training run resumes from it")
    backend = re.search(r"Unable to initialize backend '(\w+)'", text)
    frames = traceback.extract_tb(e.__traceback__)
    # JAX_PLATFORMS=cuda without a visible GPU fails an assert in jax's backend setup.
    no_gpu = (isinstance(e, AssertionError) and os.environ.get("JAX_PLATFORMS") and frames
              and frames[-1].filename.endswith("xla_bridge.py"))
    if (isinstance(e, RuntimeError) and backend) or no_gpu:
      name = backend[1] if backend else os.environ["JAX_PLATFORMS"]
      install = PLUGINS.get(name, f"install jax's {name} plugin")
      return (f"jax cannot initialise the {name} backend (no {name} device, or its library is "
              f"missing): {install} on a machine with one, or run on CPU with JAX_PLATFORMS=cpu")
    if type(e).__name__ in ("JaxRuntimeError", "XlaRuntimeError") and "RESOURCE_EXHAUSTED" in text:
      return (f"out of memory ({text.strip().splitlines()[0][:200]}): lower batch_size, compute "
              "in bfloat16 (--config.model.dtype=bfloat16) or rematerialise activations "
              "(--config.model.remat=True)")
  return None


def main(argv=None):
  """Run a command; bad input ends in one `error:` line and exit status 2, a full disk, a
  missing accelerator or an out-of-memory in one line and exit status 1."""
  if argv is None:  # run as a program: XLA:CPU and malloc settings (core/host.py)
    host.prepare("tesserax.cli")
    argv = sys.argv[1:]
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.ERROR)
  try:
    config_overrides, rest = _split_overrides(argv, "config")
    sample_overrides, rest = _split_overrides(rest, "sample")
    args = _parser().parse_args(rest)
    if config_overrides and args.command not in ("train", "demo"):
      raise TesseraxError(f"--config.* overrides apply to train and demo, not {args.command}")
    if sample_overrides and args.command != "sample":
      raise TesseraxError(f"--sample.* overrides apply to sample, not {args.command}")
    COMMANDS[args.command](args, sample_overrides if args.command == "sample"
                           else config_overrides)
  except TesseraxError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("error: interrupted", file=sys.stderr)
    return 130
  except Exception as e:  # a bug is re-raised with its traceback
    message = _machine_error(e)
    if message is None:
      raise
    print(f"error: {message}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
