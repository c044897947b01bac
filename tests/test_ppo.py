"""Section 1 PPO pieces, each checked against an independent formula on hand-made inputs."""

import math

import numpy as np
import pytest
import torch

from lora_rlhf.rlhf.args import RLHFArgs
from lora_rlhf.rlhf.ppo import (
    ReplayMemory,
    calc_clipped_surrogate_objective,
    calc_entropy_bonus,
    calc_kl_penalty,
    calc_value_function_loss,
    compute_advantages,
    get_logprobs,
    get_optimizer,
    get_optimizer_and_scheduler,
    get_samples,
)
from lora_rlhf.rlhf.rewards import REWARDS, normalize_reward, reward_fn_char_count
from lora_rlhf.rlhf.value_head import HookedTransformerWithValueHead

BATCH, PREFIX_LEN, GEN_LEN, D_VOCAB = 3, 3, 4, 7
SEQ = PREFIX_LEN + GEN_LEN


def np_log_softmax(x: np.ndarray) -> np.ndarray:
    """Stable float64 log-softmax over the last axis."""
    x = x.astype(np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def reference_kl(logits: np.ndarray, ref_logits: np.ndarray, gen_len: int) -> float:
    """Mean over samples and generated positions of sum_v p log(p / q), by explicit loops."""
    seq = logits.shape[1]
    terms = []
    for b in range(logits.shape[0]):
        for pos in range(seq - gen_len - 1, seq - 1):
            logp = np_log_softmax(logits[b, pos])
            logq = np_log_softmax(ref_logits[b, pos])
            terms.append(sum(math.exp(logp[v]) * (logp[v] - logq[v]) for v in range(len(logp))))
    return float(np.mean(terms))


@pytest.fixture
def logits_pair():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(BATCH, SEQ, D_VOCAB, generator=g)
    ref_logits = torch.randn(BATCH, SEQ, D_VOCAB, generator=g)
    return logits, ref_logits


# ---------------------------------------------------------------------------- KL and entropy


def test_kl_penalty_is_coef_times_mean_full_vocab_kl_at_generated_positions(logits_pair):
    logits, ref_logits = logits_pair
    expected = 2.5 * reference_kl(logits.numpy(), ref_logits.numpy(), GEN_LEN)
    got = calc_kl_penalty(logits, ref_logits, kl_coef=2.5, gen_len=GEN_LEN)
    assert got.shape == ()
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_kl_penalty_accepts_logits_already_cut_to_generated_positions(logits_pair):
    logits, ref_logits = logits_pair
    full = calc_kl_penalty(logits, ref_logits, kl_coef=1.0, gen_len=GEN_LEN)
    cut = slice(-GEN_LEN - 1, -1)
    sliced = calc_kl_penalty(logits[:, cut], ref_logits[:, cut], kl_coef=1.0, gen_len=GEN_LEN)
    torch.testing.assert_close(full, sliced)


def test_kl_penalty_is_zero_for_identical_policies(logits_pair):
    logits, _ = logits_pair
    assert calc_kl_penalty(logits, logits.clone(), kl_coef=2.5, gen_len=GEN_LEN).item() == 0.0


def test_kl_penalty_is_finite_and_correct_for_extreme_logits(logits_pair):
    logits, ref_logits = (x * 100 for x in logits_pair)
    got = calc_kl_penalty(logits, ref_logits, kl_coef=1.0, gen_len=GEN_LEN)
    assert torch.isfinite(got)
    expected = reference_kl(logits.numpy(), ref_logits.numpy(), GEN_LEN)
    assert got.item() == pytest.approx(expected, rel=1e-4)


def test_kl_penalty_gradient_is_finite_for_extreme_logits(logits_pair):
    logits, ref_logits = (x * 100 for x in logits_pair)
    logits.requires_grad_(True)
    calc_kl_penalty(logits, ref_logits, kl_coef=1.0, gen_len=GEN_LEN).backward()
    assert torch.isfinite(logits.grad).all()


def test_entropy_bonus_is_coef_times_mean_entropy_at_generated_positions(logits_pair):
    logits, _ = logits_pair
    entropies = []
    for b in range(BATCH):
        for pos in range(PREFIX_LEN - 1, SEQ - 1):
            logp = np_log_softmax(logits[b, pos].numpy())
            entropies.append(-(np.exp(logp) * logp).sum())
    got = calc_entropy_bonus(logits, ent_coef=0.01, gen_len=GEN_LEN)
    assert got.item() == pytest.approx(0.01 * np.mean(entropies), rel=1e-5)


def test_entropy_of_uniform_policy_is_log_vocab_and_finite_for_extreme_logits(logits_pair):
    uniform = torch.zeros(BATCH, SEQ, D_VOCAB)
    assert calc_entropy_bonus(uniform, 1.0, GEN_LEN).item() == pytest.approx(math.log(D_VOCAB))
    extreme = logits_pair[0] * 100
    assert torch.isfinite(calc_entropy_bonus(extreme, 1.0, GEN_LEN))


# ---------------------------------------------------------------------------- value loss


def test_value_function_loss_is_half_vf_coef_mse_at_generated_positions():
    values = torch.tensor([[9.0, 9.0, 1.0, 2.0, 3.0, 9.0], [9.0, 9.0, 0.0, 0.0, 0.0, 9.0]])
    returns = torch.tensor([[1.0, 2.0, 5.0], [1.0, -1.0, 0.0]])
    # generated positions are columns 2..4 (gen_len 3); squared errors: 0,0,4 and 1,1,0
    expected = 0.5 * 0.15 * (4 + 1 + 1) / 6
    got = calc_value_function_loss(values, returns, vf_coef=0.15, gen_len=3)
    assert got.item() == pytest.approx(expected)
    cut = calc_value_function_loss(values[:, 2:5], returns, vf_coef=0.15, gen_len=3)
    assert cut.item() == pytest.approx(expected)


# ---------------------------------------------------------------------------- clipped surrogate


def reference_clipped_surrogate(logprobs, mb_logprobs, advantages, clip_coef, eps=1e-8):
    adv = np.asarray(advantages, dtype=np.float64)
    adv = (adv - adv.mean()) / (adv.std(ddof=1) + eps)
    total, n = 0.0, 0
    for i in range(adv.shape[0]):
        for j in range(adv.shape[1]):
            ratio = math.exp(logprobs[i][j] - mb_logprobs[i][j])
            clipped_ratio = min(max(ratio, 1 - clip_coef), 1 + clip_coef)
            total += min(ratio * adv[i, j], clipped_ratio * adv[i, j])
            n += 1
    return total / n


@pytest.fixture
def surrogate_inputs():
    """Ratios exp(logprobs - mb_logprobs) of 2.0 / 0.5 / 1.05 / 1.0 with advantages chosen so
    that the upper clip (ratio 2, positive advantage) and the lower clip (ratio 0.5, negative
    advantage) are both active, plus unclipped entries."""
    mb_logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -1.0, -3.0]])
    ratios = torch.tensor([[2.0, 0.5, 1.05], [0.5, 2.0, 1.0]])
    logprobs = mb_logprobs + ratios.log()
    advantages = torch.tensor([[3.0, -2.0, 1.0], [1.0, -3.0, 0.5]])
    return logprobs, mb_logprobs, advantages


