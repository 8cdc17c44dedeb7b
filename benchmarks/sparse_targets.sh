#!/usr/bin/env bash
# Every target of the GPU-executor issue in one GPU run (repo root, a CUDA machine):
#   OUT=dir bash benchmarks/sparse_targets.sh
# 1. block-sparse Triton vs FlexAttention on the same selection (T = 32K, 128K; densities 5-25 %);
# 2-4. MoBA / NSA / DSA / block top-k end to end vs cuDNN dense causal (and fla's parallel_nsa when
#      installed), T = 4K..64K, Hq = 64, every GPU backend, crossover lengths, plot;
# then the dispatch table from the end-to-end rows. First calls compile and autotune: give it ~15 min.
set -u
OUT=${OUT:-results/sparse-targets}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-src} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
python3 benchmarks/executors_bench.py --seqlens 32768 131072 --out "$OUT/executors.json" 2>&1 | tee "$OUT/executors.log"
python3 benchmarks/sparse_targets_bench.py --all-backends --max-minutes 12 --plot --out "$OUT/sparse_targets.json" \
  2>&1 | tee "$OUT/sparse_targets.log"
python3 scripts/make_dispatch_table.py "$OUT/sparse_targets.json"
