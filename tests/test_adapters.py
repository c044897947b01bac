"""The on/off switch (disable_lora) and save/load of adaptors (safetensors + JSON config)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import make_lora_model, tokens
from transformer_lens import HookedTransformer

import lora_rlhf
from lora_rlhf.adapters.files import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    AdapterMismatchError,
    disable_lora,
    load_adapter,
    load_lora_model,
    lora_enabled,
    lora_targets,
    read_adapter_config,
    save_adapter,
)
from lora_rlhf.lessons.bonus_mlp_lora import TransformerWithValueHeadMlpLora
from lora_rlhf.lessons.section2_lora import TransformerWithValueHeadLora

GREEDY = dict(max_new_tokens=5, do_sample=False, verbose=False, stop_at_eos=False)


# ---------------------------------------------------------------------------------------------
# disable_lora


@pytest.mark.parametrize("mlp", [False, True], ids=["attn", "attn+mlp"])
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-pythia"])
def test_disabled_forward_with_value_head_gives_exact_base_logits(name, mlp, device):
    model = make_lora_model(name, device, mlp=mlp)
    toks = tokens(model)
    with torch.no_grad():
        lora_logits, _ = model.forward_with_value_head(toks)
        with disable_lora(model):
            off_logits, off_values = model.forward_with_value_head(toks)
        base = model(toks)
        again, _ = model.forward_with_value_head(toks)
    assert torch.equal(off_logits, base)
    assert off_values.shape == toks.shape  # the value head still runs
    assert not torch.equal(lora_logits, base)
    assert torch.equal(again, lora_logits)


def test_disabled_generate_gives_the_base_models_tokens():
    model = make_lora_model("tiny-llama", mlp=True, b_std=0.5)
    prompt = tokens(model, batch=1, seq=4)
    with torch.no_grad():
        base = HookedTransformer.generate(model, prompt, **GREEDY)  # the base class: no hooks
        with disable_lora(model):
            off = model.generate(prompt, **GREEDY)
        on = model.generate(prompt, **GREEDY)
    assert torch.equal(off, base)
    assert not torch.equal(on, base)


def test_disable_lora_nests_and_restores_the_previous_state():
    model = make_lora_model("tiny-llama")
    hooks = model.lora_fwd_hooks
    with disable_lora(model):
        with disable_lora(model):
            assert not lora_enabled(model)
        assert not lora_enabled(model)
    assert lora_enabled(model) and model.lora_fwd_hooks is hooks


def test_disable_lora_restores_the_adaptors_when_the_block_raises():
    model = make_lora_model("tiny-llama")
    with pytest.raises(RuntimeError, match="boom"):
        with disable_lora(model):
            raise RuntimeError("boom")
    assert lora_enabled(model)


# ---------------------------------------------------------------------------------------------
# save / load


@pytest.mark.parametrize("mlp", [False, True], ids=["attn", "attn+mlp"])
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-pythia"])
def test_save_load_round_trip_is_exact(name, mlp, tmp_path):
    trained = make_lora_model(name, mlp=mlp, seed=1)
    save_adapter(trained, tmp_path)
    fresh = make_lora_model(name, mlp=mlp, seed=2)
    load_adapter(fresh, tmp_path)
    want, got = trained.state_dict(), fresh.state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)  # adaptors, value head and base
    toks = tokens(trained)
    with torch.no_grad():
        assert torch.equal(
            fresh.forward_with_value_head(toks)[0], trained.forward_with_value_head(toks)[0]
        )


def test_saved_config_describes_the_adapter(tmp_path):
    model = make_lora_model("tiny-llama", mlp=True)
    save_adapter(model, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {ADAPTER_WEIGHTS, ADAPTER_CONFIG}
    config = read_adapter_config(tmp_path)
    assert config["base_model"] == "tiny-llama"
    assert (config["rank"], config["lora_alpha"]) == (4, 8)
    assert config["targets"] == ["q", "k", "v", "o", "mlp_in", "mlp_gate", "mlp_out"]
    assert config["library_version"] == lora_rlhf.__version__
    assert config["value_head"] is True and config["model"]["n_key_value_heads"] == 2


def test_load_lora_model_builds_the_saved_model(tmp_path):
    trained = make_lora_model("tiny-pythia", mlp=True, seed=1)
    save_adapter(trained, tmp_path)
    loaded = load_lora_model(tmp_path, device="cpu")
    assert isinstance(loaded, TransformerWithValueHeadMlpLora)
    assert lora_targets(loaded) == lora_targets(trained)
    toks = tokens(trained)
    with torch.no_grad():
        assert torch.equal(
            loaded.forward_with_value_head(toks)[1], trained.forward_with_value_head(toks)[1]
        )


def test_loading_onto_another_base_model_names_both(tmp_path):
    save_adapter(make_lora_model("tiny-llama"), tmp_path)
    config = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    config["base_model"] = "smollm2-135m"
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps(config))
    with pytest.raises(
        AdapterMismatchError, match="adapter was trained on smollm2-135m, this model is tiny-llama"
    ):
        load_adapter(make_lora_model("tiny-llama"), tmp_path)


def test_mismatched_shapes_name_the_tensor_and_both_shapes(tmp_path):
    save_adapter(make_lora_model("tiny-llama"), tmp_path)  # 2 key/value heads
    pythia = make_lora_model("tiny-pythia")  # 4 key/value heads
    with pytest.raises(
        AdapterMismatchError, match=r"layer 0 lora_k\.A: saved \(2, 64, 4\), model \(4, 64, 4\)"
    ):
        load_adapter(pythia, tmp_path, check_base_model=False)


def test_a_failed_load_leaves_the_model_unchanged(tmp_path):
    save_adapter(make_lora_model("tiny-llama", seed=1), tmp_path)
    pythia = make_lora_model("tiny-pythia")
    before = {k: v.clone() for k, v in pythia.state_dict().items()}
    with pytest.raises(AdapterMismatchError):
        load_adapter(pythia, tmp_path, check_base_model=False)
    assert all(torch.equal(before[k], v) for k, v in pythia.state_dict().items())


def test_mismatched_rank_is_an_error(tmp_path):
    save_adapter(make_lora_model("tiny-llama"), tmp_path)
    other = TransformerWithValueHeadLora.from_pretrained("tiny-llama", lora_alpha=8, rank=2)
    with pytest.raises(
        AdapterMismatchError, match="adapter has rank=4, lora_alpha=8.*this model rank=2"
    ):
        load_adapter(other, tmp_path)


def test_mlp_adapter_on_an_attention_only_model_says_which_class_to_use(tmp_path):
    save_adapter(make_lora_model("tiny-llama", mlp=True), tmp_path)
    with pytest.raises(AdapterMismatchError, match="TransformerWithValueHeadMlpLora"):
        load_adapter(make_lora_model("tiny-llama"), tmp_path)


def test_value_head_is_optional(tmp_path):
    trained = make_lora_model("tiny-llama", seed=1)
    save_adapter(trained, tmp_path / "with")
    save_adapter(trained, tmp_path / "without", value_head=False)
    assert read_adapter_config(tmp_path / "without")["value_head"] is False
    fresh = make_lora_model("tiny-llama", seed=2)
    head = {k: v.clone() for k, v in fresh.value_head.state_dict().items()}
    load_adapter(fresh, tmp_path / "with", value_head=False)
    assert all(torch.equal(head[k], v) for k, v in fresh.value_head.state_dict().items())
    with pytest.raises(AdapterMismatchError, match="no value head"):
        load_adapter(fresh, tmp_path / "without", value_head=True)


def test_a_peft_folder_is_refused_with_a_pointer_to_peft(tmp_path):
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(AdapterMismatchError, match="PeftModel.from_pretrained"):
        read_adapter_config(tmp_path)


def test_the_contract_is_read_from_a_course_written_submission_and_its_absence_named(tmp_path):
    """α/r comes from the adaptor's own `lora_alpha` and `rank`, as the course's given
    Lora.__init__ keeps them; an adaptor without them is refused with their names."""
    from lora_rlhf.adapters.contract import AdaptorContractError, scaling_of
    from lora_rlhf.authoring.implementations import load_impl

    course = Path(__file__).parent / "grading_fixtures" / "course_submission.py"
    impl = load_impl(str(course))
    model = impl.TransformerWithValueHeadLora.from_pretrained("tiny-llama", lora_alpha=8, rank=4)
    assert scaling_of(model.lora[0].lora_q) == 8 / 4
    save_adapter(model, tmp_path / "adapter")
    assert read_adapter_config(tmp_path / "adapter")["lora_alpha"] == 8

    class OwnNames(torch.nn.Module):  # a student's adaptor keeping α/r under its own name
        def __init__(self):
            super().__init__()
            self.A = torch.nn.Parameter(torch.zeros(1, 3, 2))
            self.B = torch.nn.Parameter(torch.zeros(1, 2, 3))
            self.scale = 4.0

    with pytest.raises(AdaptorContractError, match="has no rank, lora_alpha: .*A, B, rank and"):
        scaling_of(OwnNames())
    model.lora[1].lora_v.rank = 3
    with pytest.raises(AdaptorContractError, match="rank=3 but its A has shape"):
        save_adapter(model, tmp_path / "again")
