"""The benchmark's table, JSON and plot."""

from __future__ import annotations

import json
from pathlib import Path


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    if results.get("mode") == "jobs":
        from benchmarks import jobs

        print(jobs.table(results))
        jobs.plot(results, out / "results.png")
    elif results.get("mode") == "serving-path":
        from benchmarks import serving_report

        print(serving_report.table(results))
        serving_report.plot(results, out / "results.png")
    else:
        print(table(results))
        plot(results, out / "results.png")
    print(f"\nwrote {out / 'results.json'} and {out / 'results.png'}")


def table(r: dict) -> str:
    ip = r["in_process"]
    lines = [
        f"in-process limit: {ip['limit']:.0f} sentences/s at batch {ip['limit_batch_size']} "
        f"(by batch size: { {k: round(v) for k, v in ip['rate_by_batch_size'].items()} }); "
        f"one sentence p50 {ip['w1_p50_ms']:.1f} ms; W4 inputs in-process {ip['w4_rate']:.0f}/s",
    ]
    if "in_process_backend" in r:
        b = r["in_process_backend"]
        lines.append(f"service backend {r['backend']} {r.get('precision', 'fp32')} in-process: limit {b['limit']:.0f} sentences/s "
                     f"({b['limit'] / ip['limit']:.2f}x torch), one sentence p50 {b['w1_p50_ms']:.1f} ms, "
                     f"max |diff| vs torch {b['max_abs_diff_vs_torch']:.1e}")
    if "accuracy" in r:
        a = r["accuracy"]
        gate = (f"gate on {a['gate_sentences']} sentences: mean cosine {a['mean_cosine']:.5f}, "
                f"recall@10 {a['recall_at_10']:.4f}" if a.get("gate_sentences") else "no gate (fp32)")
        lines.append(f"precision {a['precision']}: {gate}; canary min cosine {a.get('canary_min_cosine', 0):.6f}"
                     + (f"; REFUSED: {a['refused']}" if a.get("refused") else ""))
    if r.get("tracing"):
        lines.append(f"tracing on: every call traced, {r.get('spans_exported', 0)} spans exported over OTLP")
    lines += [
        "ratios: to in-process torch encode" + (f"; to in-process {r['backend']}: " + ", ".join(
            f"{n} {v['ratio_same_backend']:.2f}" for n, v in r["workloads"].items() if "ratio_same_backend" in v)
            if "in_process_backend" in r else ""),
        "",
        f"{'workload':<18}{'rate/s':>9}{'ratio':>8}{'p50 ms':>9}{'p99 ms':>9}  batches run (from the service's metrics)",
    ]
    for name, v in r["workloads"].items():
        rate = f"{v['rate']:.0f}" if "rate" in v else "-"
        ratio = f"{v['ratio']:.2f}" if "ratio" in v else "-"
        p50 = f"{v['p50_ms']:.1f}" if "p50_ms" in v else "-"
        p99 = f"{v['p99_ms']:.1f}" if "p99_ms" in v else "-"
        b = v["batches"]
        batches = (f"{b['batches']} x {b['mean_size']:.1f} seq, queue {b['mean_queue_ms']:.1f} ms, "
                   f"forward {b['mean_forward_ms']:.1f} ms, padding {b['padding_share']:.0%}")
        lines.append(f"{name:<18}{rate:>9}{ratio:>8}{p50:>9}{p99:>9}  {batches}")
    if "peer" in r and "workloads" in r["peer"]:
        lines += ["", f"peer: `{r['peer']['command']}` at {r['peer']['url']} (run after the service stopped)",
                  f"{'workload':<18}{'peer rate/s':>12}{'ratio':>8}{'p50 ms':>9}{'p99 ms':>9}  ours/peer"]
        for name, v in r["peer"]["workloads"].items():
            ours = r["workloads"].get(name, {})
            rate = f"{v['rate']:.0f}" if "rate" in v else "-"
            ratio = f"{v['ratio']:.2f}" if "ratio" in v else "-"
            p50 = f"{v['p50_ms']:.1f}" if "p50_ms" in v else "-"
            vs = (f"{ours['rate'] / v['rate']:.2f}x calls/s" if "rate" in v and "rate" in ours
                  else f"p50 {ours['p50_ms']:.1f} vs {v['p50_ms']:.1f} ms" if "p50_ms" in ours else "-")
            p99 = f"{v['p99_ms']:.1f}" if "p99_ms" in v else "-"
            lines.append(f"{name:<18}{rate:>12}{ratio:>8}{p50:>9}{p99:>9}  {vs}")
    return "\n".join(lines)


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, v in r["workloads"].items() if "ratio" in v]
    ratios = [r["workloads"][n]["ratio"] for n in names]
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.bar(names, ratios, color=["#4477aa" if "grpc" in n else "#ee6677" for n in names])
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_ylabel("throughput / in-process encode")
    ax.set_title(f"embedding-service vs in-process (limit {r['in_process']['limit']:.0f} sentences/s)")
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
