"""`python -m easygen.serve [--host H] [--port N] [key=value ...]` = `python run.py stage=serve ...`: the same
config (Hydra overrides, `--config-dir OUT +export=easygen`, `init_from=...`), run by run.py itself."""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

# Hydra's command-line flags (hydra/_internal/utils.py get_args_parser) that take a value
VALUE_FLAGS = ("--config-dir", "-cd", "--config-name", "-cn", "--config-path", "-cp", "--cfg", "-c", "--package",
               "-p", "--experimental-rerun")
INFO_CHOICES = ("all", "config", "defaults", "defaults-tree", "plugins", "searchpath")


def split_hydra_flags(args: list[str]) -> tuple[list[str], list[str]]:
    """Hydra's flags (with their values) apart from the key=value overrides."""
    flags, overrides, i = [], [], 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("-"):  # an override starts with a key, `+` or `~`; `--flag=value` is one argument
            takes_value = arg in VALUE_FLAGS or (arg in ("--info", "-i") and i + 1 < len(args)
                                                 and args[i + 1] in INFO_CHOICES)
            flags.append(arg)
            if takes_value and i + 1 < len(args):
                flags.append(args[i + 1])
                i += 1
        else:
            overrides.append(arg)
        i += 1
    return flags, overrides


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m easygen.serve",
        description="EasyGen's web demo (/) and OpenAI-compatible API (/v1) on one model. Any other argument "
        "is a run.py option: key=value overrides, --config-dir OUT +export=easygen, init_from=CKPT.",
        add_help=False,
        allow_abbrev=False,
    )
    parser.add_argument("--host", help="address to listen on (stage.host; default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (stage.port; default 7860, 0: a free one)")
    args, rest = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    if args.host is not None:
        rest.append(f"stage.host='{args.host}'")
    if args.port is not None:
        rest.append(f"stage.port={args.port}")
    root = Path(__file__).resolve().parents[2]
    flags, overrides = split_hydra_flags(rest)
    # Hydra's own flags first: its parser takes the overrides as one run of positional arguments
    sys.argv = [str(root / "run.py"), *flags, "stage=serve", *overrides]
    runpy.run_path(str(root / "run.py"), run_name="__main__")


if __name__ == "__main__":
    main()
