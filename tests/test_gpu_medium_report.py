"""bench/gpu_medium_report.py on a hand-made log: what the GPU smoke's JSON says."""
import dataclasses
import json

from bench.gpu_medium_report import main, summarize
from config import parse_config

SEP = "=" * 100


def write_log(path, finished=True):
    cfg = parse_config(["--preset", "medium-tiny", "--num-iterations", "4", "--extension-steps", "1"])
    lines = ["# file: train_gpt.py", "print('hi')", SEP, "Running PyTorch 2.x",
             "config: " + json.dumps(dataclasses.asdict(cfg)), SEP,
             "warm-up step 0: 40.5s", "warm-up: 2 untimed steps in 61.2s (state restored)",
             "step:0/4 val_loss:10.8000 train_time:0ms step_avg:nanms",
             "step:1/4 train_loss:10.5000 train_time:300ms step_avg:300.00ms",
             "step:2/4 train_loss:9.5000 train_time:500ms step_avg:250.00ms",
             "step:3/4 train_loss:9.0000 train_time:750ms step_avg:250.00ms"]
    if finished:
        lines += ["step:4/4 train_loss:8.5000 train_time:1010ms step_avg:252.50ms",
                  "step:4/4 val_loss:8.7000 train_time:1010ms step_avg:252.50ms",
                  "peak memory allocated: 1234 MiB reserved: 2345 MiB"]
    path.write_text("\n".join(lines) + "\n")


def test_summary_of_a_finished_run(tmp_path):
    write_log(tmp_path / "smoke.txt")
    s = summarize(str(tmp_path / "smoke.txt"), exit_code=0, command="cmd", skip=1)
    assert s["completed"] and s["steps_done"] == 4 and s["exit_code"] == 0
    assert s["train_loss"] == {"1": 10.5, "2": 9.5, "3": 9.0, "4": 8.5} and s["val_loss"] == {"0": 10.8, "4": 8.7}
    assert s["step_ms"] == [300.0, 200.0, 250.0, 260.0] and s["step_ms_median"] == 250.0
    assert s["warmup"] == {"steps": 2, "seconds": 61.2}
    assert (s["peak_memory_allocated_mib"], s["peak_memory_reserved_mib"]) == (1234, 2345)
    assert s["torch"] and "device" in s and s["untie_step"] == 1 and s["transition_steps"][0] == 0


def test_partial_and_missing_logs_still_write_a_summary(tmp_path):
    write_log(tmp_path / "smoke.txt", finished=False)
    assert main(["--log", str(tmp_path / "smoke.txt"), "--exit-code", "124", "--out", str(tmp_path / "s.json")]) == 1
    s = json.loads((tmp_path / "s.json").read_text())
    assert not s["completed"] and s["steps_done"] == 3 and s["peak_memory_allocated_mib"] is None
    assert main(["--log", str(tmp_path / "none.txt"), "--exit-code", "1", "--out", str(tmp_path / "n.json")]) == 1
    assert json.loads((tmp_path / "n.json").read_text())["error"] == "no log written"
