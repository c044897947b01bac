"""The untrained model's reward on the default run's task, from many samples: the level that a
run's first phase (one rollout of 16 or 32 samples) estimates.

    python -m benchmarks.base_rate --samples 512 --threads 1

It samples the command's own prompt, length, temperature and top-k from the embedded model (no
adaptors: what a run's adaptors start as, B = 0) in batches of 16, scores them with the command's
reward, and prints one JSON line: the mean, its standard error, and the lowest and highest mean
of its rollout-sized runs of samples (the command's --batch-size, 16: how far one first phase can
land from the mean).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--model", default=None, help="default: the command's (the embedded model)")
    opts = p.parse_args(argv)

    import torch

    from lora_rlhf.cli.settings import DEFAULTS
    from lora_rlhf.models import load_model
    from lora_rlhf.rlhf.ppo import get_samples
    from lora_rlhf.rlhf.rewards import get_reward_fn

    torch.set_num_threads(opts.threads)
    torch.manual_seed(opts.seed)
    model = load_model(opts.model or DEFAULTS["model"], device="cpu")
    reward_fn = get_reward_fn(DEFAULTS["reward"])
    rewards: list[float] = []
    while len(rewards) < opts.samples:
        _, texts = get_samples(
            model, DEFAULTS["prefix"], opts.batch, DEFAULTS["gen_len"], DEFAULTS["temperature"],
            DEFAULTS["top_k"], prepend_bos=True,
        )  # fmt: skip
        rewards += [float(r) for r in reward_fn(texts)]
    rollout = DEFAULTS["batch_size"]
    batches = [
        statistics.fmean(rewards[i : i + rollout])
        for i in range(0, len(rewards) - rollout + 1, rollout)
    ]
    result = {
        "task": f"{DEFAULTS['reward']} {DEFAULTS['char']!r} after {DEFAULTS['prefix']!r}",
        "samples": len(rewards),
        "mean": round(statistics.fmean(rewards), 4),
        "standard_error": round(statistics.stdev(rewards) / math.sqrt(len(rewards)), 4),
        f"{rollout}_sample_means": {"min": min(batches), "max": max(batches)},
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
