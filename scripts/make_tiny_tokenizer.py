"""Regenerate the small byte-level BPE tokenizer used by the tiny test models.

    python scripts/make_tiny_tokenizer.py

It is trained on a few paragraphs of plain English so that common words are
single tokens, and saved next to the package so that TransformerLens can load
it from a folder (it re-loads tokenizers by `name_or_path`).
"""

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

CORPUS = """
This is a small corpus for a tiny tokenizer. It is used by the tiny test models of the
lora_rlhf course, which teach low-rank adaptors inside reinforcement learning from human
feedback. The capital of France is Paris. The quick brown fox jumps over the lazy dog.
A model writes a sentence. Then another sentence. Short sentences end with a full stop.
Questions end with a question mark? Exclamations end with an exclamation mark!
One, two, three, four, five, six, seven, eight, nine, ten. Hello world. Good morning.
The policy generates text, the reward model scores it, and the value head predicts it.
"""

OUT = Path(__file__).resolve().parents[1] / "src" / "lora_rlhf" / "assets" / "tiny_tokenizer"


def main() -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([CORPUS] * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    OUT.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(OUT)
    print(f"saved {len(fast)} tokens to {OUT}")


if __name__ == "__main__":
    main()
