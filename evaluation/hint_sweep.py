"""Quality as a function of the number of hints: ``evaluate --hints 0,1,2,5,10``.

One run per count on the same photos with the same model (loaded once). Each count has its full
report in ``REPORT_DIR/hints-N/``; this module writes the sweep's own files beside them:
``hints.json`` (every count's statistics over the photos all counts scored, with the paired
difference to the smallest count), ``hints.md`` (the table), ``hints.html`` (the table, the
curve and links to each count's report) and ``report_files/hints_curve.png``.

The hints are the SIGGRAPH17 paper's protocol, points revealed at random from the ground truth
(``evaluation.run.photo_hints``): per photo, a generator seeded with ``hint_seed`` (its name and
``--seed``) draws each point's centre uniformly in the 256x256 network input and its square side
uniformly in 1..9 (``models.hints.ground_truth_hints``); the point carries the patch's mean ab of
the ground truth squashed to 256x256. The same generator serves every count, so the N points of a
count are the first N of any larger count: more hints only add points.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from evaluation.metrics import paired_difference
from evaluation.report import FILES_DIR, METRIC_TITLES, _environment, _format, _json_summary
from evaluation.run import LOWER_IS_BETTER, METRICS, EvaluationRun, finite_or_none
from models.atomic import write_text_atomic
from models.constants import HINT_SIZE_RANGE
from models.preprocess import NETWORK_SIZE

CURVE = f"{FILES_DIR}/hints_curve.png"
SHORT_TITLES = {"psnr": "PSNR (dB) ↑", "ssim": "SSIM ↑", "lpips": "LPIPS ↓",
                "colorfulness": "colorfulness"}  # fmt: skip
SAMPLING = (
    f"per photo, points with a centre uniform in the {NETWORK_SIZE}x{NETWORK_SIZE} network input "
    f"and a square side uniform in {HINT_SIZE_RANGE[0]}..{HINT_SIZE_RANGE[1]}, each carrying the "
    f"patch's mean Lab ab of the ground truth squashed to {NETWORK_SIZE}x{NETWORK_SIZE} (PIL "
    "bilinear); one generator per photo seeded with crc32(its images/ name) + seed * 2**32, so "
    "the N points of a count are the first N of any larger count"
)


def count_dir(count: int) -> str:
    """The folder, inside the report folder, of one count's full report."""
    return f"hints-{count}"


def _clean(raw: dict[str, float | int]) -> dict[str, Any]:
    return {k: finite_or_none(v) if isinstance(v, float) else v for k, v in raw.items()}


def build_hint_sweep(
    runs: Sequence[tuple[int, EvaluationRun]],
    seed: int,
    config: dict[str, Any],
    model: dict[str, Any],
    machine: dict[str, Any],
) -> dict[str, Any]:
    """Per count (increasing): the metrics over the photos every count scored, the hinted area
    and, after the first, the paired difference to the first count (count minus first)."""
    by_key = [{s.item.key: s for s in run.scores} for _, run in runs]
    common = sorted(set.intersection(*(set(k) for k in by_key))) if by_key else []
    baseline = by_key[0] if by_key else {}
    rows: list[dict[str, Any]] = []
    for index, ((count, run), scores) in enumerate(zip(runs, by_key, strict=True)):
        metrics: dict[str, Any] = {}
        differences: dict[str, Any] = {}
        for metric in METRICS:
            values = [scores[k].scores[metric] for k in common]
            metrics[metric] = _json_summary(values)
            if index:
                base = [baseline[k].scores[metric] for k in common]
                differences[metric] = _clean(paired_difference(base, values))
        hinted = _json_summary([float(scores[k].hinted_pixels) for k in common])
        mean = hinted["mean"]
        rows.append(
            {
                "hints": count,
                "report": f"{count_dir(count)}/report.html",
                "images": len(run.scores),
                "failed": len(run.failures),
                "images_per_second": run.images_per_second,
                "hinted_pixels": hinted,
                "hinted_fraction": None if mean is None else mean / NETWORK_SIZE**2,
                "metrics": metrics,
                "difference": differences or None,
            }
        )
    return {
        "counts": [count for count, _ in runs],
        "baseline": runs[0][0] if runs else None,
        "seed": seed,
        "sampling": SAMPLING,
        "network_size": NETWORK_SIZE,
        "paired_images": len(common),
        "computed_metrics": [m for m in METRICS if any(r["metrics"][m]["count"] for r in rows)],
        "lower_is_better": sorted(LOWER_IS_BETTER),
        "rows": rows,
        "config": config,
        "model_version": model.get("model_version"),
        "model": model,
        "machine": machine,
    }


