#!/usr/bin/env python3
"""gpu_results.py RES GPU MODE STEP...: the joined results table of bench/gpu_suite.sh (results.md).

Reads RES/bench_kernels.jsonl and RES/torch_baseline.jsonl (either may be missing or cut short);
every figure comes from those files, measured in the one run."""
import json, os, sys
res, gpu, mode, steps = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
def load(name):
    p = os.path.join(res, name)
    if not os.path.exists(p):
        return []
    out = []
    for line in open(p):
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out
ours, torch = load("bench_kernels.jsonl"), load("torch_baseline.jsonl")
tmap = {(r["n"], r["d"], r["b"], r["k"]): r for r in torch if r.get("kind") == "torch"}
print(f"# GPU suite on {gpu}\n")
print(f"Build mode: {mode}. Every figure below was measured in this one run.\n")
print("| step | outcome | time |\n| --- | --- | --- |")
for s in steps:
    print(s)
for c in (r for r in ours if r.get("kind") == "ceilings"):
    print(f"\nCeilings: device-to-device copy {c['copy_gbps']:.0f} GB/s (read + write), "
          f"fp16 GEMM {c['gemm_tflops']:.1f} TFLOP/s (8192³, fp32 accumulate).")
mem = [r for r in ours if r.get("kind") == "memory"]
if mem:
    print("\n| N | d | N·d·2 (MiB) | vectors (MiB) | table with norms and attributes (MiB) | device memory taken (MiB) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for m in mem:
        mib = 1 << 20
        print(f"| {m['n']} | {m['d']} | {m['catalog_bytes']/mib:.0f} | {m['vector_bytes']/mib:.0f} "
              f"| {m['table_bytes']/mib:.0f} | {m['device_used_delta']/mib:.0f} |")
rows = [r for r in ours if r.get("kind") == "search"]
if rows:
    print("\n| N | d | B | k | ms/batch | GB/s | TFLOP/s | floor ms | ratio to floor | PyTorch ms | speed-up | top-10 same as PyTorch |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        t = tmap.get((r["n"], r["d"], r["b"], r["k"]))
        tms = f"{t['ms_median']:.3f}" if t else "-"
        sp = f"{t['ms_median'] / r['ms_median']:.2f}×" if t else "-"
        agree = "-"
        if t:
            a, b = r.get("top_rows", []), t.get("top_rows", [])
            agree = f"{len(set(a) & set(b))}/{max(len(a), len(b))}"
        print(f"| {r['n']} | {r['d']} | {r['b']} | {r['k']} | {r['ms_median']:.3f} | {r['gbps']:.0f} "
              f"| {r['tflops']:.1f} | {r['floor_ms']:.3f} | {r['ratio']:.2f} | {tms} | {sp} | {agree} |")
    print("\nTimes are CUDA-event medians per batch including query upload and result download, for "
          "both programs. Top-10 agreement is informational: PyTorch rounds scores to fp16 "
          "(more ties), ours keeps fp32 scores.")
