#!/usr/bin/env python3
"""Plots latency against batch from a kvbuffer-bench JSON file and prints its markdown tables.

usage: plot_results.py RESULT.json PLOT.png
"""
import json
import sys


def main():
    res = json.load(open(sys.argv[1]))
    rows = res["rows"]
    B = [r["B"] for r in rows]
    best = res["best"]
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 4.5))
        ax.loglog(B, [r["recurrent_us"] for r in rows], "o-", label="recurrent decode")
        ax.loglog(B, [r["buffered_us"] for r in rows], "s-",
                  label=f"KVBuffer decode ({best['buffer_dtype']} rows, C={best['C']})")
        ax.loglog(B, [r["verify4_us"] for r in rows], "^-", label="verify 4 drafts")
        ax.loglog(B, [r["flush_us"] for r in rows], "v-", label="flush (fold C rows)")
        ax.loglog(B, [r["read_floor_us"] for r in rows], "k--", label="read-once floor")
        ax.set_xlabel("batch (sequences)")
        ax.set_ylabel("latency per layer step (us)")
        ax.set_title(f"{res['card']}, Qwen3-Next shapes, fp32 state, one layer")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(sys.argv[2], dpi=120)
    except ImportError:
        print("matplotlib missing: no plot", file=sys.stderr)
    print("| B | recurrent_us | buffered_us | buffered/recurrent | flush_us | verify4_us | "
          "read_floor_us | buffered/floor | copy_TBps | read_TBps |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['B']} | {r['recurrent_us']:.1f} | {r['buffered_us']:.1f} | "
              f"{r['buffered_us'] / r['recurrent_us']:.3f} | {r['flush_us']:.1f} | "
              f"{r['verify4_us']:.1f} | {r['read_floor_us']:.1f} | "
              f"{r['buffered_us'] / r['read_floor_us']:.2f} | {r['copy_TBps']:.3f} | "
              f"{r['read_TBps']:.3f} |")
    print()
    print("| B | T | ms | Mtok_s |")
    print("|---|---|---|---|")
    for p in res["prefill"]:
        print(f"| {p['B']} | {p['T']} | {p['ms']:.3f} | {p['Mtok_s']:.2f} |")
    print()
    print("| rows | C | " + " | ".join(f"B={b} buffered/recurrent" for b in B) + " |")
    print("|---|---|" + "---|" * len(B))
    for c in res["sweep"]:
        ratios = [f"{r['buffered_us'] / r['recurrent_us']:.3f}" for r in c["rows"]]
        print(f"| {c['buffer_dtype']} | {c['C']} | " + " | ".join(ratios) + " |")


if __name__ == "__main__":
    main()
