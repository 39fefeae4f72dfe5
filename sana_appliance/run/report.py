"""The run report: ``output/report.html`` with its plots as PNG in ``output/report/``, the validation grids
(``validation/grid_step<N>.png``) and the training data's contact sheet (``validation/training_data.png``).

Drawn with matplotlib's object API (a Figure on the Agg canvas: no pyplot state, no display). Every file is
written atomically, so a browser, the uploader or a restarted run sees the old file or the new one. The report
is rebuilt from what is on disk (metrics.jsonl, run.json, data_report.json, the grids), after each validation
round and at the end, so a resumed run's report shows its whole history.
"""

from __future__ import annotations

import html
import json
import logging
import math
import re
import textwrap
from pathlib import Path

from ..core.fsutil import atomic_path

log = logging.getLogger(__name__)

REPORT = "report.html"
PLOTS_DIR = "report"  # beside report.html: its PNGs
GRID_PREFIX = "grid_step"
CONTACT_SHEET = "training_data.png"
CONTACT_SHEET_LIMIT = 48  # images on the contact sheet (the first ones of the plan, in its fixed order)
SKIPPED_LISTED = 200  # skipped files listed by name in the report (all are in data_report.json)
CHANCE = 0.25  # the colour score by chance: one of the demo's four colours
GRID_ROWS = 40  # prompts on one validation grid (a huge prompt library would pass the PNG size limit)


def grid_name(step: int) -> str:
    return f"{GRID_PREFIX}{step:07d}.png"


def _figure(width_in: float, height_in: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width_in, height_in), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")


def _caption(text: str, width: int = 30, lines: int = 4) -> str:
    wrapped = []
    for part in text.split("\n"):
        wrapped += textwrap.wrap(part, width) or [""]
    if len(wrapped) > lines:
        wrapped = wrapped[: lines - 1] + [textwrap.shorten(" ".join(wrapped[lines - 1:]), width, placeholder="...")]
    return "\n".join(wrapped)


def image_grid(rows: list[list[tuple[object, str]]], path: Path, title: str, tile_in: float = 1.8) -> None:
    """One tile per (PIL image, caption), one row per list: the validation grid and the contact sheet."""
    import numpy as np

    rows = [row for row in rows if row]
    if not rows:
        return
    if len(rows) > GRID_ROWS:
        title += f" (the first {GRID_ROWS} of {len(rows)} rows; every image is in its own file)"
        rows = rows[:GRID_ROWS]
    ncols = max(len(row) for row in rows)
    figure = _figure(max(ncols * tile_in, 4.0), len(rows) * (tile_in + 0.55) + 0.35)
    figure.suptitle(title, fontsize=9, parse_math=False)
    axes = figure.subplots(len(rows), ncols, squeeze=False)
    for r, row in enumerate(rows):
        for c in range(ncols):
            ax = axes[r][c]
            ax.set_axis_off()
            if c < len(row):
                image, caption = row[c]
                ax.imshow(np.asarray(image.convert("RGB")), interpolation="nearest" if image.width <= 128 else "antialiased")
                ax.set_title(_caption(caption), fontsize=6.5, parse_math=False)  # a "$" in a prompt is text
    _save(figure, path)


