"""Trade-off report: every exit policy over its threshold range on a labelled split.

``eeengine eval --sweep`` runs the model to full depth once, sweeps every policy the checkpoint
supports (:func:`eeengine.evaluation.sweep`) and writes three files:

- ``PREFIX.json``: the whole sweep, the metrics of each single exit, and the summary;
- ``PREFIX.md``: the summary table (task metric at 1.5x and 2x layer speed-up, best speed-up
  within 1 point of full depth) and the per-exit table;
- ``PREFIX.png``: metric against average exit layer, one curve per policy (its Pareto front:
  the best metric at each speed), with full depth and every single fixed exit as reference
  points; one panel per reported metric.

Layer speed-up is L / average exit layer (2x: half the layers on average); the papers' speed-up
is the layer saving 1 - average exit layer / L (2x = 50 %).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from eeengine.calibration import measure_trade_off
from eeengine.data import Split
from eeengine.engine import Engine
from eeengine.evaluation import all_exit_logits, exit_metrics, policy_params
from eeengine.selection import choose_for_speedup, choose_operating_point

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# Layer speed-ups (L / average exit layer) the summary reports the metric at.
SPEEDUP_TARGETS = (1.5, 2.0)
# The summary's best speed-up is the fastest point within this many metric points of full depth.
SUMMARY_MAX_DROP = 1.0


def per_exit_metrics(engine: Engine, data: Split, metric: str) -> list[float]:
    """``metric`` of every exit at full depth on ``data``, run by the engine's own executor (at
    its precision) with its token pruning; one value per layer, layer 1 first."""
    logits = all_exit_logits(
        engine.model,
        engine.tokenizer,
        data.texts,
        data.text_pairs,
        engine.max_length,
        token_pruning=engine.token_pruning,
        executor=engine.exit_loop().executor,
    )
    return exit_metrics(logits, data.labels, metric)


def sweep_report(
    engine: Engine,
    task: str,
    split_name: str,
    data: Split,
    metric: str,
    extra_metrics: Sequence[str] = (),
    progress: bool = False,
) -> dict:
    """Sweep every policy that applies to ``engine``'s model on a labelled split.

    The model runs to full depth once (:func:`eeengine.calibration.measure_trade_off`, with the
    engine's token pruning and the model's extra signals, so ``lte`` is swept when the model
    has an LTE module). Every point carries MPEE's FLOPs ratio ρ and 1 / ρ (the engine's token
    pruning and the inputs' token counts, :mod:`eeengine.flops`).

    Args:
        engine: the loaded checkpoint (its policy plays no part: every policy is swept).
        task: the task's name, for the report.
        split_name: the split's name, for the report ("dev").
        data: texts, optional text pairs and labels.
        metric: the primary metric (a key of :data:`eeengine.metrics.METRICS`); the summary's
            points are picked by it.
        extra_metrics: other metrics reported beside it (MRPC: accuracy; STS-B: Spearman).
        progress: show a progress bar over the full-depth pass.

    Returns:
        The :func:`eeengine.evaluation.sweep` result plus ``task``, ``split``, ``examples``,
        ``checkpoint``, ``metrics`` (the names reported, primary first), ``exits`` (per
        single exit: ``layer`` and ``metrics``) and ``summary`` (see :func:`summarize`).
    """
    trade_off = measure_trade_off(
        engine.model,
        engine.tokenizer,
        data.texts,
        data.text_pairs,
        data.labels,
        metric,
        engine.max_length,
        extra_metrics,
        engine.token_pruning,
        progress=progress,
        executor=engine.exit_loop().executor,  # the engine's layers, at its precision
    )
    calibration, all_logits = trade_off.sweep, trade_off.all_logits
    names = list(calibration["full_depth_metrics"])
    per_exit = {name: exit_metrics(all_logits, data.labels, name) for name in names}
    return {
        "task": task,
        "split": split_name,
        "examples": len(data.texts),
        "checkpoint": str(engine.path),
        "metrics": names,
        "exits": [
            {"layer": layer, "metrics": {name: per_exit[name][layer - 1] for name in names}}
            for layer in range(1, engine.num_layers + 1)
        ],
        "summary": summarize(calibration),
        **calibration,
    }


def summarize(
    calibration: dict,
    targets: tuple[float, ...] = SPEEDUP_TARGETS,
    max_drop: float = SUMMARY_MAX_DROP,
) -> list[dict]:
    """Per policy: the most accurate point at each layer speed-up target, and the fastest
    point within ``max_drop`` metric points of full depth.

    Args:
        calibration: a :func:`eeengine.evaluation.sweep` result.
        targets: layer speed-ups L / average exit layer.
        max_drop: metric points below full depth.

    Returns:
        One ``{"policy", "at_speedup": [{"target", "point"}], "max_drop", "within_drop"}`` per
        policy, where a point is a sweep point or None when none qualifies.
    """
    rows = []
    for name in calibration["policies"]:
        rows.append(
            {
                "policy": name,
                "at_speedup": [
                    {
                        "target": target,
                        "point": _point(choose_for_speedup(calibration, target, name)),
                    }
                    for target in targets
                ],
                "max_drop": max_drop,
                "within_drop": _point(choose_operating_point(calibration, max_drop, name)),
            }
        )
    return rows


def _point(chosen: tuple[str, dict] | None) -> dict | None:
    return None if chosen is None else chosen[1]


def markdown(report: dict) -> str:
    """The summary and per-exit tables of a :func:`sweep_report` as GitHub markdown."""
    names = report["metrics"]
    num_layers = report["num_layers"]
    metric_header = " / ".join(names)
    full = " / ".join(f"{report['full_depth_metrics'][n]:.2f}" for n in names)
    first = report["summary"][0]
    headers = [f"{metric_header} at ≥ {t['target']:g}x" for t in first["at_speedup"]]
    headers.append(f"best speed-up within {first['max_drop']:g} point of full depth")
    lines = [
        f"{report['task']} {report['split']} ({report['examples']} examples), "
        f"{num_layers} layers; full depth {metric_header}: {full}. Points are picked by "
        f"{report['metric']}; speed-up is L / average exit layer (layer saving 1 - avg / L).",
        "",
        "| policy | " + " | ".join(headers) + " |",
        "|---" * (len(headers) + 1) + "|",
    ]
    for row in report["summary"]:
        points = [t["point"] for t in row["at_speedup"]] + [row["within_drop"]]
        cells = [_cell(point, names, num_layers) for point in points]
        lines.append(f"| {row['policy']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| exit layer | " + " | ".join(str(e["layer"]) for e in report["exits"]) + " |",
        "|---" * (len(report["exits"]) + 1) + "|",
    ]
    for name in names:
        values = " | ".join(f"{e['metrics'][name]:.2f}" for e in report["exits"])
        lines.append(f"| {name} | {values} |")
    return "\n".join(lines) + "\n"


def _cell(point: dict | None, names: list[str], num_layers: int) -> str:
    """``2.05x: 88.10 / 83.33 (avg 2.93 layers, 1/ρ 2.10x; threshold=0.3)`` or ``none``."""
    if point is None:
        return "none"
    values = " / ".join(f"{point['metrics'][n]:.2f}" for n in names)
    params = ", ".join(
        f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
        for k, v in policy_params(point).items()
        if v is not None
    )
    speedup = num_layers / point["avg_exit_layer"]
    flops = f", 1/ρ {point['flops_speedup']:.2f}x" if "flops_speedup" in point else ""
    return f"{speedup:.2f}x: {values} (avg {point['avg_exit_layer']:.2f} layers{flops}; {params})"


def pareto_front(points: list[dict], metric: str) -> list[dict]:
    """The points no other point beats on both speed and ``metric``: sorted by average exit
    layer, each more accurate than every faster one."""
    front: list[dict] = []
    for point in sorted(points, key=lambda p: (p["avg_exit_layer"], -p["metrics"][metric])):
        if not front or point["metrics"][metric] > front[-1]["metrics"][metric]:
            front.append(point)
    return front


def plot(report: dict) -> Figure:
    """Metric against average exit layer: one panel per reported metric, each policy's Pareto
    front as a line over its swept points, single exits and full depth as references."""
    from matplotlib.figure import Figure  # imported here: 0.3 s of every CLI start otherwise

    names = report["metrics"]
    num_layers = report["num_layers"]
    figure = Figure(figsize=(7 * len(names), 5.5), layout="constrained")
    for axes, name in zip(figure.subplots(1, len(names), squeeze=False)[0], names, strict=True):
        for policy, points in report["policies"].items():
            front = pareto_front(points, name)
            line = axes.plot(
                [p["avg_exit_layer"] for p in front],
                [p["metrics"][name] for p in front],
                marker=".",
                label=policy,
            )[0]
            axes.scatter(
                [p["avg_exit_layer"] for p in points],
                [p["metrics"][name] for p in points],
                s=6,
                alpha=0.25,
                color=line.get_color(),
            )
        axes.plot(
            [e["layer"] for e in report["exits"]],
            [e["metrics"][name] for e in report["exits"]],
            "k--o",
            markersize=5,
            label="single exit k",
        )
        axes.plot(
            [num_layers],
            [report["full_depth_metrics"][name]],
            "r*",
            markersize=16,
            label="full depth",
        )
        axes.set_xlabel(f"average exit layer (of {num_layers}); speed-up = {num_layers} / avg")
        axes.set_ylabel(f"{name} ({report['split']})")
        axes.set_title(f"{report['task']}: {name} vs. average exit layer")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    return figure


def write_report(report: dict, prefix: str | Path) -> list[Path]:
    """Write ``PREFIX.json``, ``PREFIX.md`` and ``PREFIX.png`` (parent folders created).

    Returns:
        The three paths.
    """
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    paths = [prefix.with_name(f"{prefix.name}.{ext}") for ext in ("json", "md", "png")]
    paths[0].write_text(json.dumps(report, indent=2) + "\n")
    paths[1].write_text(markdown(report))
    plot(report).savefig(paths[2], dpi=120)
    return paths
