#!/usr/bin/env bash
# The GPU rows of BENCHMARKS.md in one command for one H100/H200, within 10 minutes, compiles
# included: tesserax beside diffusers, pytorch-fid and torch-fidelity in bfloat16 (the peer
# eager, then torch.compile'd), DiT-XL/2 and LightningDiT-XL/1 training MFU at 128 images per
# device (LightningDiT's 1024 over 8 GPUs; fast-DiT's A100 anchor is batch 128) with 1/2/4-NFE
# sampling, and FID-50k's wall time extrapolated from 10,000 images. Each part has its own
# time limit, so one that fails leaves the others' figures. JSON lines and logs go to OUT.
#
#   bash benchmarks/gpu.sh [OUT]          # from the repository root; OUT defaults to gpu_bench
#
# Needs jax and torch with CUDA, tesserax's dependencies and the `bench` extra's peers. Where
# the repository root is not installed as the package, it is put on the path as `tesserax`.
set -u
out=${1:-gpu_bench}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if ! python -c "import tesserax" 2>/dev/null; then
  mkdir -p /tmp/tesserax_path && ln -sfn "$PWD" /tmp/tesserax_path/tesserax
  export PYTHONPATH="/tmp/tesserax_path${PYTHONPATH:+:$PYTHONPATH}"
fi

part() {  # NAME SECONDS MODULE [ARGS...]: python -m tesserax.benchmarks.MODULE ARGS
  local name=$1 limit=$2 module=$3
  shift 3
  echo "== $name (at most ${limit} s)"
  timeout "$limit" python -m "tesserax.benchmarks.$module" "$@" 2>&1 | tee "$out/$name.log"
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python -c "import jax, torch; print('jax', jax.__version__, jax.devices(), 'torch', torch.__version__)"
} 2>&1 | tee "$out/device.txt"
part peers_bf16 170 peers --size XL --batch 32 --vae_resolution 256 --vae_batch 8 \
  --dtype bfloat16 --order blocks --rounds 5 --fid_num 500 --fid_batch 250 --threads 16 \
  --out "$out/peers.jsonl"
part peers_compiled 120 peers --only dit --size XL --batch 32 --steps 8 --dtype bfloat16 \
  --torch_compile --order blocks --rounds 5 --threads 16 --out "$out/peers.jsonl"
part dit_family 190 dit_family --models dit_xl2,lightningdit_xl1 --batch 128 --sample_batch 64 \
  --dtype bfloat16 --nfe 1 2 4 --out "$out/dit_family.jsonl"
part fid 80 fid --num 10000 --batch 500 --out "$out/fid.jsonl"
