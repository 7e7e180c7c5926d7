#!/usr/bin/env bash
# One device call: install the wheels the GPU machine lacks, run the GPU tests, then the
# decode roofline bench and the kernel bench. Logs and JSON go to $OUT.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
export PYTHONUNBUFFERED=1
# no pip install here: map kernels/ to atom_stream.kernels as the package build does
[ -e atom_stream/kernels ] || ln -s ../kernels atom_stream/kernels
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
what=${1:-all}
if [[ $what == all || $what == tests ]]; then
  timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu_engine.py \
      tests/test_kernels_moe.py tests/test_ep_kernels.py 2>&1 | tail -25 | tee "$OUT/gpu_tests.log"
fi
if [[ $what == all || $what == decode ]]; then
  timeout 380 python3 bench/decode.py --preset "${PRESET:-k25-tp8-rank}" \
      --iters 10 --out "$OUT/decode.json" 2>&1 | grep -v Warning | tee "$OUT/decode.log"
fi
