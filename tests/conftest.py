"""Shared fixtures: the device parametrisation and the three offline models.

* ``device`` — ``"cpu"``, and ``"cuda"`` when a GPU is present (skipped otherwise). A test that
  takes ``device`` (directly or through ``tiny_llama``/``tiny_pythia``) runs once per device.
* ``tiny_llama`` / ``tiny_pythia`` — fresh random-init models on ``device`` (~20 ms each).
* ``smollm2_reference`` — the transformers model and tokenizer of the same GGUF, once per session.
* ``smollm2`` — the embedded SmolLM2-135M on cpu, loaded once per session (per xdist worker).
* ``smollm2_mlp_lora`` — the embedded model with random non-zero attention and MLP adaptors,
  once per session; shared by the merge and PEFT-export tests, which do not change it.

The first load ever converts the GGUF file (~30 s) and caches both models under
``$LORA_RLHF_CACHE`` or ``~/.cache/lora_rlhf``; the cache is left there on purpose so that later
runs load each in ~1 s. Tests that damage a cache must point ``LORA_RLHF_CACHE`` at a temporary
folder.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

# torch and the library are imported where tests run (the workers), not in pytest-xdist's
# controller process, which only schedules: importing them there cost seconds before any worker
# started.
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.cuda]),  # skipped without a GPU
]


def _is_xdist_controller(config) -> bool:
    return bool(getattr(config.option, "numprocesses", None)) and not hasattr(config, "workerinput")


# The files that take longest, longest first (per-file time of the suite's tests, 6 Dec 2026).
# pytest-xdist hands each worker a whole file (--dist loadfile) as it runs short of work; by
# default the files with the most tests go first, which left these few-test, long files (a class
# graded while one student hangs, the Gradescope bundle, subprocess runs) to the end, one worker
# finishing them while the other idled. Longest first balances the two workers.
LONGEST_FIRST = [
    "test_grade_class.py",
    "test_notebook_equals_grader.py",
    "test_gradescope_bundle.py",
    "test_trainer.py",
    "test_grpo_vs_ppo.py",
    "test_stopped_runs.py",
    "test_fast.py",
    "test_notebooks.py",
    "test_lora_trainer.py",
    "test_grading.py",
    "test_merge.py",
    "test_architecture.py",
]


def pytest_configure(config):
    if _is_xdist_controller(config):
        if hasattr(config.option, "loadscopereorder"):
            config.option.loadscopereorder = False  # keep the order of LONGEST_FIRST
        return
    import torch

    # One intra-op thread: the test models are tiny, and on a busy 2-core machine OpenMP's
    # spinning threads made the suite ~10× slower (measured: the 23 exercise checks take 1.9 s on
    # one thread, 24 s on two under load). Parallelism comes from pytest-xdist workers instead.
    torch.set_num_threads(1)
    from helpers import quick_figures

    quick_figures()  # `train` writes stand-in figures but where a test asks for real ones


def pytest_addoption(parser):
    parser.addoption(
        "--impl",
        default=os.environ.get("LORA_RLHF_IMPL", "library"),
        help="whose Section 2 classes tests/test_exercises.py checks: library (default), "
        "solutions, exercises, or the path of a submission file or folder",
    )


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """Each device-sensitive test runs on cpu, and on cuda when one is present."""
    return request.param


@pytest.fixture
def tiny_llama(device: str) -> HookedTransformer:
    """A fresh random-init Llama-style model (grouped-query attention) on `device`."""
    from lora_rlhf.models import load_model

    return load_model("tiny-llama", device=device)


@pytest.fixture
def tiny_pythia(device: str) -> HookedTransformer:
    """A fresh random-init Pythia-style model (parallel attention + MLP) on `device`."""
    from lora_rlhf.models import load_model

    return load_model("tiny-pythia", device=device)


@pytest.fixture(scope="session")
def smollm2() -> HookedTransformer:
    """The embedded SmolLM2-135M on cpu, shared by the whole session: do not modify it."""
    from lora_rlhf.models import load_model

    return load_model("smollm2-135m", device="cpu")


@pytest.fixture(scope="session")
def smollm2_reference():
    """``(hf_model, hf_tokenizer)``: the transformers model de-quantized from the same GGUF file,
    fp32 on cpu, loaded from the cache once per session (~1 s). Shared: do not change it; a test
    that does (e.g. PEFT wraps it) loads its own with ``hf_model_and_tokenizer()``."""
    import torch

    from lora_rlhf.models.smollm2 import hf_model_and_tokenizer

    return hf_model_and_tokenizer(torch.float32)


@pytest.fixture(scope="session")
def smollm2_mlp_lora():
    """The embedded model with random non-zero attention and MLP adaptors (``make_lora_model`` of
    tests/helpers.py: α=8, r=4, B ~ N(0, 0.02²)), once per session. Shared: do not change it."""
    from helpers import make_lora_model

    return make_lora_model("smollm2-135m", mlp=True, b_std=0.02)


SMOLLM2_FIXTURES = {"smollm2", "smollm2_reference", "smollm2_mlp_lora"}


def pytest_collection_modifyitems(config, items):
    """The longest files first; every test that uses the embedded model is `slow`, so
    `-m "not slow"` is the quick suite; the cuda cases are skipped without a GPU."""
    import torch

    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: else as collected
    no_cuda = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if item.get_closest_marker("cuda") and not torch.cuda.is_available():
            item.add_marker(no_cuda)
        # fixturenames is the closure: it includes fixtures used through other fixtures.
        if SMOLLM2_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