def test_clipped_surrogate_clips_on_both_sides(surrogate_inputs):
    logprobs, mb_logprobs, advantages = surrogate_inputs
    clip_coef = 0.2
    normed = (advantages - advantages.mean()) / advantages.std()
    ratios = (logprobs - mb_logprobs).exp()
    # the construction really uses both clip boundaries
    assert ((ratios > 1 + clip_coef) & (normed > 0)).any()
    assert ((ratios < 1 - clip_coef) & (normed < 0)).any()

    expected = reference_clipped_surrogate(
        logprobs.tolist(), mb_logprobs.tolist(), advantages.numpy(), clip_coef
    )
    got = calc_clipped_surrogate_objective(logprobs, mb_logprobs, advantages, clip_coef, gen_len=3)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    unclipped = (ratios * normed).mean().item()
    assert got.item() != pytest.approx(unclipped, rel=1e-3)


def test_clipped_surrogate_normalises_advantages_per_minibatch(surrogate_inputs):
    logprobs, mb_logprobs, advantages = surrogate_inputs
    base = calc_clipped_surrogate_objective(logprobs, mb_logprobs, advantages, 0.2, gen_len=3)
    shifted = calc_clipped_surrogate_objective(
        logprobs, mb_logprobs, 7.0 * advantages - 4.0, 0.2, gen_len=3
    )
    assert shifted.item() == pytest.approx(base.item(), rel=1e-5)


