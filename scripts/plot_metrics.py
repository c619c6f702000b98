"""Training curves of an offline run: metrics.jsonl (written with metrics_jsonl=True) -> one HTML page of SVG plots.

    python scripts/plot_metrics.py checkpoints/quickstart/metrics.jsonl            # -> .../metrics.html
    python scripts/plot_metrics.py run/metrics.jsonl --out curves.html --keys train/lm_loss all/exact_accuracy

Plots the train loss and accuracies per step and the evaluation metrics per evaluation (keys `<set>/<metric>`).
Plain HTML with inline SVG: no plotting package, opens in any browser."""

import argparse
import html
import json
import math
import os
import sys
from typing import Dict, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

from utils.atomic import atomic_write_text  # noqa: E402

DEFAULT_KEYS = ["train/lm_loss", "train/accuracy", "train/exact_accuracy", "train/q_halt_loss", "all/lm_loss",
                "all/accuracy", "all/exact_accuracy"]
Series = Dict[str, List[Tuple[int, float]]]


def read_series(path: str) -> Series:
    """metric key -> [(step, value)], evaluation dicts flattened to `<set>/<metric>`."""
    series: Series = {}
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"{path} line {number} is not JSON: pass a metrics.jsonl written with metrics_jsonl=True") from None
            step = row.get("step")
            if not isinstance(step, int):
                raise ValueError(f"{path} line {number} has no integer 'step': not a metrics.jsonl line")
            for key, value in row.items():
                items = value.items() if isinstance(value, dict) else [(None, value)]
                for sub, v in items:
                    name = key if sub is None else f"{key}/{sub}"
                    if key != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                        series.setdefault(name, []).append((step, float(v)))
    return series


def svg_plot(name: str, points: List[Tuple[int, float]], width: int = 460, height: int = 220) -> str:
    pad = 44
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1

    def sx(x):
        return pad + (x - x0) / (x1 - x0) * (width - 2 * pad)

    def sy(y):
        return height - pad + (y0 - y) / (y1 - y0) * (height - 2 * pad)

    path = " ".join(f"{'M' if i == 0 else 'L'}{sx(x):.1f},{sy(y):.1f}" for i, (x, y) in enumerate(points))
    dots = "".join(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5"/>' for x, y in points) if len(points) <= 60 else ""
    return (f'<figure><figcaption>{html.escape(name)} (last {ys[-1]:.4g} at step {xs[-1]})</figcaption>'
            f'<svg class="plot" data-key="{html.escape(name)}" width="{width}" height="{height}" '
            f'xmlns="http://www.w3.org/2000/svg">'
            f'<rect x="{pad}" y="{pad}" width="{width - 2 * pad}" height="{height - 2 * pad}" fill="none" stroke="#aaa"/>'
            f'<path d="{path}" fill="none" stroke="#1565c0" stroke-width="1.5"/><g fill="#1565c0">{dots}</g>'
            f'<text x="{pad}" y="{height - pad + 16}" font-size="11">{x0}</text>'
            f'<text x="{width - pad}" y="{height - pad + 16}" font-size="11" text-anchor="end">{x1}</text>'
            f'<text x="{pad - 4}" y="{sy(y1) + 4:.1f}" font-size="11" text-anchor="end">{y1:.3g}</text>'
            f'<text x="{pad - 4}" y="{sy(y0) + 4:.1f}" font-size="11" text-anchor="end">{y0:.3g}</text>'
            f'<text x="{width / 2}" y="{height - 8}" font-size="11" text-anchor="middle">step</text></svg></figure>')


def render_html(source: str, series: Series, keys: List[str]) -> str:
    plots = "".join(svg_plot(k, series[k]) for k in keys)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>Training curves: {html.escape(source)}</title>"
            "<style>body{font-family:system-ui,sans-serif;margin:16px} figure{display:inline-block;margin:8px}"
            "figcaption{font-size:13px}</style></head>"
            f"<body><h1>Training curves</h1><p>{html.escape(source)}</p>{plots}</body></html>")


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("metrics", help="a metrics.jsonl (pretrain.py ... metrics_jsonl=True)")
    p.add_argument("--out", default=None, help="HTML file to write (default: metrics.html beside the input)")
    p.add_argument("--keys", nargs="*", default=None, help=f"metrics to plot (default: those of {DEFAULT_KEYS} present)")
    args = p.parse_args(argv)
    try:
        if not os.path.isfile(args.metrics):
            raise ValueError(f"{args.metrics} does not exist: train with metrics_jsonl=True to write it")
        series = read_series(args.metrics)
        keys = args.keys or [k for k in DEFAULT_KEYS if k in series]
        missing = [k for k in keys if k not in series]
        if missing or not keys:
            raise ValueError(f"no metric {missing[0] if missing else 'to plot'} in {args.metrics}; "
                             f"it has: {', '.join(sorted(series)) or 'nothing'}")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.metrics)), "metrics.html")
    atomic_write_text(out, render_html(args.metrics, series, keys))
    print(f"Plotted {len(keys)} metrics: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
