"""The report of ``compare.py``: its Markdown table, ending with the fastest eeengine
configuration within the bound at each batch size (:func:`fastest_within`), and its plot."""

from __future__ import annotations

from pathlib import Path

from results_io import markdown_table

BASELINES = ("hf_eager", "ort_int8")  # ratio columns
REFERENCE = ("eeengine_torch_full", "hf_eager")  # fp32 full depth, the first one present


def fastest_within(report: dict, batch_size: int, drop: float = 0.5) -> tuple[str, float] | None:
    """The fastest eeengine provider at ``batch_size`` (1: median latency, else inputs/s) whose
    accuracy at that batch size is within ``drop`` points of fp32 full depth, and the bound.

    Returns:
        (provider name, bound in %), or None when no fp32 full-depth row or no provider is in it.
    """
    rows = report["providers"]
    reference = next((n for n in REFERENCE if n in rows), None)
    if reference is None:
        return None
    bound = rows[reference][f"accuracy_b{batch_size}"] - drop
    inside = [
        n
        for n, r in rows.items()
        if n.startswith("eeengine_") and r[f"accuracy_b{batch_size}"] >= bound - 1e-9
    ]
    if not inside:
        return None
    if batch_size == 1:
        return min(inside, key=lambda n: rows[n]["median_ms"]), bound
    return max(inside, key=lambda n: rows[n][f"sentences_per_s_b{batch_size}"]), bound


def markdown(report: dict, batch_sizes: list[int]) -> str:
    rows = report["providers"]
    bases = [b for b in BASELINES if b in rows]
    header = ["provider", "policy", "acc. b=1", "avg exit layer b=1", "1/ρ", "median ms (b=1)"]
    header += ["p90 ms", *(f"× {b}" for b in bases)]
    for size in batch_sizes:
        header += [f"acc. b={size}", f"inputs/s b={size}", *(f"× {b} b={size}" for b in bases)]
    cells = []
    for name, r in rows.items():
        policy = r["policy"] + "".join(f" {k}={r[k]}" for k in ("threshold", "patience") if k in r)
        if r.get("window"):
            policy += f" window={r['window']} {r.get('window_test', '')}"
        layers = f"{r['avg_exit_layer_b1']:.2f}" if "avg_exit_layer_b1" in r else ""
        flops = f"{1 / r['flops_ratio_b1']:.2f}×" if "flops_ratio_b1" in r else ""
        line = [name, policy, f"{r['accuracy_b1']:.2f}", layers, flops, f"{r['median_ms']:.2f}"]
        line += [f"{r['p90_ms']:.2f}", *(f"{r[f'speedup_median_vs_{b}']:.2f}" for b in bases)]
        for size in batch_sizes:
            line += [f"{r[f'accuracy_b{size}']:.2f}", f"{r[f'sentences_per_s_b{size}']:.1f}"]
            line += [f"{r[f'throughput_vs_{b}_b{size}']:.2f}" for b in bases]
        cells.append(line)
    lines = [markdown_table(header, cells)]  # its last newline and the join's: a blank line
    drop = report["max_drop"]
    for size in [1, *batch_sizes]:
        found = fastest_within(report, size, drop)
        if found is None:
            continue
        name, bound = found
        r = rows[name]
        if size == 1:
            ratios = ", ".join(f"{r[f'speedup_median_vs_{b}']:.2f}× {b}" for b in bases)
            speed = f"{r['median_ms']:.2f} ms"
        else:
            ratios = ", ".join(f"{r[f'throughput_vs_{b}_b{size}']:.2f}× {b}" for b in bases)
            speed = f"{r[f'sentences_per_s_b{size}']:.1f} inputs/s"
        lines.append(
            f"- batch {size}: fastest eeengine within {drop} points of fp32 full depth "
            f"(≥ {bound:.2f}): {name}, {r[f'accuracy_b{size}']:.2f}, {speed} ({ratios})"
        )
    return "\n".join(lines) + "\n"


def plot(report: dict, batch_size: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in report["providers"].items():
        speed, acc = r[f"sentences_per_s_b{batch_size}"], r[f"accuracy_b{batch_size}"]
        ax.scatter(speed, acc)
        ax.annotate(name, (speed, acc), fontsize=7)
    ax.set_xlabel(f"inputs / s at batch {batch_size} ({report['threads']} threads)")
    ax.set_ylabel(f"{report['task']} accuracy at batch {batch_size} (%), {report['inputs']} inputs")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