def contact_sheet(samples: list, path: Path, columns: int = 8) -> None:
    """The first CONTACT_SHEET_LIMIT training images as the model sees them (EXIF, crop and resize applied),
    each with its caption and size."""
    from PIL import Image

    from ..data.images import load_pixels

    tiles = []
    for sample in samples[:CONTACT_SHEET_LIMIT]:
        pixels = ((load_pixels(sample) + 1.0) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
        width, height = sample.size
        tiles.append((Image.fromarray(pixels), f"{sample.caption}\n{sample.backend_id}, {width}x{height}"))
    rows = [tiles[i:i + columns] for i in range(0, len(tiles), columns)]
    shown = f"the first {len(tiles)} of {len(samples)}" if len(tiles) < len(samples) else f"all {len(samples)}"
    image_grid(rows, path, f"training data: {shown} images, cropped and resized as trained", tile_in=1.5)


def read_metrics(path: Path) -> list[dict]:
    lines = []
    if path.is_file():
        for raw in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                line = json.loads(raw)
            except ValueError:
                continue  # a half-written last line
            if isinstance(line, dict):
                lines.append(line)
    return lines


def _series(lines: list[dict], key: str) -> tuple[list[int], list[float]]:
    # A skipped (non-finite) step logs NaN or inf: left out, or it would end the moving mean.
    pairs = [(line.get("step", 0), line[key]) for line in lines
             if isinstance(line.get(key), (int, float)) and math.isfinite(line[key])]
    return [p[0] for p in pairs], [float(p[1]) for p in pairs]


def _line_plot(path: Path, title: str, ylabel: str, curves: list[tuple[str, list[int], list[float], dict]],
               ylim: tuple[float, float] | None = None, hline: tuple[float, str] | None = None) -> bool:
    curves = [c for c in curves if c[1]]
    if not curves:
        return False
    figure = _figure(6.4, 3.0)
    ax = figure.subplots()
    for label, xs, ys, style in curves:
        ax.plot(xs, ys, label=label, **style)
    if hline is not None:
        ax.axhline(hline[0], color="grey", linestyle="--", linewidth=1, label=hline[1])
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if len(curves) > 1 or hline is not None:
        ax.legend(fontsize=8)
    _save(figure, path)
    return True


def _smooth(values: list[float]) -> list[float]:
    window = max(1, len(values) // 40)
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plots(lines: list[dict], folder: Path) -> list[tuple[str, str]]:
    """The report's plots from metrics.jsonl lines: [(file name, title)] of those that have data."""
    made = []
    steps, loss = _series(lines, "loss")
    eval_steps, eval_loss = _series(lines, "eval_loss")
    specs = [
        ("loss.png", "Training loss and held-out eval loss", "loss",
         [("loss", steps, loss, {"alpha": 0.3, "linewidth": 0.8}),
          ("loss (moving mean)", steps, _smooth(loss), {"linewidth": 1.5}),
          ("eval loss (held out)", eval_steps, eval_loss, {"marker": "o", "linewidth": 1.5})], None, None),
        ("lr.png", "Learning rate (applied at each step)", "learning rate",
         [("lr", *_series(lines, "lr"), {})], None, None),
        ("throughput.png", "Throughput", "samples/s", [("samples/s", *_series(lines, "samples_per_s"), {})], None, None),
        ("memory.png", "Peak accelerator memory (this process)", "GiB",
         [("peak memory", *_series(lines, "peak_mem_gib"), {})], None, None),
        ("skipped.png", "Skipped steps (non-finite loss or gradients), total", "steps",
         [("skipped", *_series(lines, "skipped_steps"), {"drawstyle": "steps-post"})], None, None),
        ("colour_score.png", "Held-out colour score: pictures with the prompted colours", "fraction",
         [("background", *_series(lines, "colour_score_background"), {"marker": "o"}),
          ("shape", *_series(lines, "colour_score_shape"), {"marker": "s"})], (-0.02, 1.02), (CHANCE, "chance")),
    ]
    for name, title, ylabel, curves, ylim, hline in specs:
        if _line_plot(folder / name, title, ylabel, curves, ylim, hline):
            made.append((name, title))
    return made


def _grids(validation_dir: Path) -> list[tuple[int, str]]:
    found = []
    for path in validation_dir.glob(f"{GRID_PREFIX}*.png"):
        match = re.fullmatch(rf"{GRID_PREFIX}(\d+)\.png", path.name)
        if match:
            found.append((int(match.group(1)), path.name))
    return sorted(found)


def _load_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:.25em .6em;text-align:left;
font-size:.9em}th{background:#f4f4f4}img{max-width:100%}figure{margin:1em 0}figcaption{color:#555;font-size:.9em}
.plots img{width:49%;min-width:420px}
.grids{display:flex;gap:.6em;overflow-x:auto;align-items:flex-start}.grids figure{flex:0 0 auto;width:260px;margin:0}code{background:#f4f4f4;padding:0 .2em}"""


def _table(rows: list[tuple[str, str]], head: tuple[str, ...] | None = None) -> str:
    out = ["<table>"]
    if head:
        out.append("<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>")
    for row in rows:
        out.append("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>")
    return "\n".join(out + ["</table>"])


def _fmt(value, spec: str = ".5f") -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "-"


def write_report(output_dir: Path, *, max_steps: int | None = None) -> Path:
    """Rebuild output/report.html and its plots from the run's files. Returns the report's path."""
    e = html.escape
    lines = read_metrics(output_dir / "metrics.jsonl")
    run = _load_json(output_dir / "run.json")
    data = _load_json(output_dir / "data_report.json")
    made = plots(lines, output_dir / PLOTS_DIR)
    grids = _grids(output_dir / "validation")
    config = run.get("config", {}) if isinstance(run.get("config"), dict) else {}
    model = run.get("model", {}) if isinstance(run.get("model"), dict) else {}
    steps = run.get("steps", max((line.get("step", 0) for line in lines), default=0))
    total = max_steps or config.get("max_train_steps")
    last = next((line for line in reversed(lines) if "loss" in line), {})
    eval_loss = run.get("eval_loss") or {}
    colour = run.get("colour_score") or {}

    summary = [
        ("status", e(str(run.get("status", "training")))),
        ("step", f"{steps}" + (f" of {total}" if total else "")),
        ("base model", f"<code>{e(str(model.get('repo_id') or model.get('name') or config.get('pretrained_model_name_or_path', '')))}</code>"),
        ("preset", e(str(run.get("preset") or "-"))),
        ("run id", f"<code>{e(str(run.get('run_id') or '-'))}</code>"),
        ("held-out eval loss", f"{_fmt(eval_loss.get('start'))} at step {eval_loss.get('start_step', '-')} &rarr; "
                               f"{_fmt(eval_loss.get('end'))} at step {eval_loss.get('end_step', '-')}" if eval_loss else "-"),
    ]
    if colour:
        summary.append(("held-out colour score", f"background {colour['background']:.0%}, shape {colour['shape']:.0%} at step "
                        f"{colour['step']} ({colour['pictures']} pictures: {colour['prompts']} held-out prompts x "
                        f"{colour['seeds']} seeds; chance {CHANCE:.0%})"))
    summary += [
        ("last logged loss", f"{_fmt(last.get('loss'))} at step {last.get('step', '-')}" if last else "-"),
        ("samples/s (last logged)", _fmt(last.get("samples_per_s"), ".2f")),
        ("peak memory (GiB)", _fmt(max((line.get("peak_mem_gib", 0) for line in lines), default=None), ".2f")),
        ("skipped steps", e(str(run.get("skipped_steps", last.get("skipped_steps", 0))))),
    ]
    parts = [f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Run report: "
             f"{e(str(config.get('output_dir', output_dir.name)))}</title><style>{STYLE}</style></head><body>",
             "<h1>Sana fine-tune: run report</h1>", _table(summary)]
    parts.append("<h2>Curves</h2>")
    if made:
        parts.append('<div class="plots">' + "".join(
            f'<img src="{PLOTS_DIR}/{name}" alt="{e(title)}" title="{e(title)}">' for name, title in made) + "</div>")
    else:
        parts.append("<p>Nothing logged yet.</p>")
    parts.append("<h2>Validation grids</h2>")
    if grids:  # side by side, oldest first: read across to see training progress
        parts.append(f"<p>{len(grids)} round(s), oldest first; click a grid for its full size.</p>")
        parts.append('<div class="grids">' + "".join(
            f'<figure><a href="validation/{name}"><img src="validation/{name}" alt="validation grid at step {step}"></a>'
            f"<figcaption>step {step}</figcaption></figure>" for step, name in grids) + "</div>")
    else:
        parts.append("<p>No validation round has run (validation_steps is 0, or the first round is still to come).</p>")
    parts.append("<h2>Training data</h2>")
    datasets = run.get("datasets") or []
    backends = data.get("backends") or {}
    rows = []
    for dataset in datasets:
        stats = backends.get(dataset.get("id"), {})
        buckets = ", ".join(f"{k}: {v}" for k, v in (stats.get("buckets") or {}).items())
        rows.append((f"<code>{e(str(dataset.get('id')))}</code>", e(str(dataset.get("samples"))),
                     e(str(stats.get("skipped", "-"))), e(buckets), f"<code>{e(str(dataset.get('fingerprint', ''))[:16])}</code>"))
    if rows:
        parts.append(_table(rows, ("dataset", "usable images", "skipped files", "buckets (WxH: images)", "fingerprint")))
    if (output_dir / "validation" / CONTACT_SHEET).is_file():
        parts.append(f'<figure><img src="validation/{CONTACT_SHEET}" alt="training data contact sheet"></figure>')
    skipped = data.get("skipped") or []
    if skipped:
        reasons: dict[str, int] = {}
        for entry in skipped:
            reason = str(entry.get("reason", "")).split(":")[0]
            reasons[reason] = reasons.get(reason, 0) + 1
        parts.append(f"<p>{len(skipped)} file(s) skipped, never trained on:</p>")
        parts.append(_table([(e(reason), str(count)) for reason, count in sorted(reasons.items())], ("reason", "files")))
        parts.append(_table([(f"<code>{e(str(entry.get('path')))}</code>", e(str(entry.get("backend", ""))),
                              e(str(entry.get("reason", "")))) for entry in skipped[:SKIPPED_LISTED]],
                            ("file", "dataset", "reason")))
        if len(skipped) > SKIPPED_LISTED:
            parts.append(f"<p>... and {len(skipped) - SKIPPED_LISTED} more in data_report.json.</p>")
    elif data:
        parts.append("<p>No file was skipped.</p>")
    links = [(name, name) for name in ("metrics.jsonl", "run.json", "data_report.json") if (output_dir / name).is_file()]
    if (output_dir / "final" / "README.md").is_file():  # one link works in the output folder, the other in a Hub repo
        links.append(("final/README.md", "model card (final/README.md, in the output folder)"))
        links.append(("../README.md", "model card (README.md, in the Hub repo where this report is run/report.html)"))
    parts.append("<h2>Files</h2><ul>" + "".join(f'<li><a href="{e(href)}">{e(text)}</a></li>' for href, text in links)
                 + "</ul></body></html>\n")
    path = output_dir / REPORT
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(parts), encoding="utf-8")
    return path


__all__ = ["REPORT", "PLOTS_DIR", "CONTACT_SHEET", "grid_name", "image_grid", "contact_sheet", "plots", "write_report"]
