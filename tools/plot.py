"""Loss and learning-rate curves of a train.py run, drawn with PIL alone (no plotting library needed).

    python tools/plot.py runs/pretrain-...            # -> runs/pretrain-.../metrics.png
    python tools/plot.py RUN_DIR --out curves.png

Reads RUN_DIR/metrics.jsonl (one record per optimizer step, as train.py appends them); draws the loss above the lr,
each against the step, with five labelled ticks per axis.
"""

import argparse
import json
import math
import sys
from pathlib import Path

W, H, PAD = 900, 320, 60  # one panel: width, height, left margin for the tick labels


def plot(run_dir, path=None):
    from PIL import Image, ImageDraw

    f = Path(run_dir) / "metrics.jsonl"
    if not f.exists():
        raise SystemExit(f"no {f}: give a run folder of train.py (its --out)")
    recs = [json.loads(ln) for ln in f.read_text().splitlines() if ln.strip()]
    path = Path(path or Path(run_dir) / "metrics.png")
    img = Image.new("RGB", (W, 2 * H), "white")
    d = ImageDraw.Draw(img)
    for row, (key, colour) in enumerate((("loss", (200, 40, 40)), ("lr", (40, 80, 200)))):
        pts = [(r["step"], r[key]) for r in recs if r.get(key) is not None and math.isfinite(r[key])]
        top = row * H
        x0, x1, y0, y1 = PAD, W - 20, top + H - 40, top + 20  # plot box (y grows downwards)
        d.rectangle([x0, y1, x1, y0], outline="black")
        d.text((x0, top + 4), f"{key} ({Path(run_dir).name})", fill="black")
        if not pts:
            continue
        sx, sy = [p[0] for p in pts], [p[1] for p in pts]
        lo_x, hi_x = min(sx), max(max(sx), min(sx) + 1)
        lo_y, hi_y = min(sy), max(sy)
        if hi_y == lo_y:
            lo_y, hi_y = lo_y - 0.5 * abs(lo_y or 1), hi_y + 0.5 * abs(hi_y or 1)
        X = lambda x: x0 + (x - lo_x) / (hi_x - lo_x) * (x1 - x0)  # noqa: E731
        Y = lambda y: y0 - (y - lo_y) / (hi_y - lo_y) * (y0 - y1)  # noqa: E731
        for i in range(5):  # axis labels at 5 evenly spaced values
            fx, fy = lo_x + i * (hi_x - lo_x) / 4, lo_y + i * (hi_y - lo_y) / 4
            d.text((X(fx) - 10, y0 + 6), f"{fx:.0f}", fill="black")
            d.text((4, Y(fy) - 6), f"{fy:.3g}", fill="black")
        d.line([(X(x), Y(y)) for x, y in pts] if len(pts) > 1 else [(X(sx[0]), Y(sy[0]))] * 2, fill=colour, width=2)
    img.save(path)
    print(f"wrote {path}")
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a train.py run folder (its --out), holding metrics.jsonl")
    p.add_argument("--out", default=None, help="the PNG to write (default RUN/metrics.png)")
    args = p.parse_args(argv)
    return plot(args.run, args.out)


if __name__ == "__main__":
    main(sys.argv[1:])
