"""The `lora-rlhf` command itself: every subcommand module is found, and one that cannot be
imported is an error naming what is missing."""

import functools
import importlib

import pytest

import lora_rlhf.cli.command as cli


@pytest.fixture
def train_cli_missing(monkeypatch):
    """`lora_rlhf.cli.train` fails to import, as without one of its dependencies."""
    real = importlib.import_module

    def import_module(name, *args, **kwargs):
        if name == "lora_rlhf.cli.train":
            raise ModuleNotFoundError("No module named 'wandb_not_here'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", import_module)


@pytest.mark.parametrize(
    "argv", [["train"], ["train", "--model", "tiny-llama", "--phases", "2"], ["train", "--help"]]
)
def test_a_subcommand_that_cannot_be_imported_names_the_missing_piece(
    train_cli_missing, argv, capsys
):
    assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "lora-rlhf train" in err and "lora_rlhf.cli.train" in err and "wandb_not_here" in err


def test_the_other_subcommands_stay_available_when_one_module_is_missing(train_cli_missing):
    commands = cli.build_parser()._subparsers._group_actions[0].choices
    assert {"sync", "exercises", "train", "grade", "grade-class", "gradescope-bundle"} <= set(
        commands
    )
    assert "unavailable" in cli.build_parser().format_help()


def test_every_subcommand_module_imports_here():
    """In the installed package nothing is missing: no subcommand is the unavailable stand-in."""
    parser = cli.build_parser()
    for name, sub in parser._subparsers._group_actions[0].choices.items():
        assert sub.get_default("func") is not None, name
        assert not isinstance(sub.get_default("func"), functools.partial), name


@pytest.mark.parametrize(
    ("argv", "starts_first"),
    [
        (["grade", "nowhere.py"], True),
        (["grade-class", "nowhere"], True),
        (["grade", "--help"], False),
        (["sync", "--check", "--root", "nowhere"], False),
    ],
)
def test_grading_starts_the_fork_server_before_building_the_parser(argv, starts_first, monkeypatch):
    """The grader's fork server imports torch in an interpreter of its own: `grade` and
    `grade-class` start it first, so that its imports overlap the command's own; other commands
    and --help never start it."""
    from lora_rlhf.grading import sandbox

    calls = []
    monkeypatch.setattr(sandbox, "start_server", lambda: calls.append("server"))

    def build_parser():
        calls.append("parser")
        raise SystemExit(0)  # stop here: only the order matters

    monkeypatch.setattr(cli, "build_parser", build_parser)
    with pytest.raises(SystemExit):
        cli.main(argv)
    assert calls == (["server", "parser"] if starts_first else ["parser"])
