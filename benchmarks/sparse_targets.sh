#!/usr/bin/env bash
# Every target of the selection engine in one GPU run (repo root, a CUDA machine; about 9 minutes with
# fla's parallel_nsa compiling, which the benchmark installs from wheels where the image lacks it):
#   OUT=dir bash benchmarks/sparse_targets.sh
# The routing kernels and Quest decode first, then MoBA / NSA / DSA / block top-k end to end against
# cuDNN dense causal (and fla's parallel_nsa when installed), longest T first, every GPU backend;
# then the dispatch table from the end-to-end rows.
set -u
OUT=${OUT:-results/sparse-targets}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-src} PYTHONUNBUFFERED=1
python3 benchmarks/sparse_targets_bench.py --all-backends --routing --quest --plot --max-minutes 8 \
  --seqlens 65536 32768 16384 8192 4096 --commit "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" \
  --out "$OUT/sparse_targets.json" 2>&1 | tee "$OUT/sparse_targets.log"
python3 scripts/make_dispatch_table.py "$OUT/sparse_targets.json"
