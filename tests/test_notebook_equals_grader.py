"""A green notebook means a full grade: for every mutant of the check-power tests (forward and
backward), an exercise's notebook check functions fail exactly when the grader's checks of that
exercise take points off (the grader's checks run in-process with `run_check`, as the grader's
judges would reach the same verdicts from the probes' outputs)."""

from __future__ import annotations

import contextlib
import io
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import backward_mutants
import pytest
from mutants import MUTANTS

from lora_rlhf import tests_lora
from lora_rlhf.authoring.implementations import load_impl
from lora_rlhf.checks import notebook
from lora_rlhf.checks.core import run_check
from lora_rlhf.grading.rubric import rubric


def _model_cells(impl) -> list:
    def build():
        return impl.TransformerWithValueHeadLora.from_pretrained("tiny-llama", device="cpu")

    # the course's cells build a model, then pass it in; a model that cannot be built fails the cell
    return [
        lambda: tests_lora.test_lora_fwd_hooks_list(build()),
        lambda: tests_lora.test_lora_model_forward_methods(build()),
    ]


def notebook_cells(impl) -> dict[str, list]:
    """Each exercise's check cells as the lesson calls them."""
    return {
        "Lora": [lambda: tests_lora.testing_lora(impl.Lora)],
        "LoraHooks": [
            lambda: tests_lora.testing_lora_hooks(impl.LoraHooks),
            lambda: tests_lora.testing_lora_hooks_qkv_dispatch_and_out(impl.LoraHooks),
        ],
        "TransformerWithValueHeadLora": _model_cells(impl),
        "RLHFTrainerLora": [
            lambda: tests_lora.test_rlhf_trainer_lora(
                impl.RLHFTrainerLora,
                impl.TransformerWithValueHeadLora,
                getattr(impl, "RLHFArgsLora", None),
            )
        ],
    }


def _cell_fails(cell) -> bool:
    try:
        cell()
    except Exception:  # AssertionError from a check, or the code under test raising
        return True
    return False


class SameRunOnce:
    """``run_check`` remembered by (check, the classes it reads): the grader's run and the
    notebook cell's run of one check on the same classes are the same deterministic computation
    (seeded probe, then judge), so the cell reuses the grader's result instead of repeating it.
    Given other classes than the grader's, a cell runs the check itself."""

    def __init__(self) -> None:
        self.results: dict[tuple, object] = {}

    def __call__(self, check_, impl, *args, **kwargs):
        reads = check_.needs
        if check_.exercise == "RLHFTrainerLora":
            reads += ("RLHFArgsLora",)  # the smoke run also reads the given arguments class
        key = (check_.name, args, tuple(sorted(kwargs.items())))
        key += tuple(id(getattr(impl, name, None)) for name in reads)
        if key not in self.results:
            self.results[key] = run_check(check_, impl, *args, **kwargs)
        return self.results[key]


def _disagreements(impl, monkeypatch) -> dict[str, tuple[bool, bool]]:
    once = SameRunOnce()
    monkeypatch.setattr(notebook, "run_check", once)  # the one runner behind tests_lora
    cells = notebook_cells(impl)
    out = {}
    for exercise, checks in rubric().items():
        grader_loses = any(not once(c, impl).passed for c in checks)
        notebook_fails = any([_cell_fails(cell) for cell in cells[exercise]])
        if grader_loses != notebook_fails:
            out[exercise] = (grader_loses, notebook_fails)
    return out


ALL_MUTANTS = [*MUTANTS, *backward_mutants.MUTANTS]


def mutant_disagreements(name: str, folder: str) -> dict[str, tuple[bool, bool]]:
    """One mutant's disagreements, in a process of its own (see ``disagreements``)."""
    import torch

    torch.set_num_threads(1)  # as in the suite's workers (the fork server ran no conftest.py)
    mutant = next(m for m in ALL_MUTANTS if m.name == name)
    impl = load_impl(mutant.write(Path(folder)))
    with pytest.MonkeyPatch.context() as m, contextlib.redirect_stdout(io.StringIO()):
        return _disagreements(impl, m)


