#!/usr/bin/env python3
"""PyTorch baseline for bench_kernels: torch.matmul in fp16 + torch.topk on identical data.

The catalog and the queries are generated on the GPU with the same integer hash as
kernels_bench_value() in kernels/affinity_kernels.h (value at flat index i = row * dim + col,
seed for the catalog, seed + 1 for the queries), so both programs score the very same numbers.
Timing matches bench_kernels: CUDA events around query upload (from pinned memory), scoring,
top-k and result download; median of many runs after warm-up. Where the B x N fp16 score matrix
would pass --max-scores-gib, the catalog is processed in chunks (matmul + topk per chunk, then a
topk over the chunk winners), which is what one does in PyTorch to fit memory; the output says
so. One JSON object per line goes to --out.
"""
import argparse
import json
import sys

import torch

M32 = 0xFFFFFFFF


def bench_values(seed, start, count, device):
    """kernels_bench_value(seed, i) for i in [start, start + count), as float32."""
    i = torch.arange(start, start + count, dtype=torch.int64, device=device)
    x = ((i * 0x9E3779B1) & M32) ^ ((i >> 32) & M32) ^ (seed & M32)
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & M32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & M32
    x = x ^ (x >> 16)
    return (x >> 8).to(torch.float32) * (1.0 / 8388608.0) - 1.0


def self_check():
    # Values printed by tests/test_gpu_host.c (bench_values_are_reproducible) for seed 1.
    got = bench_values(1, 0, 2, "cpu").tolist() + bench_values(1, 123456789, 1, "cpu").tolist()
    want = [-0.364802361, 0.38769269, -0.705034971]
    for g, w in zip(got, want):
        if abs(g - w) > 1e-8:
            sys.exit(f"torch_baseline: generator mismatch: {got} vs {want}")


def make_catalog(n, d, seed, device):
    x = torch.empty((n, d), dtype=torch.float16, device=device)
    rows = max(1, (1 << 27) // d)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        x[r0:r1] = bench_values(seed, r0 * d, (r1 - r0) * d, device).view(r1 - r0, d).half()
    return x


def search(xt, q_host, k, chunk, device):
    q = q_host.to(device, non_blocking=True)
    n = xt.shape[1]
    if chunk >= n:
        vals, idx = torch.topk(torch.matmul(q, xt), k, dim=1)
    else:
        cv, ci = [], []
        for c0 in range(0, n, chunk):
            s = torch.matmul(q, xt[:, c0:c0 + chunk])
            v, i = torch.topk(s, min(k, s.shape[1]), dim=1)
            cv.append(v)
            ci.append(i + c0)
        v, pos = torch.topk(torch.cat(cv, dim=1), k, dim=1)
        vals, idx = v, torch.gather(torch.cat(ci, dim=1), 1, pos)
    return vals.cpu(), idx.cpu()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", default="1000000,10000000")
    ap.add_argument("--d", default="128,256")
    ap.add_argument("--b", default="1,16,128,1024")
    ap.add_argument("--k", default="10,100,1000")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--max-scores-gib", type=float, default=8.0)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out")
    a = ap.parse_args()
    if a.quick:
        a.n, a.d, a.b, a.k, a.iters = "1000000", "128", "1,128", "10,1000", 10
    self_check()
    if not torch.cuda.is_available():
        sys.exit("torch_baseline: no CUDA device")
    dev = torch.device("cuda")
    out = open(a.out, "w") if a.out else None
    name = torch.cuda.get_device_name(dev)
    print(f"device: {name}, torch {torch.__version__}")
    print(f"{'N':>9} {'d':>4} {'B':>5} {'k':>5} {'ms/batch':>10} {'chunked':>8}")
    for n in map(int, a.n.split(",")):
        for d in map(int, a.d.split(",")):
            x = make_catalog(n, d, a.seed, dev)
            xt = x.t()
            for b in map(int, a.b.split(",")):
                q = bench_values(a.seed + 1, 0, b * d, dev).view(b, d).half().cpu().pin_memory()
                chunk = max(1, int(a.max_scores_gib * (1 << 30) // (b * 2)))
                for k in map(int, a.k.split(",")):
                    for _ in range(3):
                        search(xt, q, k, chunk, dev)
                    times, spent = [], 0.0
                    while len(times) < a.iters and (len(times) < 5 or spent < 3000.0):
                        e0 = torch.cuda.Event(enable_timing=True)
                        e1 = torch.cuda.Event(enable_timing=True)
                        e0.record()
                        vals, idx = search(xt, q, k, chunk, dev)
                        e1.record()
                        e1.synchronize()
                        times.append(e0.elapsed_time(e1))
                        spent += times[-1]
                    times.sort()
                    med = times[len(times) // 2]
                    print(f"{n:>9} {d:>4} {b:>5} {k:>5} {med:>10.3f} {str(chunk < n):>8}")
                    rec = {"kind": "torch", "device": name, "n": n, "d": d, "b": b, "k": k,
                           "ms_median": round(med, 4), "ms_min": round(times[0], 4),
                           "runs": len(times), "chunked": chunk < n,
                           "top_rows": idx[0, :10].tolist(),
                           "top_scores": [float(v) for v in vals[0, :10]]}
                    if out:
                        out.write(json.dumps(rec) + "\n")
                        out.flush()
            del x, xt
            torch.cuda.empty_cache()
    if out:
        out.close()


if __name__ == "__main__":
    main()
