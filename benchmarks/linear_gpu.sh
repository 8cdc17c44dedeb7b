#!/usr/bin/env bash
# The linear-family table on a GPU, in two device calls of < 10 min each, because fla's
# first call per method autotunes for minutes (more than 155 s per gated/delta method even with
# one process per method in parallel, as measured):
#   call 1:  OUT=$OUT bash benchmarks/linear_gpu.sh warm   # fla fwd+bwd once per method, in parallel;
#            writes $OUT/tcache.tgz (Triton's kernel cache with fla's autotuning results)
#   here:    mkdir -p .cache && cp <files_at>/tcache.tgz .cache/   (.cache/ ignored; carry it)
#   call 2:  OUT=$OUT bash benchmarks/linear_gpu.sh time   # every row in one process, no autotuning
# or both in one call, when the cache is warm enough by WARM_S seconds (default 300; the timed run then
# autotunes what the warm-up left, from the kernels it already compiled):
#            OUT=$OUT bash benchmarks/linear_gpu.sh all
# Needs fla on PYTHONPATH (the .whl recipe of the device README).
set -u
MODE=${1:?warm, time or all}
OUT=${OUT:-results/linear-gpu}
mkdir -p "$OUT"
export TRITON_CACHE_DIR=/tmp/tcache FLA_CACHE_RESULTS=1 PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-src}
METHODS="linear_attention simple_gla gla delta_rule gated_delta_rule kda"
if [ "$MODE" = warm ] || [ "$MODE" = all ]; then
  WARM_S=${WARM_S:-500}
  [ "$MODE" = all ] && WARM_S=${WARM_S_ALL:-300} && METHODS="gla delta_rule gated_delta_rule kda"
  for m in $METHODS; do  # linear_attention and simple_gla autotune in seconds: not worth a process
    timeout "$WARM_S" python3 benchmarks/linear_bench.py --warm-fla --methods "$m" --T 8192 > "/tmp/warm_$m.log" 2>&1 &
  done
  wait
  grep -h warm /tmp/warm_*.log | tee "$OUT/warm.log"
  (cd /tmp && tar czf "$OUT/tcache.tgz" tcache) && ls -la "$OUT/tcache.tgz"
fi
if [ "$MODE" != warm ]; then
  LEFT=$((570 - SECONDS))
  [ -f .cache/tcache.tgz ] && (cd /tmp && tar xzf "$OLDPWD/.cache/tcache.tgz")
  timeout "$LEFT" python3 benchmarks/linear_bench.py --out "$OUT/linear_h100.json" --budget-s $((LEFT - 60)) --compile 2>&1 | grep -v Warn
  python3 scripts/linear_table.py "$OUT/linear_h100.json" | tee "$OUT/linear_table.md"
fi
