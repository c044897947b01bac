"""What several test files share (imported as ``from helpers import ...``; pytest puts tests/ on
the path). Test files never import each other."""

from __future__ import annotations

import contextlib

import einops
import torch
from torch.overrides import TorchFunctionMode

from lora_rlhf.adapters.contract import adaptor_values
from lora_rlhf.lessons.bonus_mlp_lora import TransformerWithValueHeadMlpLora
from lora_rlhf.lessons.section2_lora import TransformerWithValueHeadLora
from lora_rlhf.rlhf.args import RLHFArgs

ALPHA, RANK = 8, 4  # α/r = 2


def make_lora_model(
    name: str,
    device: str = "cpu",
    mlp: bool = False,
    b_std: float = 0.1,
    seed: int = 0,
    dtype: torch.dtype | None = None,
) -> TransformerWithValueHeadLora:
    """A LoRA model whose adaptors all have random non-zero B (so they change the logits)."""
    cls = TransformerWithValueHeadMlpLora if mlp else TransformerWithValueHeadLora
    torch.manual_seed(seed)
    model = cls.from_pretrained(name, lora_alpha=ALPHA, rank=RANK, device=device, dtype=dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in adaptor_values(model):
            for _, B, _ in layer.values():
                B.copy_(torch.randn(B.shape, generator=gen, dtype=B.dtype) * b_std)
    return model


def tokens(model, batch: int = 2, seq: int = 9, seed: int = 3) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, model.cfg.d_vocab, (batch, seq), generator=gen).to(model.cfg.device)


# fp32 noise floor of the embedded model (30 layers, logits up to ~35): the base model itself gives
# logits differing by up to 1.6e-4 when run on a batch or one row at a time, and merged vs hooked
# measured 5e-5 to 4e-4 over random inputs (5e-5 to 1.1e-4 on English text), whatever the size
# of B. So in fp32 the embedded model is compared at its noise floor, and the exactness of the
# merge is shown in float64 below (measured 3e-13); the tiny models stay within 1e-5 in fp32.
SMOLLM2_ATOL = 3e-4


def tiny_args(base_model="tiny-llama", **overrides) -> RLHFArgs:
    settings = dict(
        base_model=base_model,
        total_phases=2,
        warmup_steps=0,
        batch_size=4,
        num_minibatches=2,
        batches_per_learning_phase=1,
        gen_len=4,
        device="cpu",
    )
    return RLHFArgs(**{**settings, **overrides})


# ------------------------------------------------------------- weights passed to F.linear

MLP_WEIGHTS = ("W_in", "W_gate", "W_out")


class LinearWeights(TorchFunctionMode):
    """Records the storage of every weight matrix passed to ``F.linear``."""

    def __init__(self):
        super().__init__()
        self.data_ptrs: set[int] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.linear:
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            self.data_ptrs.add(weight.data_ptr())
        return func(*args, **kwargs)


