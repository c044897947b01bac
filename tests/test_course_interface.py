"""The course's interface, exactly: the attributes and signatures it names, what it gives
and what it asks, and a submission written the way the course writes it graded and trained.

The expected names and values below are written out from the course's own text, not read from the library.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import torch

import lora_rlhf.lessons.section2_lora as lora
from lora_rlhf.authoring.implementations import repo_root
from lora_rlhf.cli.command import main
from lora_rlhf.cli.outputs import read_metrics
from lora_rlhf.models import load_model

COURSE_SUBMISSION = Path(__file__).parent / "grading_fixtures" / "course_submission.py"

# What the student writes: each raises NotImplementedError("Exercise <name>: ...") in exercises/.
ASKED = {
    "Lora.__init__",
    "Lora.forward",
    "LoraHooks.__init__",
    "LoraHooks.lora_hook_qkv",
    "LoraHooks.lora_hook_out",
    "TransformerWithValueHeadLora.setup_lora",
    "TransformerWithValueHeadLora.forward_with_value_head",
    "TransformerWithValueHeadLora.generate",
}
# What the course gives complete (no stub anywhere in them).
GIVEN = {
    "LoraHooks.store_hook_attn_normalized",
    "LoraHooks.store_hook_z",
    "LoraHooks.list_fwd_hooks",
    "TransformerWithValueHeadLora.from_pretrained",
    "TransformerWithValueHeadLora.fwd_hooks",
    "TransformerWithValueHeadLora.base_model_params",
    "TransformerWithValueHeadLora.lora_params",
    "TransformerWithValueHeadLora.get_base_model_trainable_params",
    "TransformerWithValueHeadLora.get_value_head_params",
    "RLHFTrainerLora.__init__",
}
# The given first lines of the two asked __init__s: the attributes they set before the stub.
GIVEN_IN_INIT = {
    "Lora.__init__": {"rank", "d_in", "d_out", "n_inst", "lora_alpha", "dtype"},
    "LoraHooks.__init__": {
        "layer_idx",
        "rank",
        "lora_alpha",
        "dtype",
        "n_qo_heads",
        "n_kv_heads",
    },
}


def _methods(path: Path) -> dict[str, ast.FunctionDef]:
    tree = ast.parse(path.read_text())
    return {
        f"{cls.name}.{fn.name}": fn
        for cls in tree.body
        if isinstance(cls, ast.ClassDef)
        for fn in cls.body
        if isinstance(fn, ast.FunctionDef)
    }


def _stub_message(fn: ast.FunctionDef) -> str | None:
    for node in ast.walk(fn):
        if (
            isinstance(node, ast.Raise)
            and isinstance(node.exc, ast.Call)
            and getattr(node.exc.func, "id", "") == "NotImplementedError"
        ):
            return node.exc.args[0].value
    return None


def test_the_stubs_are_what_the_course_asks_and_the_rest_is_given():
    root = repo_root()
    if root is None:
        pytest.skip("needs the source checkout's exercises/")
    methods = _methods(root / "exercises" / "section2_lora.py")
    stubs = {name for name, fn in methods.items() if _stub_message(fn) is not None}
    assert stubs == ASKED
    for name in ASKED:
        assert _stub_message(methods[name]).startswith(f"Exercise {name}: ")
    assert GIVEN <= set(methods) and not GIVEN & stubs
    for name, attributes in GIVEN_IN_INIT.items():
        body = methods[name].body
        stub_at = next(i for i, st in enumerate(body) if isinstance(st, ast.Raise))
        set_before = {
            target.attr
            for st in body[:stub_at]
            if isinstance(st, ast.Assign)
            for target in st.targets
            if isinstance(target, ast.Attribute)
        }
        assert attributes <= set_before, f"{name} should give {attributes - set_before}"


def test_the_library_classes_carry_the_course_attributes_with_their_values():
    lo = lora.Lora(d_in=12, d_out=5, rank=3, lora_alpha=6)
    assert (lo.rank, lo.d_in, lo.d_out, lo.n_inst, lo.lora_alpha, lo.dtype) == (
        3,
        12,
        5,
        1,
        6,
        None,
    )
    assert lo.A.shape == (1, 12, 3) and lo.B.shape == (1, 3, 5)
    assert lora.Lora(n_inst=7, dtype=torch.float64).A.dtype == torch.float64

    assert lora.LoraHooks.cache_qkv_in is None and lora.LoraHooks.cache_z is None
    model = lora.TransformerWithValueHeadLora.from_pretrained(
        "tiny-llama", lora_alpha=8, rank=2, device="cpu"
    )
    cfg = load_model("tiny-llama", device="cpu").cfg  # tiny-llama has grouped-query attention
    assert cfg.n_key_value_heads is not None and cfg.n_key_value_heads < cfg.n_heads
    assert isinstance(model.lora, torch.nn.ModuleList) and len(model.lora) == cfg.n_layers
    for i, layer in enumerate(model.lora):
        assert (layer.layer_idx, layer.rank, layer.lora_alpha, layer.dtype) == (i, 2, 8, cfg.dtype)
        assert (layer.n_qo_heads, layer.n_kv_heads) == (cfg.n_heads, cfg.n_key_value_heads)
        heads = {"q": cfg.n_heads, "k": cfg.n_key_value_heads, "v": cfg.n_key_value_heads}
        for target, n_inst in {**heads, "o": cfg.n_heads}.items():
            adaptor = getattr(layer, f"lora_{target}")
            assert (adaptor.n_inst, adaptor.rank, adaptor.lora_alpha) == (n_inst, 2, 8)
    tokens = torch.tensor([[1, 5, 9, 2]])
    model.forward_with_value_head(tokens)
    assert model.lora[0].cache_qkv_in.shape == (1, 4, cfg.d_model)
    assert model.lora[0].cache_z.shape == (1, 4, cfg.n_heads, cfg.d_head)
    assert [name for name, _ in model.fwd_hooks][-1] == "ln_final.hook_normalized"

    lora_ids = {id(p) for layer in model.lora for p in layer.parameters()}
    assert {id(p) for p in model.lora_params()} == lora_ids
    assert {id(p) for p in model.get_base_model_trainable_params()} == lora_ids
    assert {id(p) for p in model.get_value_head_params()} == {
        id(p) for p in model.value_head.parameters()
    }
    frozen = list(model.base_model_params())
    assert frozen and not any(p.requires_grad for p in frozen)
    assert not lora_ids & {id(p) for p in frozen}


def test_the_course_signatures_and_defaults():
    def params(fn):
        return {n: p.default for n, p in inspect.signature(fn).parameters.items()}

    empty = inspect.Parameter.empty
    assert params(lora.Lora.__init__) == dict(
        self=empty, d_in=768, d_out=768, rank=4, lora_alpha=32, n_inst=None, dtype=None
    )
    assert params(lora.LoraHooks.__init__) == dict(
        self=empty, layer_idx=empty, cfg=empty, lora_alpha=32, rank=4, dtype=None
    )
    model_cls = lora.TransformerWithValueHeadLora
    assert params(model_cls.from_pretrained) == dict(
        args=empty, lora_alpha=32, rank=4, kwargs=empty
    )
    assert params(model_cls.setup_lora) == dict(self=empty, lora_alpha=32, rank=4, kwargs=empty)
    assert list(params(model_cls.generate)) == ["self", "tokens", "kwargs"]
    assert list(params(lora.RLHFTrainerLora.__init__)) == ["self", "args"]
    args = lora.RLHFArgsLora(base_model="tiny-llama")
    assert (args.lora_rank, args.lora_alpha, args.dtype) == (4, 32, None)


def test_a_submission_written_the_way_the_course_writes_it_scores_100(tmp_path, monkeypatch):
    from lora_rlhf.grading import grade

    monkeypatch.chdir(tmp_path)
    report = grade(COURSE_SUBMISSION)
    failed = [(r.name, r.message) for r in report.results if not r.passed]
    assert report.score == report.max_score == 100, failed


def test_a_submission_written_the_way_the_course_writes_it_trains(tmp_path):
    """Its own RLHFTrainerLora (the course's __init__, no super().__init__) under the command."""
    out = tmp_path / "run"
    options = ["--model", "tiny-llama", "--batch-size", "4", "--minibatches", "2"]
    options += ["--gen-len", "4", "--warmup", "0", "--no-progress", "--threads", "1"]
    code = main(
        ["train", *options, "--impl", str(COURSE_SUBMISSION), "--phases", "3", "--out", str(out)]
    )
    assert code == 0
    metrics = read_metrics(out)
    assert [m["phase"] for m in metrics] == [0, 1, 2]
    for name in ("samples.md", "adapter.safetensors", "adapter_config.json", "reward_curve.png"):
        assert (out / name).is_file(), name


def test_an_adaptor_outside_the_contract_stops_training_before_it_starts(tmp_path, capsys):
    """A Lora keeping α/r under its own name: one line naming the attributes, exit status 2."""
    source = COURSE_SUBMISSION.read_text()
    source = source.replace("        self.lora_alpha = lora_alpha\n", "", 1)
    source = source.replace("x_a_b * (self.lora_alpha / self.rank)", "x_a_b * 8.0")
    path = tmp_path / "own_scale.py"
    path.write_text(source)
    options = ["--model", "tiny-llama", "--no-progress", "--threads", "1", "--warmup", "0"]
    code = main(
        ["train", *options, "--impl", str(path), "--phases", "1", "--out", str(tmp_path / "r")]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "Lora has no lora_alpha: an adaptor keeps A, B, rank and lora_alpha" in err