def test_clipped_surrogate_at_ratio_one_is_zero():
    logprobs = torch.tensor([[-1.0, -2.0], [-0.3, -0.7]])
    advantages = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    got = calc_clipped_surrogate_objective(logprobs, logprobs.clone(), advantages, 0.2, gen_len=2)
    assert got.item() == pytest.approx(0.0, abs=1e-7)


def test_clipped_surrogate_gradient_vanishes_where_clipped():
    mb_logprobs = torch.zeros(1, 4)
    ratios = torch.tensor([[2.0, 0.5, 1.0, 1.0]])
    advantages = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    logprobs = (mb_logprobs + ratios.log()).requires_grad_(True)
    calc_clipped_surrogate_objective(logprobs, mb_logprobs, advantages, 0.2, gen_len=4).backward()
    assert logprobs.grad[0, 0] == 0 and logprobs.grad[0, 1] == 0
    assert logprobs.grad[0, 2] > 0 and logprobs.grad[0, 3] < 0


# ---------------------------------------------------------------------------- sampling


class RecordingModel(HookedTransformerWithValueHead):
    """Records the keyword arguments of each ``generate`` call (as a LoRA subclass would hook it)."""

    def generate(self, *args, **kwargs):
        self.generate_calls = getattr(self, "generate_calls", []) + [kwargs]
        return super().generate(*args, **kwargs)


def test_get_samples_uses_the_models_own_generate():
    model = RecordingModel.from_pretrained("tiny-llama", device="cpu")
    prompt_ids = model.to_tokens("This is", prepend_bos=True)[0]
    ids, strings = get_samples(
        model,
        "This is",
        batch_size=5,
        gen_len=6,
        temperature=0.8,
        top_k=7,
        prepend_bos=True,
        use_past_kv_cache=False,
    )
    assert ids.shape == (5, len(prompt_ids) + 6)
    assert (ids[:, : len(prompt_ids)] == prompt_ids).all()
    assert strings == model.to_string(ids) and len(strings) == 5
    assert not ids.is_inference()  # can be fed to a forward pass that builds a graph
    (call,) = model.generate_calls
    assert call["max_new_tokens"] == 6 and call["temperature"] == 0.8 and call["top_k"] == 7
    assert call["stop_at_eos"] is False and call["verbose"] is False
    assert call["use_past_kv_cache"] is False  # extra keyword arguments reach generate


# ---------------------------------------------------------------------------- advantages, logprobs


def test_compute_advantages_is_one_step_td_residual_with_terminal_reward():
    g = torch.Generator().manual_seed(1)
    values = torch.randn(BATCH, SEQ, generator=g)
    rewards = torch.tensor([1.0, -2.0, 0.5])
    expected = torch.zeros(BATCH, GEN_LEN)
    for b in range(BATCH):
        for t in range(GEN_LEN):
            state = PREFIX_LEN - 1 + t  # position whose logits predict generated token t
            target = rewards[b] if t == GEN_LEN - 1 else values[b, state + 1]
            expected[b, t] = target - values[b, state]
    got = compute_advantages(values, rewards, PREFIX_LEN)
    assert got.shape == (BATCH, GEN_LEN)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("prefix_len", [None, 3])
