"""Read a text-to-image evaluation's saved pictures back again with the current pixel readers.

    python experiments/t2i_reread.py RUN [RUN ...]

RUN is a recipe run (`stage=all`: its `t2i/eval/` folder) or a `stage=eval task=t2i` output folder. The
set's kind is the one the run recorded (`t2i_kind` in its results.json) or else the one its prompts tell
(data_modules/t2i_kinds.py). Prints per run the per-attribute accuracy and chance, and per attribute how
often each named value was read as what (named -> read: count).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from PIL import Image

from data_modules.t2i_kinds import KINDS, attribute_accuracy, kind_for


def reread(run: Path) -> dict:
    folder = run / "t2i" / "eval" if (run / "t2i" / "eval" / "predictions.json").exists() else run
    rows = json.loads((folder / "predictions.json").read_text())
    recorded = json.loads((folder / "results.json").read_text()).get("t2i_kind")
    kind = KINDS[recorded] if recorded else kind_for([r["prompt"] for r in rows])
    if kind is None:
        raise SystemExit(f"{folder}: its prompts are of no known kind (data_modules/t2i_kinds.py)")
    read = [kind.read_picture(Image.open(folder / r["file"]).convert("RGB")) for r in rows]
    named = [kind.parse_caption(r["prompt"]) for r in rows]
    confusion = {a: Counter(f"{n[a]} -> {r[a]}" for r, n in zip(read, named)) for a in kind.attributes}
    return {"kind": kind.name, "pictures": len(rows),
            "accuracy": {k: round(v, 3) for k, v in attribute_accuracy(read, named, kind.attributes).items()},
            "named -> read": {a: dict(c.most_common()) for a, c in confusion.items()}}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    args = parser.parse_args(argv)
    for run in args.runs:
        print(json.dumps({str(run): reread(run)}, indent=1))


if __name__ == "__main__":
    main()
