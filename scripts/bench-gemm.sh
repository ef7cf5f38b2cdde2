#!/usr/bin/env bash
# What a decode step's matrix products cost on this CPU, with the libtorch the worker links (the venv's torch):
# the medium GPT-J's projections (8 × 1024: q/k/v fused, out, fc_in, fc_out) and its head (50,400 × 1024) at
# M rows, float32 as the worker computes them (`F.linear`, the weight [out, in]), against the same products
# with the weight stored [in, out], and in bfloat16. Each figure is the median of REPEAT timings; the table
# gives GB/s of weights read and GFLOP/s, and each row's time as a ratio to float32 `F.linear` in the same
# run. A memory read (`sum` over 400 MB) gives the bandwidth the products could reach.
#
#   scripts/bench-gemm.sh                 # THREADS=2 ROWS=16 REPEAT=15 RUNS=3
# shellcheck source-path=SCRIPTDIR source=lib.sh disable=SC1091
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT" || exit
ensure_venv
THREADS="${THREADS:-2}" ROWS="${ROWS:-16}" REPEAT="${REPEAT:-15}" RUNS="${RUNS:-3}" "$VENV/bin/python" - <<'PY'
import os, statistics, time
import torch

threads, rows, repeat, runs = (int(os.environ[k]) for k in ("THREADS", "ROWS", "REPEAT", "RUNS"))
torch.set_num_threads(threads)
torch.manual_seed(0)
layer = [(3 * 1024, 1024), (1024, 1024), (4096, 1024), (1024, 4096)]
head = [(50400, 1024)]


def timed(fn):
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def products(shapes, dtype):
    ws = [torch.randn(o, i).to(dtype) for o, i in shapes]
    wts = [w.t().contiguous() for w in ws]
    xs = [torch.randn(rows, i).to(dtype) for _, i in shapes]
    linear = lambda: [torch.nn.functional.linear(x, w) for x, w in zip(xs, ws)]
    transposed = lambda: [x @ wt for x, wt in zip(xs, wts)]
    size = sum(w.numel() * w.element_size() for w in ws)
    return linear, transposed, size, sum(2 * rows * w.numel() for w in ws)


big = torch.randn(100_000_000)
print(f"torch {torch.__version__}, {threads} threads, {rows} rows; "
      f"memory read (sum over 400 MB): {0.4 / timed(lambda: big.sum()):.1f} GB/s")
print()
print("| run | weights | form | ms | GB/s of weights | GFLOP/s | × float32 F.linear |")
print("|---|---|---|---:|---:|---:|---:|")
for run in range(1, runs + 1):
    for name, shapes in (("a layer (q/k/v, out, fc_in, fc_out)", layer), ("the head", head)):
        f32_linear, f32_t, size, flops = products(shapes, torch.float32)
        bf_linear, _, bf_size, _ = products(shapes, torch.bfloat16)
        reference = timed(f32_linear)
        for form, fn, nbytes in (("float32 F.linear (weight [out, in])", f32_linear, size),
                                 ("float32 x @ W (weight [in, out])", f32_t, size),
                                 ("bfloat16 F.linear", bf_linear, bf_size)):
            t = reference if fn is f32_linear else timed(fn)
            print(f"| {run} | {name} | {form} | {t * 1e3:.2f} | {nbytes / t / 1e9:.1f} | {flops / t / 1e9:.0f} "
                  f"| {t / reference:.2f} |")
PY
