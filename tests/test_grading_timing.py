"""Per-check time limits: read from a data file beside the module, which `--write` rewrites;
the module never rewrites its own source."""

import json

from lora_rlhf.grading import timing


def test_reference_seconds_are_the_data_files_and_name_the_command_that_measures_them():
    data = json.loads(timing.SECONDS_FILE.read_text())
    assert timing.SECONDS_FILE.suffix == ".json"
    assert data["command"] == "python -m lora_rlhf.grading.timing --write"
    assert timing.REFERENCE_SECONDS == data["seconds"] and data["seconds"]
    assert all(0 < s < timing.UNKNOWN for s in data["seconds"].values())


def test_write_stores_the_times_in_the_data_file_not_the_module(tmp_path):
    source = timing.__file__
    before = open(source).read()
    path = tmp_path / "reference_seconds.json"
    timing.write({"a_check": 0.012, "another": 0.5}, path)
    assert json.loads(path.read_text())["seconds"] == {"a_check": 0.012, "another": 0.5}
    assert open(source).read() == before
    assert timing.write.__defaults__ == (timing.SECONDS_FILE,)


def test_limit_is_factor_times_the_reference_with_a_floor_and_a_default():
    seconds = dict(timing.REFERENCE_SECONDS)
    fast, slow = min(seconds, key=seconds.get), max(seconds, key=seconds.get)
    assert timing.check_limit(fast) == max(timing.FLOOR, timing.FACTOR * seconds[fast])
    assert timing.check_limit(slow) == max(timing.FLOOR, timing.FACTOR * seconds[slow])
    assert timing.check_limit("no_such_check") == timing.UNKNOWN
