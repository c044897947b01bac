"""`lora-rlhf`: train, grade, and keep the generated exercise files in sync."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _sync(args: argparse.Namespace) -> int:
    from lora_rlhf.authoring import MarkerError, sync
    from lora_rlhf.impl import repo_root

    root = Path(args.root) if args.root else repo_root()
    if root is None:
        print(
            "lora-rlhf sync: run it from a source checkout (no solutions/ folder found); "
            "or pass --root",
            file=sys.stderr,
        )
        return 2
    try:
        stale = sync(root, check=args.check)
    except MarkerError as exc:
        print(f"lora-rlhf sync: {exc}", file=sys.stderr)
        return 2
    for path in stale:
        print(("stale: " if args.check else "wrote: ") + str(path.relative_to(root)))
    if args.check and stale:
        print("Generated files are out of date: run `lora-rlhf sync`.", file=sys.stderr)
        return 1
    if not stale:
        print("exercises/ and solutions/ are up to date.")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora-rlhf", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "sync", help="regenerate exercises/ and solutions/ from src/lora_rlhf/lora.py"
    )
    p.add_argument("--check", action="store_true", help="only report stale files (exit 1 if any)")
    p.add_argument(
        "--root", help="the source checkout (default: the one this package is installed from)"
    )
    p.set_defaults(func=_sync)

    for module_name in ("lora_rlhf.train_cli", "lora_rlhf.grading.cli"):
        try:
            module = __import__(module_name, fromlist=["add_parser"])
        except ImportError:
            continue
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
