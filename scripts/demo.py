"""Load the embedded SmolLM2-135M and print a greedy continuation (no network needed).

.venv/bin/python scripts/demo.py ["your prompt"]
"""

import sys
import time

from lora_rlhf.models import load_model


def main() -> None:
    prompt = sys.argv[1] if len(sys.argv) > 1 else "The capital of France is"
    start = time.monotonic()
    model = load_model("smollm2-135m", device="cpu")
    print(f"loaded smollm2-135m in {time.monotonic() - start:.1f} s")
    text = model.generate(prompt, max_new_tokens=12, do_sample=False, verbose=False)
    print(text)


if __name__ == "__main__":
    main()