def test_get_logprobs_picks_log_softmax_of_next_token(prefix_len):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(BATCH, SEQ, D_VOCAB, generator=g)
    tokens = torch.randint(0, D_VOCAB, (BATCH, SEQ), generator=g)
    start = 0 if prefix_len is None else prefix_len - 1
    expected = [
        [np_log_softmax(logits[b, i].numpy())[tokens[b, i + 1]] for i in range(start, SEQ - 1)]
        for b in range(BATCH)
    ]
    got = get_logprobs(logits, tokens, prefix_len)
    assert got.shape == (BATCH, SEQ - 1 if prefix_len is None else SEQ - prefix_len)
    np.testing.assert_allclose(got.numpy(), np.array(expected), rtol=1e-5)


# ---------------------------------------------------------------------------- rewards


def test_char_count_reward_counts_the_character():
    samples = ["a.b.c.", "no dots", "..", "a"]
    torch.testing.assert_close(reward_fn_char_count(samples), torch.tensor([3.0, 0.0, 2.0, 0.0]))
    torch.testing.assert_close(
        reward_fn_char_count(samples, char="a"), torch.tensor([1.0, 0, 0, 1])
    )
    assert REWARDS["char_count"] is reward_fn_char_count


def test_normalize_reward_gives_mean_zero_std_one():
    rewards = torch.tensor([1.0, 4.0, 0.0, 3.0, 7.0])
    normed = normalize_reward(rewards)
    arr = rewards.numpy().astype(np.float64)
    expected = (arr - arr.mean()) / (arr.std(ddof=1) + 1e-5)
    np.testing.assert_allclose(normed.numpy(), expected, rtol=1e-5)
    assert normed.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert normed.std().item() == pytest.approx(1.0, rel=1e-4)


@pytest.mark.parametrize("rewards", [torch.full((6,), 2.0), torch.tensor([5.0])])
def test_normalize_reward_of_equal_rewards_is_zeros_not_nan(rewards):
    torch.testing.assert_close(normalize_reward(rewards), torch.zeros_like(rewards))


# ---------------------------------------------------------------------------- replay memory


def make_memory(batch_size=8, num_minibatches=2, batches_per_learning_phase=3, gen_len=2):
    args = RLHFArgs(
        base_model="tiny-llama",
        total_phases=2,
        warmup_steps=0,
        batch_size=batch_size,
        num_minibatches=num_minibatches,
        batches_per_learning_phase=batches_per_learning_phase,
        gen_len=gen_len,
    )
    seq = 3 + gen_len
    sample_ids = torch.arange(batch_size)[:, None].repeat(1, seq)  # row i is all i
    values = torch.randn(batch_size, seq)
    advantages = torch.randn(batch_size, gen_len)
    memory = ReplayMemory(
        args,
        sample_ids=sample_ids,
        logprobs=torch.randn(batch_size, gen_len),
        advantages=advantages,
        values=values,
        ref_logits=_full_ref_logits(batch_size, seq),
    )
    return args, memory


def _full_ref_logits(batch_size: int, seq: int) -> torch.Tensor:
    """ref_logits[b, s, v] = 100 b + 10 s + v: each entry names its place."""
    b, s, v = torch.meshgrid(
        torch.arange(batch_size), torch.arange(seq), torch.arange(5), indexing="ij"
    )
    return (100 * b + 10 * s + v).float()


def test_replay_memory_serves_each_sample_once_per_pass():
    args, memory = make_memory()
    minibatches = memory.get_minibatches()
    assert len(minibatches) == args.num_minibatches * args.batches_per_learning_phase
    seen = [mb.sample_ids[:, 0].tolist() for mb in minibatches]
    for p in range(args.batches_per_learning_phase):
        one_pass = sum(seen[p * args.num_minibatches : (p + 1) * args.num_minibatches], [])
        assert sorted(one_pass) == list(range(args.batch_size))
    counts = np.bincount(sum(seen, []), minlength=args.batch_size)
    assert (counts == args.batches_per_learning_phase).all()
    # a sequence like a list: the same minibatch each time it is read, slices, negative indices
    torch.testing.assert_close(
        minibatches[-1].sample_ids, minibatches[len(minibatches) - 1].sample_ids
    )
    assert [mb.sample_ids[:, 0].tolist() for mb in minibatches[1:3]] == seen[1:3]
    with pytest.raises(IndexError):
        minibatches[len(minibatches)]


