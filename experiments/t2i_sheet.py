"""A sheet of text-to-image pictures with their prompts, from a run folder.

    python experiments/t2i_sheet.py RUN [--out experiments/t2i_sheet.png] [--n 24] [--scale 2]

RUN is a recipe run (`stage=all`: its `t2i/eval/` folder is used) or a `stage=eval task=t2i` output
folder (`predictions.json` + `images/`). Each cell shows the picture (enlarged `--scale` times, nearest
neighbour), the prompt, what the pixel reader read from the pixels and the model's own
caption of the picture, when the run recorded them (the readings of the set's kind, data_modules/t2i_kinds.py).
"""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont


def find_predictions(run: Path) -> Path:
    for candidate in (run / "predictions.json", run / "t2i" / "eval" / "predictions.json"):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(
        f"{run}: no predictions.json of a t2i evaluation (looked in {run} and {run / 't2i' / 'eval'})"
    )


def make_sheet(run: str | Path, out: str | Path, n: int = 24, scale: int = 2, columns: int = 4) -> Path:
    preds = find_predictions(Path(run))
    rows = json.loads(preds.read_text())
    if not isinstance(rows, list) or not rows or "prompt" not in rows[0]:
        raise ValueError(f"{preds}: not the predictions of a t2i evaluation (a list of {{prompt, file}})")
    rows = rows[:n]
    font = ImageFont.load_default()
    first = Image.open(preds.parent / rows[0]["file"])
    side = first.width * scale
    text_w, line_h = 250, 11
    cell_w, cell_h = side + text_w + 8, max(side, 10 * line_h) + 8
    cols = min(columns, len(rows))
    sheet = Image.new("RGB", (cols * cell_w, -(-len(rows) // cols) * cell_h), "white")
    pen = ImageDraw.Draw(sheet)
    for k, row in enumerate(rows):
        x, y = (k % cols) * cell_w + 4, (k // cols) * cell_h + 4
        pic = Image.open(preds.parent / row["file"]).convert("RGB")
        sheet.paste(pic.resize((side, side), Image.NEAREST), (x, y))
        lines = textwrap.wrap(row["prompt"], 40)
        if row.get("read"):
            wrong = [a for a, v in row["named"].items() if row["read"].get(a) != v]
            lines += [f"read wrong: {', '.join(wrong) or '-'}"]
        if row.get("caption_of_picture"):
            lines += textwrap.wrap(f"caption: {row['caption_of_picture']}", 40)
        for i, line in enumerate(lines[:10]):
            pen.text((x + side + 4, y + i * line_h), line, fill="black", font=font)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, optimize=True)
    return out


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run")
    parser.add_argument("--out", default="experiments/t2i_sheet.png")
    parser.add_argument("--n", type=int, default=24)
    parser.add_argument("--scale", type=int, default=2)
    args = parser.parse_args(argv)
    path = make_sheet(args.run, args.out, n=args.n, scale=args.scale)
    print(f"wrote {path} ({path.stat().st_size // 1024} kB)")
    return path


if __name__ == "__main__":
    main()
