"""The serving-path mode's table and picture: CPU per call stacked by process, ours beside the peer's, and
calls/s per workload."""

from __future__ import annotations

from pathlib import Path

ROLES = ("proxy", "router", "replica", "gateway", "rest", "peer")
COLORS = {"proxy": "#4477aa", "router": "#66ccee", "replica": "#228833", "gateway": "#ccbb44", "rest": "#bbbbbb",
          "peer": "#ee6677"}


def table(r: dict) -> str:
    lines = [f"serving path: {r['model']}, {r['callers']} callers for W3, {r['cpus']} CPUs",
             f"{'system':<6}{'workload':<20}{'calls/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'CPU ms/call':>13}  by process"]
    systems = [("ours", r["workloads"])]
    if "workloads" in r.get("peer", {}):
        systems.append(("peer", r["peer"]["workloads"]))
    for system, rows in systems:
        for name, v in rows.items():
            parts = " ".join(f"{k} {x:.2f}" for k, x in v["cpu_ms_per_call"].items())
            lines.append(f"{system:<6}{name:<20}{v['rate']:>9.0f}{v['p50_ms']:>9.1f}{v['p99_ms']:>9.1f}"
                         f"{v['server_cpu_ms_per_call']:>13.2f}  {parts}")
    if len(systems) == 2:
        lines.append("ours / peer: " + ", ".join(
            f"{n} {_ratio(v['rate'], systems[1][1][n]['rate'])} calls/s, CPU/call "
            f"{_ratio(v['server_cpu_ms_per_call'], systems[1][1][n]['server_cpu_ms_per_call'])}"
            for n, v in systems[0][1].items() if n in systems[1][1]))
    if "error" in r.get("peer", {}):
        lines.append(f"the peer failed: {r['peer']['error']}")
    return "\n".join(lines)


def _ratio(ours: float, peer: float) -> str:
    """ours / peer; a peer's figure of 0 (CPU below /proc's 10 ms tick over a short workload) has no ratio."""
    return f"{ours / peer:.2f}x" if peer else "n/a (the peer's figure is 0)"


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    peer = r.get("peer", {}).get("workloads", {})
    bars = []  # (label, row)
    for name, row in r["workloads"].items():
        bars.append((f"{name} ours", row))
        if name in peer:
            bars.append((f"{name} peer", peer[name]))
    fig, (cpu_ax, rate_ax) = plt.subplots(1, 2, figsize=(15, 6))
    x = range(len(bars))
    bottom = [0.0] * len(bars)
    for role in ROLES:
        heights = [row["cpu_ms_per_call"].get(role, 0.0) for _, row in bars]
        if any(heights):
            cpu_ax.bar(x, heights, bottom=bottom, label=role, color=COLORS[role])
            bottom = [b + h for b, h in zip(bottom, heights)]
    cpu_ax.set_xticks(list(x), [label for label, _ in bars], fontsize=8, rotation=40, ha="right")
    cpu_ax.set_ylabel("server CPU per call (ms)")
    cpu_ax.set_title("CPU per one-sentence call, by process")
    cpu_ax.legend(fontsize=8)
    rate_ax.bar(x, [row["rate"] for _, row in bars],
                color=[COLORS["peer"] if label.endswith("peer") else COLORS["proxy"] for label, _ in bars])
    rate_ax.set_xticks(list(x), [label for label, _ in bars], fontsize=8, rotation=40, ha="right")
    rate_ax.set_ylabel("calls/s")
    rate_ax.set_title(f"calls/s (W1: one at a time, W3: {r['callers']} callers)")
    fig.suptitle(f"serving path, {r['model']} ({r['cpus']} CPUs)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
