"""Write the 20-submission class that docs/grading.md's timings use:

    .venv/bin/python tests/grading_fixtures/make_class.py /tmp/class20 [--no-hang]
    time .venv/bin/lora-rlhf grade-class /tmp/class20
    time .venv/bin/lora-rlhf grade /tmp/class20/s_hang_in_hook.py

6 copies of the course-shaped submission, its 4 correct variants, the solution, its 5 backward
mutants, 2 untouched stubs, 1 tampering, and 1 that hangs inside a hook (with --no-hang: a
seventh correct copy instead).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent
sys.path.insert(0, str(TESTS))

from backward_mutants import COURSE_SUBMISSION, MUTANTS, VARIANTS  # noqa: E402


def hang_in_hook(source: str) -> str:
    source = source.replace("import math\n", "import math\nimport time\n", 1)
    head = "    def lora_hook_qkv(self, qkv: Tensor, hook: HookPoint) -> Tensor:\n"
    return source.replace(head, head + "        while True:\n            time.sleep(0.1)\n")


def submissions(hang: bool = True) -> dict[str, str]:
    course = COURSE_SUBMISSION.read_text()
    stubs = (ROOT / "exercises" / "section2_lora.py").read_text()
    subs = {f"s{i:02d}_correct": course for i in range(6)}
    subs.update({f"s_variant_{v.name}": v.apply() for v in VARIANTS})
    subs.update({f"s_mutant_{m.name}": m.apply() for m in MUTANTS})
    subs.update(s_stubs_a=stubs, s_stubs_b=stubs)
    subs["s_solution"] = (ROOT / "solutions" / "section2_lora.py").read_text()
    anchor = "FwdHook = tuple[str, Callable]\n"
    subs["s_tamper"] = course.replace(anchor, anchor + "torch.allclose = lambda *a, **k: True\n")
    if hang:
        subs["s_hang_in_hook"] = hang_in_hook(course)
    else:
        subs["s06_correct"] = course
    return subs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--no-hang", action="store_true")
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    for name, source in submissions(hang=not args.no_hang).items():
        (args.dir / f"{name}.py").write_text(source)
    print(f"wrote {len(submissions(not args.no_hang))} submissions to {args.dir}")


if __name__ == "__main__":
    main()
