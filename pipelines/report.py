"""`<output.dir>/report/index.html`: one self-contained page (images inlined) for a person to read."""

from __future__ import annotations

import base64
import html
from pathlib import Path

import pandas as pd

from common.config import Settings, as_yaml
from common.io import write_text
from pipelines.evaluate import Summary

STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}
th{background:#f3f3f3}td:first-child{text-align:left}img{max-width:100%;border:1px solid #ddd;margin:4px 0}
pre{background:#f7f7f7;padding:1em;overflow:auto;max-height:24em}.key span{padding:0 8px;margin-right:8px;color:#fff}"""


def _img(path: Path, alt: str) -> str:
    if not path.is_file():
        return f"<p><em>{html.escape(alt)}: not available ({html.escape(str(path))})</em></p>"
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _table(frame: pd.DataFrame) -> str:
    return frame.to_html(index=False, float_format=lambda v: f"{v:.4f}", border=0, escape=True)


def write_report(cfg: Settings, steps: list[dict] | None = None) -> Path:
    out = Path(cfg.output.dir)
    report = out / "report"
    parts = [f"<h1>Carvana cascade: {html.escape(str(out))}</h1>"]
    summary = Summary.read(cfg)
    if summary is not None:
        s = summary
        parts.append(
            "<h2>Validation Dice</h2><table><tr><th>model</th><th>mean Dice</th><th>images</th></tr><tr><td>stage 1 "
            "alone "
            f"(upsampled)</td><td>{s.mean_dice_stage1:.4f}</td><td>{s.images}</td></tr><tr><td>cascade</td><td>{s.mean_dice_cascade:.4f}</td><td>{s.images}</td></tr></table>"
        )
        losing = f": {html.escape(', '.join(s.worst_box_coverage))}" if s.worst_box_coverage else ""
        parts.append(
            f"<p>Within {s.edge_radius} px of the true boundary: stage 1 {s.mean_edge_dice_stage1:.4f}, cascade "
            f"{s.mean_edge_dice_cascade:.4f}. Stage-1 box coverage (share of car pixels inside the box): min "
            f"{s.min_box_coverage:.5f}; {s.images_losing_car_pixels_to_the_box} image(s) lose car pixels to the "
            f"box{losing}.</p>"
        )
    if steps:
        parts.append(
            "<h2>Steps</h2>" + _table(pd.DataFrame(steps).assign(seconds=lambda f: f.seconds.map("{:.1f}".format)))
        )
    parts.append(
        "<h2>Validation Dice against the mask threshold</h2>" + _img(report / "threshold_sweep.png", "threshold sweep")
    )
    parts.append("<h2>Learning curves</h2>")
    for stage in ("stage1", "stage2"):
        parts.append(f"<h3>{stage}</h3>" + _img(out / stage / "learning_curves.png", f"{stage} learning curves"))
    metrics_path = report / "metrics.csv"
    if metrics_path.is_file():
        metrics = pd.read_csv(metrics_path, dtype={"img": str, "car": str})  # ids such as 02159e548029 stay strings
        parts.append(
            "<h2>Worst validation images (by cascade Dice)</h2>" + _table(metrics.nsmallest(10, "dice_cascade"))
        )
        parts.append(
            '<h2>Overlays: stage 1 (left) vs cascade (right)</h2><p class="key">'
            '<span style="background:#ff2828">false positive</span><span style="background:#2878ff">false '
            "negative</span>"
            '<span style="background:#ffdc00;color:#000">stage-1 box</span><span '
            'style="background:#00e6e6;color:#000">refiner windows (tiles or band patches)</span></p>'
        )
        for png in sorted((report / "overlays").glob("*.png")):
            row = metrics[metrics.img == png.stem + ".jpg"]
            caption = (
                f"{png.stem}: stage 1 {row.dice_stage1.item():.4f}, cascade {row.dice_cascade.item():.4f}"
                if len(row)
                else png.stem
            )
            parts.append(f"<h4>{html.escape(caption)}</h4>" + _img(png, png.stem))
        parts.append("<h2>All validation images</h2>" + _table(metrics))
    parts.append("<h2>Configuration</h2><pre>" + html.escape(as_yaml(cfg)) + "</pre>")
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>Carvana "
        f"report</title><style>{STYLE}</style></head><body>{''.join(parts)}</body></html>"
    )
    path = report / "index.html"
    write_text(path, page)
    return path
