"""The report folder: metrics.csv, instances.csv, summary.json and a self-contained report.html.

Everything the page shows lies beside it (``report_files/``: histograms drawn with matplotlib and
grey | colorized | ground-truth contact sheets); the page links nothing outside the folder.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from jinja2 import Environment, PackageLoader, select_autoescape
from PIL import Image

from evaluation.dataset import load_pair
from evaluation.fid import frechet_distance
from evaluation.metrics import summarize
from evaluation.run import LOWER_IS_BETTER, METRICS, EvaluationRun, ImageScore, finite_or_none
from models.atomic import write_text_atomic
from models.grey import training_grey
from models.merge import Resolution

FILES_DIR = "report_files"
METRIC_TITLES = {
    "psnr": "PSNR (dB, higher is better)",
    "ssim": "SSIM (higher is better)",
    "lpips": "LPIPS v0.1 VGG (lower is better)",
    "colorfulness": "Colorfulness (Hasler & Suesstrunk)",
}


def _cell(value: float) -> str:
    """CSV text: empty for a metric not computed (nan), ``inf`` for identical images."""
    if math.isnan(value):
        return ""
    return "inf" if math.isinf(value) else repr(float(value))


def write_metrics_csv(report_dir: Path, run: EvaluationRun) -> Path:
    """``path,psnr,ssim,lpips,colorfulness,instances``; ``instances`` empty without annotations."""
    path = report_dir / "metrics.csv"
    text = io.StringIO()
    out = csv.writer(text)
    out.writerow(["path", *METRICS, "instances"])
    for score in run.scores:
        count = "" if score.instances is None else str(len(score.instances))
        out.writerow([score.item.key, *(_cell(score.scores[m]) for m in METRICS), count])
    write_text_atomic(path, text.getvalue())
    return path


def write_instances_csv(report_dir: Path, run: EvaluationRun) -> Path:
    """One row per scored instance crop: the image, annotation id, category, box, metrics."""
    path = report_dir / "instances.csv"
    text = io.StringIO()
    out = csv.writer(text)
    out.writerow(["path", "annotation_id", "category", "x1", "y1", "x2", "y2", *METRICS])
    for score in run.scores:
        for inst in score.instances or []:
            out.writerow(
                [
                    score.item.key,
                    inst.annotation_id,
                    inst.category,
                    *inst.box,
                    *(_cell(inst.scores[m]) for m in METRICS),
                ]
            )
    write_text_atomic(path, text.getvalue())
    return path


def write_hints_csv(report_dir: Path, run: EvaluationRun) -> Path:
    """With ``--hints N``: one row per hint given, in the order placed (later ones overwrite
    earlier ones where patches overlap): ``path,index,x,y,size,a,b`` (x, y in the scored
    photo's input pixels, a and b its patch's mean ground-truth Lab ab)."""
    path = report_dir / "hints.csv"
    text = io.StringIO()
    out = csv.writer(text)
    out.writerow(["path", "index", "x", "y", "size", "a", "b"])
    for score in run.scores:
        for index, hint in enumerate(score.hints):
            out.writerow([score.item.key, index, repr(hint.x), repr(hint.y), hint.size,
                          repr(hint.a), repr(hint.b)])  # fmt: skip
    write_text_atomic(path, text.getvalue())
    return path


def metric_values(scores: Sequence[ImageScore], metric: str) -> list[float]:
    return [s.scores[metric] for s in scores]


def _json_summary(values: Sequence[float]) -> dict[str, Any]:
    return {
        k: finite_or_none(v) if isinstance(v, float) else v for k, v in summarize(values).items()
    }


def build_summary(
    run: EvaluationRun, config: dict[str, Any], model: dict[str, Any], machine: dict[str, Any]
) -> dict[str, Any]:
    """What summary.json holds: per-metric statistics, counts, configuration, model, machine."""
    summary: dict[str, Any] = {
        "images": len(run.scores),
        "failed": len(run.failures),
        "failures": [{"path": p, "reason": r} for p, r in run.failures],
        "metrics": {m: _json_summary(metric_values(run.scores, m)) for m in METRICS},
        "ground_truth_colorfulness": _json_summary([s.target_colorfulness for s in run.scores]),
        "instances": None,
        "config": config,
        "model_version": model.get("model_version"),
        "model": model,
        "machine": machine,
        "throughput": {"seconds": run.seconds, "images_per_second": run.images_per_second},
    }
    summary["fid"] = fid_summary(run)
    if any(s.hints for s in run.scores):
        summary["hinted_pixels"] = _json_summary([float(s.hinted_pixels) for s in run.scores])
    if any(s.instances is not None for s in run.scores):
        crops = [i for s in run.scores for i in s.instances or []]
        summary["instances"] = {
            "scored": len(crops),
            "skipped_too_small": sum(s.skipped_instances for s in run.scores),
            "metrics": {m: _json_summary([c.scores[m] for c in crops]) for m in METRICS},
        }
    return summary


def fid_summary(run: EvaluationRun, dims: int | None = None) -> dict[str, Any] | None:
    """FID of the colorized set against the ground-truth set; None where it was not computed."""
    pairs = [s.fid_features for s in run.scores if s.fid_features is not None]
    if not pairs:
        return None
    value = frechet_distance([p for p, _ in pairs], [t for _, t in pairs])
    return {"value": finite_or_none(value), "images": len(pairs), "dims": int(pairs[0][0].size)}


def write_summary_json(report_dir: Path, summary: dict[str, Any]) -> Path:
    path = report_dir / "summary.json"
    write_text_atomic(path, json.dumps(summary, indent=2, allow_nan=False) + "\n")
    return path


# -- the page -----------------------------------------------------------------------------------


def _histogram(values: Sequence[float], metric: str, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    from matplotlib import pyplot as plt

    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return False
    figure, axes = plt.subplots(figsize=(5, 3), dpi=100)
    axes.hist(finite, bins=min(30, max(5, len(finite) // 3)), color="#4a78b5")
    axes.set_title(METRIC_TITLES[metric], fontsize=10)
    axes.set_ylabel("images")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    plt.close(figure)
    return True


def select_examples(scores: Sequence[ImageScore], metric: str) -> list[tuple[str, ImageScore]]:
    """Best, median and worst image by ``metric`` (images without the metric left out)."""
    scored = [s for s in scores if not math.isnan(s.scores[metric])]
    if not scored:
        return []
    reverse = metric not in LOWER_IS_BETTER  # best first
    ordered = sorted(scored, key=lambda s: s.scores[metric], reverse=reverse)
    if len(ordered) < 3:  # too few for a median apart from the ends
        return [("best", ordered[0]), ("worst", ordered[-1])][: len(ordered)]
    return [("best", ordered[0]), ("median", ordered[len(ordered) // 2]), ("worst", ordered[-1])]


def contact_sheet(score: ImageScore, report_dir: Path, resolution: Resolution) -> Image.Image:
    """grey input | colorized | ground truth, side by side at the scored size."""
    pair = load_pair(score.item.source, resolution)
    with Image.open(report_dir / score.item.image_name) as saved:
        colorized = saved.convert("RGB")
    panels = [training_grey(pair.target), colorized, pair.target]
    width, height = pair.target.size
    scale = min(1.0, 320 / max(width, height))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    sheet = Image.new("RGB", (3 * size[0] + 8, size[1]), "white")
    for index, panel in enumerate(panels):
        sheet.paste(panel.resize(size, Image.Resampling.BILINEAR), (index * (size[0] + 4), 0))
    return sheet


def _format(value: float | int | str | None, digits: int = 4) -> str:
    if isinstance(value, str):  # "inf" from the JSON summary
        return value
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, int):
        return str(value)
    return "inf" if math.isinf(value) else f"{value:.{digits}f}"


def _environment() -> Environment:
    env = Environment(
        loader=PackageLoader("evaluation", "templates"),
        autoescape=select_autoescape(["html", "j2"]),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["metric"] = _format
    return env


def write_report_html(
    report_dir: Path, run: EvaluationRun, summary: dict[str, Any], resolution: Resolution
) -> Path:
    """report.html with the summary table, histograms and best/median/worst contact sheets."""
    files = report_dir / FILES_DIR
    histograms = []
    for metric in METRICS:
        name = f"{FILES_DIR}/histogram_{metric}.png"
        if _histogram(metric_values(run.scores, metric), metric, report_dir / name):
            histograms.append({"metric": METRIC_TITLES[metric], "src": name})
    sheets = []
    for metric in ("psnr", "lpips"):
        examples = []
        for rank, score in select_examples(run.scores, metric):
            name = f"{FILES_DIR}/sheet_{metric}_{rank}.png"
            save_sheet = contact_sheet(score, report_dir, resolution)
            files.mkdir(parents=True, exist_ok=True)
            save_sheet.save(report_dir / name, format="PNG")
            examples.append(
                {
                    "rank": rank,
                    "src": name,
                    "key": score.item.key,
                    "image": score.item.image_name,
                    "value": score.scores[metric],
                    "scores": {m: score.scores[m] for m in METRICS},
                }
            )
        if examples:
            sheets.append({"metric": METRIC_TITLES[metric], "examples": examples})
    html = (
        _environment()
        .get_template("report.html.j2")
        .render(
            summary=summary,
            metrics=METRICS,
            titles=METRIC_TITLES,
            histograms=histograms,
            sheets=sheets,
            infinite_psnr=int(np.isinf(metric_values(run.scores, "psnr")).sum()),
        )
    )
    path = report_dir / "report.html"
    write_text_atomic(path, html)
    return path


def write_report(
    report_dir: Path,
    run: EvaluationRun,
    config: dict[str, Any],
    model: dict[str, Any],
    machine: dict[str, Any],
    resolution: Resolution,
) -> dict[str, Any]:
    """All of the report folder but the images (already written by the run); the summary."""
    write_metrics_csv(report_dir, run)
    summary = build_summary(run, config, model, machine)
    if summary["instances"] is not None:
        write_instances_csv(report_dir, run)
    if "hinted_pixels" in summary:
        write_hints_csv(report_dir, run)
    write_summary_json(report_dir, summary)
    write_report_html(report_dir, run, summary, resolution)
    return summary
