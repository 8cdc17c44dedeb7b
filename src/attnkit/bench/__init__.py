"""The benchmark: speed, memory and fidelity of every method on the same inputs (docs/design.md, docs/benchmark.md).

`attnkit bench` / `python -m attnkit.bench` (see docs/benchmark.md). Modules:

- `workloads`: random, structured (locality + planted needles) and real inputs (`capture`: MiniLM q, k, v);
- `timing`: median warm time (CUDA events / perf_counter) and peak memory;
- `visibility`: which keys a method lets each query see, found from `methods.<name>.select` / `.mask`;
- `metrics`: exact reference, output / LSE error, cosine, attention-mass recall, density, FLOPs;
- `baselines`: SDPA (and on CUDA its forced kernels and FlexAttention);
- `runner`: the sweep with its guards; `schema`: the results file's JSON schema;
- `report`: JSON, Markdown, terminal table, HTML with plots; `env`: device, versions, commit; `cli`.
"""