def test_replay_minibatch_shapes_and_returns():
    args, memory = make_memory(batch_size=6, num_minibatches=3, batches_per_learning_phase=1)
    for mb in memory.get_minibatches():
        assert mb.sample_ids.shape == (2, 3 + args.gen_len)
        assert mb.logprobs.shape == mb.advantages.shape == mb.returns.shape == (2, args.gen_len)
        assert mb.ref_logits.shape == (2, args.gen_len, 5)  # only the generated positions
        rows = mb.sample_ids[:, 0]
        # returns = advantages + values at the positions predicting the generated tokens
        expected = memory.advantages[rows] + memory.values[rows][:, -args.gen_len - 1 : -1]
        torch.testing.assert_close(mb.returns, expected)
        torch.testing.assert_close(mb.logprobs, memory.logprobs[rows])
        torch.testing.assert_close(
            mb.ref_logits, _full_ref_logits(6, 3 + args.gen_len)[rows][:, -args.gen_len - 1 : -1]
        )


# ---------------------------------------------------------------------------- optimizer, schedule


@pytest.fixture(scope="module")
def tiny_model():
    return HookedTransformerWithValueHead.from_pretrained("tiny-llama", device="cpu")


def test_optimizer_groups_base_and_value_head_params(tiny_model):
    optimizer = get_optimizer(tiny_model, base_lr=1e-5, head_lr=3e-4)
    assert isinstance(optimizer, torch.optim.AdamW)
    base_group, head_group = optimizer.param_groups
    assert base_group["lr"] == 1e-5 and head_group["lr"] == 3e-4
    assert base_group["maximize"] and head_group["maximize"]
    head_ids = {id(p) for p in tiny_model.value_head.parameters()}
    assert {id(p) for p in head_group["params"]} == head_ids
    assert not head_ids & {id(p) for p in base_group["params"]}
    all_ids = {id(p) for p in tiny_model.parameters()}
    assert {id(p) for p in base_group["params"]} == all_ids - head_ids


def test_optimizer_step_increases_the_objective():
    model = HookedTransformerWithValueHead.from_pretrained("tiny-pythia", device="cpu")
    optimizer = get_optimizer(model, base_lr=1e-3, head_lr=1e-3)
    bias = model.value_head[-1].bias
    before = bias.item()
    bias.sum().backward()  # objective = the output bias: maximising it raises it
    optimizer.step()
    assert bias.item() > before


def test_scheduler_warms_up_then_decays_to_final_scale_at_last_phase(tiny_model):
    args = RLHFArgs(
        base_model="tiny-llama",
        total_phases=10,
        warmup_steps=4,
        final_scale=0.1,
        base_lr=1.0,
        head_lr=2.0,
    )
    optimizer, scheduler = get_optimizer_and_scheduler(args, tiny_model)
    base_lrs, head_lrs = [], []
    for _ in range(args.total_phases):
        base_lrs.append(optimizer.param_groups[0]["lr"])
        head_lrs.append(optimizer.param_groups[1]["lr"])
        optimizer.step()  # no gradients: changes nothing, keeps the call order torch expects
        scheduler.step()  # one step per phase
    # warm-up (p + 1) / 5 over 4 phases, 1.0 at phase 4, then linear to 0.1 at phase 9
    expected = [0.2, 0.4, 0.6, 0.8, 1.0, 0.82, 0.64, 0.46, 0.28, 0.1]
    np.testing.assert_allclose(base_lrs, expected, rtol=1e-6)
    np.testing.assert_allclose(head_lrs, 2 * np.array(expected), rtol=1e-6)
    assert all(lr > 0 for lr in base_lrs)