def linear_weights(model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{name: (parameter, the weight TransformerLens 3.9 computes from it for F.linear)}`` for
    every weight a HookedTransformer's forward passes to ``F.linear`` (grouped-query attention: the
    real K/V weights ``_W_K``/``_W_V``, not the ``W_K``/``W_V`` properties that repeat them)."""

    def qkv(W):  # utilities/attention.py, simple_attn_linear
        return einops.rearrange(W, "head_index d_model d_head -> (head_index d_head) d_model")

    def out(W):  # components/abstract_attention.py, AbstractAttention.forward
        return einops.rearrange(W, "head_index d_head d_model -> d_model (head_index d_head)")

    weights = {"unembed.W_U": (model.W_U, model.W_U.T.contiguous())}
    for i, block in enumerate(model.blocks):
        attn, mlp = block.attn, block.mlp
        grouped = getattr(attn, "_W_K", None) is not None
        kv = ("_W_K", "_W_V") if grouped else ("W_K", "W_V")
        for name in ("W_Q", *kv):
            W = getattr(attn, name)
            weights[f"blocks.{i}.attn.{name}"] = (W, qkv(W))
        weights[f"blocks.{i}.attn.W_O"] = (attn.W_O, out(attn.W_O).contiguous())
        for name in MLP_WEIGHTS:
            W = getattr(mlp, name)
            weights[f"blocks.{i}.mlp.{name}"] = (W, W.T.contiguous())
    return weights


def assert_forward_copies_no_weights(model) -> None:
    """What TransformerLens computes from each weight for F.linear is a view of the weight's
    storage, and F.linear gets exactly these storages during a forward."""
    weights = linear_weights(model)
    assert len(weights) == 1 + 7 * model.cfg.n_layers
    for name, (W, passed) in weights.items():
        assert passed.is_contiguous() and passed.data_ptr() == W.data_ptr(), name
    mode = LinearWeights()
    with torch.no_grad(), mode:
        model(torch.tensor([[1, 2]], device=model.cfg.device))
    copied = [name for name, (W, _) in weights.items() if W.data_ptr() not in mode.data_ptrs]
    assert not copied, f"F.linear got copies of {copied[:3]}"
    assert mode.data_ptrs == {W.data_ptr() for W, _ in weights.values()}


# ------------------------------------------------------------- the train command's two figures
# Drawing a run's reward curve and adaptor map costs ~0.9 CPU-s of matplotlib, more than a tiny
# run's training; the suite runs `train` ~60 times for its metrics, adaptors, checkpoints and
# resumes. So the suite's workers replace the two figures by a stand-in (conftest.py): it reads
# what the real figure reads (the history's keys; the adaptor map of the trained model) and writes
# a 1×1 PNG at the same path. The tests about the figures themselves draw them for real, inside
# ``with real_figures():`` (test_train_cli's finished run, test_train_outputs', test_adaptor_map's).


def _png_1x1() -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)  # 1×1, 8-bit grey
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00\x00"))
        + chunk(b"IEND", b"")
    )


PNG_1X1 = _png_1x1()
_REAL_FIGURES: list = []  # RunRecorder's own (save_plot, save_adaptor_map), once replaced


def quick_figures() -> None:
    """Replace the train command's figures (RunRecorder.save_plot, .save_adaptor_map)."""
    from lora_rlhf.adapters.adaptor_map import MAP_FILE, adaptor_map
    from lora_rlhf.cli.recorder import CURVE_FILE, RunRecorder

    if _REAL_FIGURES:
        return
    _REAL_FIGURES.extend((RunRecorder.save_plot, RunRecorder.save_adaptor_map))

    def save_plot(self):
        history = self.trainer.history
        if not history:
            return None
        for m in history:  # what plot_reward_curve needs
            if not {"phase", "reward_mean"} <= m.keys():
                raise KeyError(f"a phase's metrics lack phase or reward_mean: {sorted(m)}")
        path = self.out / CURVE_FILE
        path.write_bytes(PNG_1X1)
        return path

    def save_adaptor_map(self):
        adaptor_map(self.trainer.model)  # what plot_adaptor_map draws
        (self.out / MAP_FILE).write_bytes(PNG_1X1)

    RunRecorder.save_plot, RunRecorder.save_adaptor_map = save_plot, save_adaptor_map


@contextlib.contextmanager
def real_figures():
    """Within: `train` draws its figures with matplotlib, as outside the test suite."""
    from lora_rlhf.cli.recorder import RunRecorder

    quick = RunRecorder.save_plot, RunRecorder.save_adaptor_map
    if _REAL_FIGURES:
        RunRecorder.save_plot, RunRecorder.save_adaptor_map = _REAL_FIGURES
    try:
        yield
    finally:
        RunRecorder.save_plot, RunRecorder.save_adaptor_map = quick


def forked_child(log: str | None) -> None:
    """First thing in a process forked from the fork server (which did not run conftest.py): its
    output into the file ``log`` (if given), and the suite's stand-in figures."""
    import os

    if log is not None:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
    quick_figures()


def _python_m(module: str, args: list[str], log: str) -> None:
    """In a child of the fork server: what ``python -m MODULE ARGS > LOG 2>&1`` runs."""
    import runpy
    import sys

    forked_child(log)
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


class ForkedPython:
    """A stand-in for ``subprocess.Popen([sys.executable, "-m", MODULE, *ARGS], stdout=LOG)``:
    the same module run as ``__main__``, in a process of its own, forked from the grader's fork
    server, which has imported torch and TransformerLens once (a fresh interpreter spends ~7 s of
    CPU importing them). Offers what a caller of Popen polls: poll, returncode, terminate."""

    def __init__(self, argv: list[str], stdout, stderr=None):
        from lora_rlhf.grading import sandbox

        if argv[1:2] != ["-m"]:
            raise ValueError(f"only `python -m MODULE …` commands: {argv}")
        sandbox.start_server()
        self.process = sandbox.context().Process(
            target=_python_m, args=(argv[2], list(argv[3:]), stdout.name)
        )
        stdout.close()
        self.process.start()

    @property
    def returncode(self) -> int | None:
        return self.process.exitcode

    def poll(self) -> int | None:
        return None if self.process.is_alive() else self.process.exitcode

    def terminate(self) -> None:
        self.process.terminate()
