"""Several configurations on the same images, side by side, with paired differences.

Each configuration has its own report folder; the comparison pairs the images that all of them
scored (by key) and reports, for every metric, each configuration's statistics and the paired
difference (configuration minus the first, the baseline) with its 95% confidence interval.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from evaluation.metrics import paired_difference
from evaluation.report import (
    METRIC_TITLES,
    _environment,
    _json_summary,
    fid_summary,
)
from evaluation.run import LOWER_IS_BETTER, METRICS, EvaluationRun, finite_or_none
from models.atomic import write_text_atomic


def build_comparison(
    runs: Sequence[tuple[str, EvaluationRun]], flags: dict[str, str]
) -> dict[str, Any]:
    """Per metric: each configuration's statistics and its paired difference to the baseline."""
    by_key = [{s.item.key: s for s in run.scores} for _, run in runs]
    common = sorted(set.intersection(*(set(k) for k in by_key))) if by_key else []
    baseline = runs[0][0]
    metrics: dict[str, Any] = {}
    for metric in METRICS:
        values = {
            name: [scores[k].scores[metric] for k in common]
            for (name, _), scores in zip(runs, by_key, strict=True)
        }
        rows: list[dict[str, Any]] = []
        for name, _ in runs:
            difference = None
            if name != baseline:
                raw = paired_difference(values[baseline], values[name])
                difference = {
                    k: finite_or_none(v) if isinstance(v, float) else v for k, v in raw.items()
                }
            rows.append(
                {"name": name, "summary": _json_summary(values[name]), "difference": difference}
            )
        metrics[metric] = {
            "lower_is_better": metric in LOWER_IS_BETTER,
            "computed": any(row["summary"]["count"] for row in rows),
            "rows": rows,
        }
    return {
        "baseline": baseline,
        "configurations": [
            {
                "name": name,
                "flags": flags.get(name, ""),
                "images": len(run.scores),
                "failed": len(run.failures),
                "report": f"{name}/report.html",
                "images_per_second": run.images_per_second,
                "fid": fid_summary(run),
            }
            for name, run in runs
        ],
        "paired_images": len(common),
        "metrics": metrics,
    }


def write_comparison(report_dir: Path, comparison: dict[str, Any]) -> Path:
    """comparison.json and comparison.html in ``report_dir``; returns the page."""
    write_text_atomic(
        report_dir / "comparison.json", json.dumps(comparison, indent=2, allow_nan=False) + "\n"
    )
    html = (
        _environment()
        .get_template("compare.html.j2")
        .render(comparison=comparison, metrics=METRICS, titles=METRIC_TITLES)
    )
    page = report_dir / "comparison.html"
    write_text_atomic(page, html)
    return page