def _interval(stats: dict[str, Any], digits: int = 4) -> str:
    low, high = stats["ci95_low"], stats["ci95_high"]
    if low is None or high is None:
        return ""
    return f" [{_format(low, digits)}, {_format(high, digits)}]"


def hint_sweep_markdown(sweep: dict[str, Any]) -> str:
    """The table: one row per count, the mean of every computed metric, the hinted area, and
    the paired PSNR difference to the first count with its 95% interval."""
    metrics = sweep["computed_metrics"]
    area = NETWORK_SIZE**2
    header = ["hints", f"hinted pixels (mean, of {area:,})",
              *(SHORT_TITLES[m] for m in metrics)]  # fmt: skip
    if "psnr" in metrics:
        header.append(f"PSNR − {sweep['baseline']} hints [95% CI]")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in sweep["rows"]:
        cells = [str(row["hints"]), _format(row["hinted_pixels"]["mean"], 1)]
        cells += [_format(row["metrics"][m]["mean"]) for m in metrics]
        if "psnr" in metrics:
            difference = (row["difference"] or {}).get("psnr")
            if difference is None:
                cells.append("baseline")
            elif difference["mean"] is None:
                cells.append("–")
            else:
                cells.append(f"{difference['mean']:+.4f}{_interval(difference)}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _errorbar(axis: Any, counts: list[int], stats: list[dict[str, Any] | None]) -> None:
    """Means with their 95% interval as error bars (a missing statistic: no point, no bar)."""
    means = [math.nan if s is None or s["mean"] is None else s["mean"] for s in stats]
    low = [0.0 if s is None or s["ci95_low"] is None else m - s["ci95_low"]
           for m, s in zip(means, stats, strict=True)]  # fmt: skip
    high = [0.0 if s is None or s["ci95_high"] is None else s["ci95_high"] - m
            for m, s in zip(means, stats, strict=True)]  # fmt: skip
    axis.errorbar(counts, means, yerr=[low, high], marker="o", capsize=3, color="#4a78b5")
    axis.grid(alpha=0.3)


def _curve(sweep: dict[str, Any], path: Path) -> bool:
    """One column per computed metric: its mean against the count (top) and the paired
    difference to the first count (bottom), each with its 95% interval as error bars."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    from matplotlib import pyplot as plt

    metrics = sweep["computed_metrics"]
    rows = sweep["rows"]
    if not metrics or not rows:
        return False
    figure, axes = plt.subplots(2, len(metrics), figsize=(3.6 * len(metrics), 5.6), dpi=100,
                                squeeze=False, sharex=True)  # fmt: skip
    counts = [row["hints"] for row in rows]
    zero = {"mean": 0.0, "ci95_low": None, "ci95_high": None}
    for column, metric in enumerate(metrics):
        top, bottom = axes[0][column], axes[1][column]
        _errorbar(top, counts, [row["metrics"][metric] for row in rows])
        top.set_title(METRIC_TITLES[metric], fontsize=9)
        _errorbar(bottom, counts,
                  [row["difference"][metric] if row["difference"] else zero for row in rows])  # fmt: skip
        bottom.axhline(0.0, color="#999", linewidth=0.8)
        bottom.set_title(f"paired difference to {sweep['baseline']} hints", fontsize=9)
        bottom.set_xlabel("hints per image")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    plt.close(figure)
    return True


def write_hint_sweep(report_dir: Path, sweep: dict[str, Any]) -> Path:
    """hints.json, hints.md, report_files/hints_curve.png and hints.html; returns the page."""
    write_text_atomic(
        report_dir / "hints.json", json.dumps(sweep, indent=2, allow_nan=False) + "\n"
    )
    table = hint_sweep_markdown(sweep)
    write_text_atomic(report_dir / "hints.md", table)
    curve = CURVE if _curve(sweep, report_dir / CURVE) else None
    html = (
        _environment()
        .get_template("hints.html.j2")
        .render(
            sweep=sweep, titles=METRIC_TITLES, short=SHORT_TITLES, curve=curve, area=NETWORK_SIZE**2
        )
    )
    page = report_dir / "hints.html"
    write_text_atomic(page, html)
    return page
