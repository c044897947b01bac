"""RLHFTrainer: short runs on the tiny models, its extension points, wandb offline, the reward
moving the way it points on tiny-llama, and (slow) one PPO step on the embedded model."""

import functools
import glob
import json
import math
import os
import time

import pytest
import torch
from helpers import tiny_args

import lora_rlhf.rlhf.trainer as trainer_module
from lora_rlhf.rlhf.args import RLHFArgs
from lora_rlhf.rlhf.ppo import (
    ReplayMemory,
    calc_clipped_surrogate_objective,
    calc_entropy_bonus,
    calc_kl_penalty,
    calc_value_function_loss,
    get_logprobs,
    get_samples,
)
from lora_rlhf.rlhf.rewards import reward_fn_char_count, reward_fn_no_char
from lora_rlhf.rlhf.trainer import RLHFTrainer

TINY_MODELS = ["tiny-llama", "tiny-pythia"]
METRIC_KEYS = {
    "phase",
    "reward_mean",
    "reward_std",
    "kl",
    "entropy",
    "value_loss",
    "clip_frac",
    "lr",
    "rollout_seconds",
    "phase_seconds",
}


@pytest.mark.parametrize("base_model", TINY_MODELS)
def test_two_phases_give_finite_metrics_and_callbacks(base_model):
    seen = []
    trainer = RLHFTrainer(tiny_args(base_model), on_phase_end=seen.append, show_progress=False)
    history = trainer.train()
    assert history is trainer.history and len(history) == 2 and seen == history
    for phase, metrics in enumerate(history):
        assert METRIC_KEYS <= set(metrics)
        assert metrics["phase"] == phase
        for key in METRIC_KEYS:
            assert math.isfinite(metrics[key]), (key, metrics[key])
    assert len(trainer.samples) == 4 and all(s.count("This is") for s in trainer.samples)
    assert len(trainer.sample_history) == 2
    assert history[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # policy starts equal to the reference


def test_same_seed_gives_identical_metrics():
    def run(seed):
        trainer = RLHFTrainer(tiny_args(seed=seed), show_progress=False)
        history = trainer.train()
        timeless = [{k: v for k, v in m.items() if not k.endswith("_seconds")} for m in history]
        return timeless, trainer.samples

    first, second, other = run(3), run(3), run(4)
    assert first == second
    assert other != first


def test_trainer_holds_model_frozen_reference_optimizer_and_prefix_len():
    trainer = RLHFTrainer(tiny_args(), show_progress=False)
    args = trainer.args
    assert trainer.prefix_len == trainer.model.to_tokens(args.prefix).shape[1] == 3
    assert trainer.ref_model is not trainer.model
    assert all(not p.requires_grad for p in trainer.ref_model.parameters())
    assert trainer.optimizer.param_groups[0]["lr"] == args.base_lr
    ref_before = [p.clone() for p in trainer.ref_model.parameters()]
    policy_before = [p.clone() for p in trainer.model.get_base_model_trainable_params()]
    trainer.train()
    for before, after in zip(ref_before, trainer.ref_model.parameters()):
        torch.testing.assert_close(before, after, rtol=0, atol=0)
    changed = [
        not torch.equal(b, a)
        for b, a in zip(policy_before, trainer.model.get_base_model_trainable_params())
    ]
    assert any(changed), "full fine-tuning should change the policy's weights"


def test_rollout_phase_fills_the_replay_memory():
    trainer = RLHFTrainer(
        tiny_args(batch_size=6, num_minibatches=3, gen_len=5), show_progress=False
    )
    memory = trainer.rollout_phase()
    assert isinstance(memory, ReplayMemory)
    seq = trainer.prefix_len + 5
    assert memory.sample_ids.shape == (6, seq)
    assert memory.logprobs.shape == memory.advantages.shape == (6, 5)
    assert memory.values.shape == (6, seq)
    # the reference logits are kept at the generated positions only (the KL penalty's)
    assert memory.ref_logits.shape == (6, 5, trainer.model.cfg.d_vocab)
    assert trainer.rewards.shape == (6,) and len(trainer.samples) == 6
    assert not memory.logprobs.requires_grad and not memory.ref_logits.requires_grad


def test_rlhf_objective_combines_the_four_terms():
    args = tiny_args(kl_coef=0.7, ent_coef=0.05, vf_coef=0.3)
    trainer = RLHFTrainer(args, show_progress=False)
    memory = trainer.rollout_phase()
    # perturb the policy so that the KL term is non-zero
    with torch.no_grad():
        trainer.model.unembed.W_U.add_(0.5 * torch.randn_like(trainer.model.unembed.W_U))
    minibatch = memory.get_minibatches()[0]
    objective = trainer.compute_rlhf_objective(minibatch)

    with torch.no_grad():
        logits, values = trainer.model.forward_with_value_head(minibatch.sample_ids)
    cut = slice(-args.gen_len - 1, -1)
    logprobs = get_logprobs(logits, minibatch.sample_ids, trainer.prefix_len)
    kl = calc_kl_penalty(logits[:, cut], minibatch.ref_logits, args.kl_coef, args.gen_len)
    assert kl.item() > 0
    expected = (
        calc_clipped_surrogate_objective(
            logprobs, minibatch.logprobs, minibatch.advantages, args.clip_coef, args.gen_len
        )
        - calc_value_function_loss(values[:, cut], minibatch.returns, args.vf_coef, args.gen_len)
        + calc_entropy_bonus(logits[:, cut], args.ent_coef, args.gen_len)
        - kl
    )
    assert objective.requires_grad
    assert objective.item() == pytest.approx(expected.item(), rel=1e-5)


def test_subclass_may_use_the_policy_itself_as_reference():
    class SharedReferenceTrainer(RLHFTrainer):
        def build_ref_model(self):
            return self.model

    trainer = SharedReferenceTrainer(tiny_args(), show_progress=False)
    assert trainer.ref_model is trainer.model
    history = trainer.train()
    assert all(m["kl"] == pytest.approx(0.0, abs=1e-6) for m in history)


def test_rewards_by_name_and_unnormalised_rewards_work():
    trainer = RLHFTrainer(
        tiny_args(reward_fn="length", normalize_reward=False, total_phases=1), show_progress=False
    )
    (metrics,) = trainer.train()
    assert metrics["reward_mean"] == pytest.approx(sum(map(len, trainer.samples)) / 4)


def test_wandb_offline_run_records_the_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    trainer = RLHFTrainer(tiny_args(use_wandb=True), show_progress=False)
    trainer.train()

    (run_dir,) = glob.glob(os.path.join(tmp_path, "wandb", "offline-run-*"))
    (log_file,) = glob.glob(os.path.join(run_dir, "run-*.wandb"))
    # wandb's service process may still be writing the log when finish() returns
    deadline = time.monotonic() + 30
    while True:
        data = open(log_file, "rb").read()
        missing = [key for key in METRIC_KEYS if key.encode() not in data]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not missing, f"not in the offline run log: {missing}"
    tables = glob.glob(os.path.join(run_dir, "files", "media", "table", "samples_*.table.json"))
    assert len(tables) == 2  # one samples table per phase
    logged = [json.load(open(t)) for t in tables]
    last = next(t for t in logged if t["data"][0][0] == 1)
    assert last["columns"] == ["phase", "sample", "reward"]
    assert [row[1] for row in last["data"]] == trainer.samples


def continuation_char_count(model, args: RLHFArgs, char: str, n_samples=64, seed=123) -> float:
    """Mean count of ``char`` in the generated part of ``n_samples`` fresh samples, drawn with
    their own seed (the same draws for every model: common random numbers make the before/after
    comparison less noisy)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        ids, _ = get_samples(
            model, args.prefix, n_samples, args.gen_len, args.temperature, args.top_k, True
        )
    continuations = model.to_string(ids[:, -args.gen_len :])
    return sum(text.count(char) for text in continuations) / n_samples


def tiny_char_run(reward_fn, prepare=None) -> tuple[float, float, list[float]]:
    """Full fine-tuning of tiny-llama for 6 phases with ``reward_fn`` for the letter "e";
    ``prepare(trainer)`` may change the trainer first. The mean count of "e" per continuation of
    the frozen reference (before) and the trained policy (after), and the phases' rewards."""
    args = RLHFArgs(
        base_model="tiny-llama",
        device="cpu",
        seed=1,
        total_phases=6,
        warmup_steps=0,
        final_scale=1.0,
        batch_size=64,
        num_minibatches=4,
        gen_len=4,
        base_lr=3e-3,
        kl_coef=0.0,
        reward_fn=functools.partial(reward_fn, char="e"),
    )
    trainer = RLHFTrainer(args, show_progress=False)
    if prepare is not None:
        prepare(trainer)
    history = trainer.train()
    before = continuation_char_count(trainer.ref_model, args, "e")
    after = continuation_char_count(trainer.model, args, "e")
    print(f'mean "e"s per continuation: before {before:.3f}, after {after:.3f}')
    return before, after, [round(m["reward_mean"], 2) for m in history]


@pytest.mark.parametrize(
    "reward_fn, rises",
    [(reward_fn_char_count, True), (reward_fn_no_char, False)],
    ids=["char_count_rises", "no_char_falls"],
)
def test_full_fine_tuning_moves_the_char_count_the_way_the_reward_points(reward_fn, rises):
    """kl_coef=0 and 6 phases of 8 PPO steps on tiny-llama: the policy learns to write more "e"s
    when they are rewarded and fewer when they are penalised.

    The letter is "e" because the tiny tokenizer has a single "." among its 512 tokens, which the
    random model almost never samples; "e" is in 90 of them. Checked on 64 held-out samples from
    the trained policy and from the frozen reference (the initial policy), counting the generated
    tokens only: 0.86 "e"s per sample before; after, 3.0 to 7.0 with seeds 1-14 when rewarded
    (0.12 or fewer when penalised). A trainer with the advantages' sign flipped, or an optimizer
    that minimises, ends at 0.0 to 1.1 when rewarded. ~1.5 CPU-seconds each.
    """
    before, after, rewards = tiny_char_run(reward_fn)
    if rises:
        assert after >= 2 * before, (before, after, rewards)
    else:
        assert after <= before / 2, (before, after, rewards)


def _minimise(trainer) -> None:
    for group in trainer.optimizer.param_groups:
        group["maximize"] = False


@pytest.mark.parametrize("broken", ["advantages_negated", "optimizer_minimises"])
def test_the_reward_direction_check_fails_a_broken_trainer(broken, monkeypatch):
    """The check above has power: a trainer that pushes the wrong way does not double the
    rewarded letter (measured: 0.0 to 1.1 "e"s per continuation against 0.86 before)."""
    prepare = None
    if broken == "advantages_negated":
        compute = trainer_module.compute_advantages
        monkeypatch.setattr(trainer_module, "compute_advantages", lambda *a, **k: -compute(*a, **k))
    else:
        prepare = _minimise
    before, after, rewards = tiny_char_run(reward_fn_char_count, prepare)
    assert after < 2 * before, (before, after, rewards)


# A fixed rollout for the embedded model: five tokens after "This is", half of them with two
# periods (reward 2), half with none (reward 0).
FIXED_CONTINUATIONS = [
    " fine. Really fine.",
    " not a test at all",
    " good. Very good.",
    " what we want to do",
    " it. Yes. No",
    " the best way to go",
    " yes. It is.",
    " something I like a lot",
]


@pytest.mark.slow
def test_one_ppo_step_on_the_embedded_model_favours_the_rewarded_samples(monkeypatch):
    """Full fine-tuning of SmolLM2-135M at the default learning rate, one PPO step (kl_coef=0) on
    a fixed rollout: the last token of each sample, the one its reward is credited to, becomes
    more likely where the reward is 2 and less likely where it is 0, and the whole continuation
    gains log-probability relative to the unrewarded ones.

    Seeds 1-3 (the value head's initialisation): last-token changes +0.15 to +4.2 nats for the
    rewarded samples, -0.34 to -13 for the others; with the advantages' sign flipped every one of
    them changes sign. ~8 CPU-seconds, most of it loading the model, the reference copy and
    AdamW's first step over 135M weights.
    """
    args = RLHFArgs(
        base_model="smollm2-135m",
        device="cpu",
        seed=1,
        total_phases=1,
        warmup_steps=0,
        batch_size=len(FIXED_CONTINUATIONS),
        num_minibatches=1,
        batches_per_learning_phase=1,
        gen_len=5,
        kl_coef=0.0,
    )
    trainer = RLHFTrainer(args, show_progress=False)
    model = trainer.model
    continuations = [model.to_tokens(c, prepend_bos=False) for c in FIXED_CONTINUATIONS]
    assert all(c.shape == (1, args.gen_len) for c in continuations)
    prompt = model.to_tokens(args.prefix).expand(len(continuations), -1)
    ids = torch.cat([prompt, torch.cat(continuations)], dim=1)
    monkeypatch.setattr(
        trainer_module, "get_samples", lambda model, **kwargs: (ids.clone(), model.to_string(ids))
    )

    memory = trainer.rollout_phase()
    assert trainer.rewards.tolist() == [2, 0] * 4
    trainer.learning_phase(memory)
    with torch.no_grad():
        logprobs = get_logprobs(model(ids), ids, trainer.prefix_len)
    change = logprobs - memory.logprobs  # [batch, gen_len]
    rewarded = trainer.rewards > 0
    assert (change[rewarded, -1] > 0).all() and (change[~rewarded, -1] < 0).all(), change[:, -1]
    total = change.sum(-1)
    assert total[rewarded].mean() > total[~rewarded].mean(), total
