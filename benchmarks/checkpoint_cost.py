"""What one checkpoint of `lora-rlhf train` costs on the default run: its size and the seconds to
write it (files written, flushed to the disk, renamed), without training.

    python benchmarks/checkpoint_cost.py --writes 5 --threads 1

It builds the default run's trainer (the embedded model, the command's defaults) and gives the
optimizer the state it holds after any phase (AdamW's two moments per trained tensor, zeros: the
size is what matters), and a 30-phase history, then writes the checkpoint ``--writes`` times into a
temporary run folder. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--writes", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--model", default=None, help="default: the command's (the embedded model)")
    opts = p.parse_args(argv)

    import torch

    from lora_rlhf.cli.command import build_parser
    from lora_rlhf.cli.train import RunRecorder, prepare

    torch.set_num_threads(opts.threads)
    with tempfile.TemporaryDirectory() as tmp:
        command = ["train", "--out", str(Path(tmp) / "run"), "--no-progress"]
        if opts.model:
            command += ["--model", opts.model]
        plan = prepare(build_parser().parse_args(command))
        trainer = plan.trainer_class(plan.rlhf_args)
        for group in trainer.optimizer.param_groups:
            for param in group["params"]:
                trainer.optimizer.state[param] = {
                    "step": torch.tensor(1.0),
                    "exp_avg": torch.zeros_like(param),
                    "exp_avg_sq": torch.zeros_like(param),
                }
        metrics = {"phase": 0, "reward_mean": 0.5, "reward_std": 0.5, "kl": 0.5, "lr": 1e-3}
        trainer.history = [dict(metrics, phase=n) for n in range(30)]
        trainer.phase = 30
        recorder = RunRecorder(plan)
        recorder.trainer = trainer
        seconds = []
        for _ in range(opts.writes):
            start = time.perf_counter()
            folder = recorder.write_checkpoint()
            seconds.append(time.perf_counter() - start)
        size = sum(f.stat().st_size for f in folder.iterdir())
        files = {f.name: round(f.stat().st_size / 1e6, 2) for f in sorted(folder.iterdir())}
    result = {
        "model": plan.settings["model"],
        "checkpoint_mb": round(size / 1e6, 1),
        "files_mb": files,
        "seconds": [round(s, 3) for s in seconds],
        "median_seconds": round(statistics.median(seconds), 3),
        "threads": opts.threads,
        "loadavg": os.getloadavg(),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
