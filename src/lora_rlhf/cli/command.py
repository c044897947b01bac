"""`lora-rlhf`: train, inspect a trained adapter, grade, hand out the exercise files and keep them
in sync."""

from __future__ import annotations

import argparse
import functools
import importlib
import sys
from pathlib import Path


def _sync(args: argparse.Namespace) -> int:
    from lora_rlhf.authoring.implementations import repo_root
    from lora_rlhf.authoring.sync import MarkerError, sync

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


def _exercises(args: argparse.Namespace) -> int:
    """Write the exercise files (scripts and notebooks) into a folder, never over a file.

    They are rendered from the sources inside the installed package, the same way `sync` writes
    `exercises/` in a checkout: a wheel needs no second copy of them, and what a student gets
    always matches the checks of the installed version."""
    from lora_rlhf.authoring.sync import generated, sources

    out = Path(args.dir)
    if out.exists() and not out.is_dir():
        print(f"lora-rlhf exercises: {out} is a file; give a folder", file=sys.stderr)
        return 2
    files = {
        name: text
        for src in sources()
        if src.path.exists()
        for name, text in generated(src, "exercises").items()
    }
    existing = [name for name in files if (out / name).exists()]
    if existing:
        print(
            f"lora-rlhf exercises: {out / existing[0]} already exists"
            + (f" (and {len(existing) - 1} more)" if len(existing) > 1 else "")
            + "; nothing written: give a new or empty folder, or move those files away",
            file=sys.stderr,
        )
        return 1
    out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        with open(out / name, "x") as f:  # "x": never over a file, even one made meanwhile
            f.write(text)
    print(f"Wrote {len(files)} files to {out}: {', '.join(sorted(files))}")
    print(
        f"Open {out / 'section2_lora.ipynb'} (or the .py), fill in a stub, run its check; "
        f"grade yourself with `lora-rlhf grade {out}`."
    )
    return 0


def _inspect(args: argparse.Namespace) -> int:
    """Draw the adaptor map of a saved adapter and print its largest updates."""
    from lora_rlhf.adapters.adaptor_map import MAP_FILE, save_adaptor_map
    from lora_rlhf.adapters.files import ADAPTER_WEIGHTS, load_lora_model, read_adapter_config
    from lora_rlhf.models.registry import ModelUnavailableError

    path = Path(args.path)
    fail = "lora-rlhf inspect: {}"
    if not path.exists():
        what = "give a run folder of `lora-rlhf train` or its adapter.safetensors"
        print(fail.format(f"{path}: no such file or folder; {what}"), file=sys.stderr)
        return 2
    folder = path.parent if path.is_file() else path  # adapter.safetensors: its config is beside it
    if path.is_file() and path.suffix == ".safetensors" and path.name != ADAPTER_WEIGHTS:
        print(fail.format(f"{path}: rename it {ADAPTER_WEIGHTS} (beside its adapter_config.json)"),
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        config = read_adapter_config(folder)
        model = load_lora_model(folder, device="cpu")
    except (OSError, ValueError, ModelUnavailableError) as exc:  # one line names the file
        print(fail.format(" ".join(str(exc).split())), file=sys.stderr)
        return 1
    out = Path(args.out) if args.out else folder / MAP_FILE
    title = f"{config['base_model']} + LoRA r={config['rank']}, α={config['lora_alpha']:g}: {folder.name}"
    amap = save_adaptor_map(model, out, title=title)
    print(
        f"{folder}: {config['base_model']}, rank {config['rank']}, α {config['lora_alpha']:g}, "
        f"targets {' '.join(amap.targets)}"
    )
    print("Largest updates, ‖ΔW‖_F / ‖W‖_F of the weight each adapts (all heads together):")
    for line in amap.describe_top():
        print("  " + line)
    print(f"Wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora-rlhf", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "sync",
        help="regenerate exercises/ and solutions/ (scripts and notebooks) from their sources",
    )
    p.add_argument("--check", action="store_true", help="only report stale files (exit 1 if any)")
    p.add_argument(
        "--root", help="the source checkout (default: the one this package is installed from)"
    )
    p.set_defaults(func=_sync)

    p = sub.add_parser(
        "exercises",
        help="copy the exercise files (scripts and notebooks) into DIR; never overwrites",
    )
    p.add_argument("dir", metavar="DIR", help="the folder to write them to (created if missing)")
    p.set_defaults(func=_exercises)

    p = sub.add_parser(
        "inspect",
        help="draw the adaptor map of a trained adapter and print its five largest updates",
        description="Draw where the adaptors of a saved run changed the weights: a heatmap of "
        "||ΔW||_F / ||W||_F over layers × q, k, v, o (and MLP targets), and the singular values "
        "of the largest updates. Loads the base model the adapter config names.",
    )
    p.add_argument(
        "path",
        metavar="PATH",
        help="a run folder (adapter_config.json inside) or its adapter.safetensors",
    )
    p.add_argument(
        "--out",
        metavar="PNG",
        help="where to write the picture (default: PATH's folder/adaptor_map.png)",
    )
    p.set_defaults(func=_inspect)

    # Each module adds its own subcommands; one that cannot be imported (a dependency missing)
    # still lists its commands, and running one names what is missing instead of "invalid choice".
    for module_name, commands in (
        ("lora_rlhf.cli.train", ("train",)),
        ("lora_rlhf.grading.cli", ("grade", "grade-class", "gradescope-bundle")),
    ):
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            for command in commands:
                # no option prefix: whatever follows the command (--help too) is taken as is
                p = sub.add_parser(command, help=f"unavailable: {err}", prefix_chars="\0")
                p.add_argument("ignored", nargs="*", help=argparse.SUPPRESS)
                p.set_defaults(func=functools.partial(_unavailable, command, module_name, err))
            continue
        module.add_parser(sub)
    return parser


def _unavailable(command: str, module_name: str, err: ImportError, args) -> int:
    print(
        f"lora-rlhf {command}: cannot import {module_name} ({err}); install the package with its "
        "dependencies (`make setup`, or `pip install lora_rlhf`)",
        file=sys.stderr,
    )
    return 1


# The commands that grade fork every check from a server that imports torch and TransformerLens in
# an interpreter of its own. Started first, its imports overlap this process's own (building the
# parser imports the train command's modules): a submission's grade comes seconds sooner.
GRADING_COMMANDS = ("grade", "grade-class")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] and argv[0] in GRADING_COMMANDS and not {"-h", "--help"} & set(argv):
        from lora_rlhf.grading import sandbox

        sandbox.start_server()
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
