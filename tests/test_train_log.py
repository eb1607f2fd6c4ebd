"""The buffered per-step log: the same lines as the per-step writer, read by runlog.py and monitor_runs.py,
every finished step in the log after a crash, and a non-finite loss found at the flush."""
from __future__ import annotations

import json
import math

import pytest
import torch

import monitor_runs
import runlog
from train_gpt import SEPARATOR, RunLog
from train_log import BufferedStepLog, DeviceLosses, train_line

TOTAL = 10
LOSSES = [10.8125, 9.5, 8.25, 7.0625, 6.5, 6.125, 5.75]  # exact in float32
TIMES_MS = [1234.4, 2300.0, 3333.3, 4400.9, 5500.0, 6601.2, 7700.0]


def new_log(tmp_path) -> RunLog:
    """A log with our header (config line), as train_gpt.py writes it before the first step."""
    path = tmp_path / "run-s0.txt"
    path.write_text(f"# file: train_gpt.py\nprint('source')\n{SEPARATOR}\nRunning PyTorch {torch.__version__}\n"
                    f"config: {json.dumps(dict(run_id='run-s0', seed=0))}\n{SEPARATOR}\n"
                    f"step:0/{TOTAL} val_loss:10.9000 train_time:0ms step_avg:nanms\n")
    return RunLog(str(path), master=True)


def per_step_line(step: int, loss: float, now_ms: float) -> str:
    """The line as the loop wrote it when it read every step's loss at once (train_gpt.py before buffering)."""
    step_avg = now_ms / step
    return f"step:{step}/{TOTAL} train_loss:{loss:.4f} train_time:{now_ms:.0f}ms step_avg:{step_avg:.2f}ms"


def test_train_line_is_the_per_step_line():
    assert train_line(3, 10, 4.0625, 12.4) == "step:3/10 train_loss:4.0625 train_time:12ms step_avg:4.13ms"
    for step, (loss, ms) in enumerate(zip(LOSSES, TIMES_MS), start=1):
        assert train_line(step, TOTAL, loss, ms) == per_step_line(step, loss, ms)


def test_buffered_lines_are_byte_identical_and_parse(tmp_path, capsys):
    log = new_log(tmp_path)
    steps = BufferedStepLog(log, TOTAL, "cpu", flush_every=3, print_every=5, first_step=1)
    header = open(log.path).read()
    for step, (loss, ms) in enumerate(zip(LOSSES, TIMES_MS), start=1):
        assert steps.add(step, torch.tensor(loss), ms) is None
        written = open(log.path).read()[len(header):].splitlines()
        assert len(written) == step // 3 * 3  # nothing reaches the file between flushes
    steps.flush()
    expected = [per_step_line(s, loss, ms) for s, (loss, ms) in enumerate(zip(LOSSES, TIMES_MS), start=1)]
    assert open(log.path).read() == header + "".join(line + "\n" for line in expected)
    assert steps.train_losses == dict(enumerate(LOSSES, start=1))
    printed = capsys.readouterr().out.splitlines()  # the first step and every 5th, with an ETA
    assert printed == [expected[0] + " eta:0m11s", expected[4] + " eta:0m05s"]

    parsed = runlog.parse_log(log.path)
    assert parsed.format == "ours" and not parsed.crashed and parsed.total_steps == TOTAL
    assert [(p.step, p.loss) for p in parsed.train] == list(enumerate(LOSSES, start=1))
    assert parsed.train[-1].train_time_ms == 7700 and parsed.step_avg_ms == 1100.0
    (row,) = monitor_runs.collect_runs([str(tmp_path)], 2.92, stall_s=600)
    assert (row.status, row.step, row.total, row.step_avg_ms) == ("running", 7, TOTAL, 1100.0)


def test_a_crash_mid_buffer_leaves_every_finished_step_in_the_log(tmp_path):
    log = new_log(tmp_path)
    with pytest.raises(RuntimeError, match="step 6"):
        with BufferedStepLog(log, TOTAL, "cpu", flush_every=4) as steps:
            for step, (loss, ms) in enumerate(zip(LOSSES[:5], TIMES_MS), start=1):
                steps.add(step, torch.tensor(loss), ms)
            raise RuntimeError("debug crash at step 6")  # step 5 is still in the buffer here
    with open(log.path, "a") as f:  # what train_gpt.main() appends for an exception
        f.write("Traceback (most recent call last):\n  File \"train_gpt.py\"\nRuntimeError: debug crash at step 6\n")
    parsed = runlog.parse_log(log.path)
    assert [p.step for p in parsed.train] == [1, 2, 3, 4, 5] and parsed.crashed
    (row,) = monitor_runs.collect_runs([str(tmp_path)], 2.92, stall_s=600)
    assert (row.status, row.step) == ("crashed", 5) and "debug crash" in row.note


def test_unreadable_losses_on_a_crash_are_reported_not_hidden(tmp_path, monkeypatch):
    log = new_log(tmp_path)
    with pytest.raises(ValueError, match="original"):
        with BufferedStepLog(log, TOTAL, "cpu", flush_every=4) as steps:
            steps.add(1, torch.tensor(3.0), 10.0)
            steps.add(2, torch.tensor(2.0), 20.0)

            def broken_read():
                raise RuntimeError("device lost")
            monkeypatch.setattr(steps.losses, "read", broken_read)
            raise ValueError("original")  # the loop's own exception is the one that propagates
    parsed = runlog.parse_log(log.path)
    assert parsed.error_lines == ["error: the train losses of steps 1-2 could not be read from the device "
                                  "(RuntimeError: device lost)"]


def test_a_non_finite_loss_stops_the_lines_at_the_step_before(tmp_path):
    log = new_log(tmp_path)
    steps = BufferedStepLog(log, TOTAL, "cpu", flush_every=4)
    for step, loss in enumerate([5.0, 4.0, float("nan"), 3.0], start=1):
        found = steps.add(step, torch.tensor(loss), 10.0 * step)
    assert found[0] == 3 and math.isnan(found[1])
    assert [p.step for p in runlog.parse_log(log.path).train] == [1, 2]
    with pytest.raises(FloatingPointError, match="step 6"):  # a normal exit still checks what it flushes
        with BufferedStepLog(log, TOTAL, "cpu", flush_every=4) as tail:
            tail.add(5, torch.tensor(2.0), 50.0)
            tail.add(6, torch.tensor(float("inf")), 60.0)
    assert [p.step for p in runlog.parse_log(log.path).train] == [1, 2, 5]


def test_device_losses_read_in_order_and_refuse_to_overflow():
    losses = DeviceLosses(3, "cpu")
    for value in (1.5, torch.tensor(2.5, dtype=torch.bfloat16), 3.25):
        losses.record(torch.as_tensor(value))
    with pytest.raises(RuntimeError, match="read"):
        losses.record(torch.tensor(4.0))
    assert losses.read() == [1.5, 2.5, 3.25] and losses.read() == []
    with pytest.raises(ValueError, match="capacity"):
        DeviceLosses(0, "cpu")
