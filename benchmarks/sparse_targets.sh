#!/usr/bin/env bash
# Every target of the GPU-executor issue in one GPU run (repo root, a CUDA machine):
#   OUT=dir bash benchmarks/sparse_targets.sh
# 1. block-sparse Triton vs FlexAttention on the same selection (T = 32K, 128K; densities 5-25 %);
# 2-4. MoBA / NSA / DSA / block top-k end to end vs cuDNN dense causal (and fla's parallel_nsa when
#      installed), T = 4K..64K, Hq = 64, every GPU backend, crossover lengths, plot;
# then the dispatch table from the end-to-end rows; plus MoBA's key-major vs query-major executor and
# DSA's selection pieces (top-k, indexer) in isolation. First calls compile and autotune: the whole
# script takes ~20 min, more than one 10-minute device call; run it in parts (PART=1: executors and
# the small benchmarks; PART=2: the end-to-end sweep and the dispatch table).
set -u
OUT=${OUT:-results/sparse-targets}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-src} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
PART=${PART:-all}
if [ "$PART" != 2 ]; then
  python3 benchmarks/executors_bench.py --seqlens 32768 131072 --out "$OUT/executors.json" 2>&1 | tee "$OUT/executors.log"
  python3 benchmarks/moba_keymajor_ab.py --seqlens 16384 65536 --out "$OUT/moba_keymajor.json" 2>&1 | tail -8
  python3 benchmarks/topk_micro.py --out "$OUT/topk_micro.json" 2>&1 | tail -14
fi
if [ "$PART" != 1 ]; then
  python3 benchmarks/sparse_targets_bench.py --all-backends --max-minutes 8 --plot --out "$OUT/sparse_targets.json" \
    2>&1 | tee "$OUT/sparse_targets.log"
  python3 scripts/make_dispatch_table.py "$OUT/sparse_targets.json"
fi
