#!/usr/bin/env bash
# The GPU measurements behind the performance targets, one step per device call (each under ten
# minutes, results written under $OUT after every row). Repo root, one CUDA GPU:
#   OUT=dir bash benchmarks/gpu_targets.sh STEP [STEP ...]
# Steps:
#   cp        context parallelism at world 1 against cuDNN SDPA (16K, 64K), ring-block GPU tests first
#   selring   the selection-aware ring at world 1 against the sparse executor (4K, 16K), its GPU tests first
#   prefill   training-free prefill speed against cuDNN dense (128K, 64K, 32K, 16K) and its GPU tests
#   moba      the MoBA executor by phase and variant (sorted / windowed / onepass) and its GPU tests
#   dsa       DSA's fused indexer + top-k against the old selection, and its GPU tests
#   quest     Quest decode at 128K by part, the tile sweep; the decode and reader CUDA-graph GPU tests
#   launches  kernel launches, host syncs and sorts per call of the routed methods at 4K-16K
#   targets   every selection-engine target end to end (benchmarks/sparse_targets.sh)
#   accuracy  `attnkit accuracy --full`; needs gguf, accelerate and the SmolLM2 GGUF at $MODEL_DIR
set -u
OUT=${OUT:-results/gpu-targets}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-src} PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> "$OUT/device.txt"
git rev-parse --short HEAD >> "$OUT/device.txt" 2>/dev/null

gpu_tests() {  # name, then pytest arguments
    local name=$1; shift
    timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu -ra "$@" > "$OUT/${name}_gpu_tests.log" 2>&1
    tail -3 "$OUT/${name}_gpu_tests.log"
}

for step in "$@"; do
    echo "== $step"
    case $step in
    cp)
        timeout 200 python3 benchmarks/cp_bench.py --tests --seqlens 16384,65536 --kernels auto,flash \
            --out "$OUT/cp_bench.json" > "$OUT/cp.log" 2>&1; tail -20 "$OUT/cp.log" ;;
    selring)
        timeout 300 python3 benchmarks/selection_ring_bench.py --tests --seqlens 4096,16384 \
            --out "$OUT/selection_ring.json" > "$OUT/selring.log" 2>&1; tail -20 "$OUT/selring.log" ;;
    prefill)
        gpu_tests prefill tests/kernels/test_method_backends.py tests/methods/test_token_sparse.py \
            -k "vertical_slash or xattention or flexprefill or hip or token_sparse"
        timeout 300 python3 benchmarks/prefill_bench.py --seqlens 131072 65536 32768 16384 --max-minutes 3.8 \
            --out "$OUT/prefill.json" > "$OUT/prefill.log" 2>&1; tail -40 "$OUT/prefill.log" ;;
    moba)
        gpu_tests moba tests/kernels/test_sparse_keymajor.py tests/kernels/test_sparse_keymajor_windowed.py \
            tests/kernels/test_sparse_keymajor_onepass.py
        timeout 360 python3 benchmarks/moba_executor_profile.py --out "$OUT/moba_exec.json" \
            > "$OUT/moba_exec.log" 2>&1; tail -30 "$OUT/moba_exec.log" ;;
    dsa)
        gpu_tests dsa tests/kernels/test_indexer_topk.py
        timeout 300 python3 benchmarks/dsa_topk_bench.py --out "$OUT/dsa_topk.json" > "$OUT/dsa_topk.log" 2>&1
        tail -30 "$OUT/dsa_topk.log" ;;
    quest)
        gpu_tests quest tests/kernels/test_quest_select.py tests/kernels/test_reader_graphs.py tests/kernels/test_host_syncs.py \
            tests/ops/test_decode.py
        timeout 300 python3 benchmarks/decode_bench.py --seqlens 131072 --quest-sweep --warmup 5 --reps 20 \
            --out "$OUT/quest_decode.json" > "$OUT/quest_decode.log" 2>&1; tail -30 "$OUT/quest_decode.log" ;;
    launches)
        timeout 300 python3 benchmarks/launch_count.py --out "$OUT/launch_count.json" > "$OUT/launch_count.log" 2>&1
        tail -30 "$OUT/launch_count.log" ;;
    targets)
        OUT="$OUT/sparse-targets" timeout 580 bash benchmarks/sparse_targets.sh ;;
    accuracy)
        timeout 480 python3 -m attnkit accuracy --full --no-progress --model "${MODEL_DIR:?set MODEL_DIR}" \
            --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf --out "$OUT/accuracy-full" > "$OUT/accuracy.log" 2>&1
        tail -30 "$OUT/accuracy.log" ;;
    *)
        echo "unknown step: $step (see the header of $0)" >&2; exit 2 ;;
    esac
done