@pytest.fixture(scope="module")
def disagreements(tmp_path_factory) -> dict[str, dict]:
    """Every mutant's disagreements, two mutants at a time, each in a process forked from the
    grader's fork server (torch and the library imported once). Half the wall time: this file
    runs first, beside the class-grading test, whose hanging student leaves the other core idle."""
    from lora_rlhf.grading import sandbox

    assert len({m.name for m in ALL_MUTANTS}) == len(ALL_MUTANTS)
    sandbox.start_server()
    folder = str(tmp_path_factory.mktemp("mutants"))
    with ProcessPoolExecutor(max_workers=2, mp_context=sandbox.context()) as pool:
        runs = {m.name: pool.submit(mutant_disagreements, m.name, folder) for m in ALL_MUTANTS}
        return {name: run.result() for name, run in runs.items()}


@pytest.mark.parametrize("mutant", ALL_MUTANTS, ids=lambda m: m.name)
def test_the_notebook_fails_exactly_where_the_grader_takes_points(mutant, disagreements):
    disagree = disagreements[mutant.name]
    assert not disagree, (
        f"{mutant.name}: exercise → (grader takes points, notebook fails) {disagree}"
    )


@pytest.fixture(scope="module")
def correct_run(tmp_path_factory) -> dict:
    """Every notebook cell run once on a correct submission: what they printed, and the checks
    that ran (each through the one runner behind tests_lora)."""
    ran, real = set(), notebook.run_check

    def spy(check_, impl, *a, **kw):
        ran.add(check_.name)
        return real(check_, impl, *a, **kw)

    impl = load_impl(backward_mutants.VARIANTS[0].write(tmp_path_factory.mktemp("correct")))
    with pytest.MonkeyPatch.context() as m, contextlib.redirect_stdout(io.StringIO()) as out:
        m.setattr(notebook, "run_check", spy)
        for cells in notebook_cells(impl).values():
            for cell in cells:
                cell()  # raises on a failing check
    return {"printed": out.getvalue(), "ran": ran}


def test_a_correct_submission_is_green_everywhere(correct_run):
    assert correct_run["printed"].count("passed.") == 6


def test_the_notebook_functions_together_run_every_graded_check(correct_run):
    assert correct_run["ran"] == {c.name for checks in rubric().values() for c in checks}


SPECIFIC = [m for m in MUTANTS if m.catches[0] in ("hooks_qkv_dispatch", "hooks_out_summed")]


@pytest.mark.parametrize("mutant", SPECIFIC, ids=lambda m: m.name)
def test_the_first_hooks_cell_shows_the_specific_diagnosis_too(mutant, tmp_path):
    """A generic merged-model failure does not hide the dispatch's or the out-hook's own
    diagnosis ("hook_k received lora_v's output", "sum over the head axis"): the cell that the
    course runs first lists it, before the merged-model comparison."""
    impl = load_impl(mutant.write(tmp_path))
    with pytest.raises(AssertionError) as err:
        tests_lora.testing_lora_hooks(impl.LoraHooks)
    text = str(err.value)
    assert mutant.says in text
    specific = text.index(f"✗ {mutant.catches[0]} ")
    merged = text.find("✗ hooks_merged_tiny_llama ")
    assert merged == -1 or specific < merged


def test_readme_and_the_grading_doc_quote_the_number_of_mutants_tested():
    root = Path(__file__).resolve().parents[1]
    readme, doc = (
        " ".join((root / p).read_text().split()) for p in ("README.md", "docs/grading.md")
    )
    assert f"for each of {len(ALL_MUTANTS)} deliberately broken submissions" in readme
    assert (
        f"for each of the {len(ALL_MUTANTS)} mutants of the check-power tests "
        f"({len(MUTANTS)} in `tests/mutants.py`, {len(backward_mutants.MUTANTS)} backward"
    ) in doc


def test_readme_quotes_the_check_power_counts():
    import mutants

    readme = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text().split())
    assert f"{len(MUTANTS)} deliberately broken implementations" in readme
    assert f"and {len(backward_mutants.MUTANTS)} that keep the forward pass exact" in readme
    assert f"{len(mutants.VARIANTS)} correct rewrites" in readme
    assert f"and {len(backward_mutants.VARIANTS)} backward ones" in readme
