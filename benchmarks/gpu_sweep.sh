#!/usr/bin/env bash
# One GPU run: GPU tests of the executors and their method wiring, the benchmark sweep, and the
# context-parallel benchmark. Usage (repo root, a CUDA machine): OUT=dir bash benchmarks/gpu_sweep.sh
set -u
OUT=${OUT:-results/gpu-sweep}
mkdir -p "$OUT"
export PYTHONPATH=src PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
timeout 170 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_method_backends.py \
  "tests/kernels/test_sparse_triton.py::test_int64_offsets_gpu" tests/ops/test_decode.py -k "gpu or triton" -ra \
  2>&1 | tail -25 | tee "$OUT/gpu_tests.log"
timeout 240 python3 -m attnkit bench --gpu --workloads random,structured --seqlens 4K,16K,64K \
  --methods dense,sliding_window,moba,nsa,dsa,block_topk,power,gla,gated_delta_rule \
  --set moba.block_size=64 --set moba.topk=16 --set nsa.block_size=64 --set nsa.topk=16 --set nsa.window=512 \
  --set dsa.topk=2048 --set sliding_window.window=4096 --set block_topk.block_size=128 --set block_topk.topk=16 \
  --max-minutes 3.3 --no-progress --out "$OUT/bench" 2>&1 | tail -40 | tee "$OUT/bench.log"
timeout 100 python3 benchmarks/cp_bench.py --worlds 1,2 --seqlens 4096,16384 --out "$OUT/cp_h100.json" 2>&1 | tail -15
