"""Picking an operating point from a sweep (:func:`eeengine.evaluation.sweep`,
``calibration.json``): the fastest point within a metric drop of full depth, optionally at a
confidence, or the most accurate one at a layer speed-up."""

from __future__ import annotations

from collections.abc import Iterator
from statistics import NormalDist


def reference_full_depth(calibration: dict) -> float:
    """The full-depth metric a sweep's ``max_drop`` is measured from: ``reference_full_depth``
    where the sweep has it, else its own ``full_depth``.

    A sweep measured at a reduced precision (``calibration-int8.json``) records the fp32
    model's full depth on the same data as ``reference_full_depth`` (the trainer writes it), so
    "within 0.5 points of full depth" at int8 means within 0.5 points of the model as trained,
    quantization loss included, not of the quantized model's own full depth.
    """
    return calibration.get("reference_full_depth", calibration["full_depth"])


def choose_operating_point(
    calibration: dict,
    max_drop: float = 0.5,
    policy: str | None = None,
    confidence: float | None = None,
) -> tuple[str, dict] | None:
    """The fastest swept point whose metric is within ``max_drop`` points of full depth
    (:func:`reference_full_depth`: the fp32 model's, for a sweep measured at another precision
    that records it).

    The fastest of many points that pass on the calibration examples tends to be one that was
    lucky there, and loses more on other data (the winner's curse: RESULTS.md, "Calibration
    at a confidence"). With ``confidence`` every point searched must pass
    ``drop + z * max(drop_std, 100 / n) <= max_drop``: ``drop_std`` its paired-bootstrap
    spread, ``100 / n`` one of the n calibration examples (a point that never disagrees with
    full depth on them has a bootstrap spread of 0), z the standard normal quantile of
    ``1 - (1 - confidence) / K`` over the K points searched (a union bound: under the normal
    model the chosen point's true drop exceeds ``max_drop`` with probability at most
    ``1 - confidence``). Conservative: with a few hundred points and examples it can leave
    only near-full-depth points.

    Args:
        calibration: the result of :func:`sweep` (``calibration.json``).
        max_drop: allowed loss in metric points (for accuracy, percentage points).
        policy: restrict to one policy; None searches all of them.
        confidence: in (0, 1), or None for the drop as measured (z = 0).

    Returns:
        (policy name, point) or None when no point qualifies. Ties in speed go to the higher
        metric.

    Raises:
        ValueError: ``confidence`` outside (0, 1), or given for a sweep whose points have no
            ``drop_std`` (measured before eeengine recorded it: calibrate again).
    """
    points = list(iter_points(calibration, policy))
    margin, least = 0.0, 0.0
    if confidence is not None:
        margin = normal_quantile(1.0 - (1.0 - checked_confidence(confidence)) / max(len(points), 1))
        if "num_examples" not in calibration or any("drop_std" not in p for _, p in points):
            raise ValueError(
                "this calibration has no drop_std (measured before eeengine recorded it), so "
                "confidence cannot be used with it: calibrate again (eeengine calibrate)"
            )
        least = 100.0 / calibration["num_examples"]
    floor = reference_full_depth(calibration) - max_drop
    best = None
    for name, point in points:
        spread = point.get("drop_std", 0.0)
        if confidence is not None and spread is None:
            continue  # an unknown spread cannot be bounded
        if point["metric"] - margin * max(spread or 0.0, least) < floor - 1e-9:
            continue
        key = (point["avg_exit_layer"], -point["metric"])
        if best is None or key < best[0]:
            best = (key, name, point)
    return None if best is None else (best[1], best[2])


def checked_confidence(confidence: float) -> float:
    """``confidence``, checked to be a number in (0, 1).

    Raises:
        ValueError: otherwise.
    """
    if isinstance(confidence, bool) or not isinstance(confidence, int | float):
        raise ValueError(f"confidence must be a number in (0, 1), got {confidence!r}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return float(confidence)


def normal_quantile(probability: float) -> float:
    """z with P(Z <= z) = ``probability`` for a standard normal Z."""
    return NormalDist().inv_cdf(probability)


def choose_for_speedup(
    calibration: dict, target_speedup: float, policy: str | None = None
) -> tuple[str, dict] | None:
    """The most accurate swept point whose layer speed-up L / avg_exit_layer is at least
    ``target_speedup``.

    Args:
        calibration: the result of :func:`sweep` (``calibration.json``).
        target_speedup: minimum L / average exit layer (2.0: half the layers on average, a
            layer saving 1 - avg / L of 50 %).
        policy: restrict to one policy; None searches all of them.

    Returns:
        (policy name, point) or None when no point is that fast. Ties in metric go to the
        faster point.
    """
    num_layers = calibration["num_layers"]
    best = None
    for name, point in iter_points(calibration, policy):
        if num_layers / point["avg_exit_layer"] < target_speedup - 1e-9:
            continue
        key = (-point["metric"], point["avg_exit_layer"])
        if best is None or key < best[0]:
            best = (key, name, point)
    return None if best is None else (best[1], best[2])


def iter_points(calibration: dict, policy: str | None) -> Iterator[tuple[str, dict]]:
    """(policy name, point) of every swept point, or of one policy's."""
    for name, points in calibration["policies"].items():
        if policy is None or name == policy:
            for point in points:
                yield name, point
