"""Experiment tools: runlog parsing, launch_sweep (spec expansion, GPU packing, an end-to-end CPU sweep),
monitor_runs (status of every kind of run), plot_loss (pixels of the curves) and make_record (t-test)."""
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from scipy import stats

import launch_sweep
import make_record
import monitor_runs
import plot_loss
import runlog

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
OFFICIAL = os.path.join(FIXTURES, "official_record.txt")
CRASHED = os.path.join(FIXTURES, "ours_crashed.txt")
SEP = "=" * 100


def write_log(path, *, fmt="ours", total=20, val_every=5, final_loss=3.0, step_ms=100.0, decimals=4,
              upto=None, crash=False, tag=None, seed=0, tail="", newline_at_end=True):
    """Write a synthetic log in our format or the official one. Val loss follows
    final_loss + 8 * (1 - step/total)^2, train loss the same + 0.1; `upto` stops the run early (still running)."""
    upto = total if upto is None else upto
    tag = tag or os.path.splitext(os.path.basename(path))[0]
    lines = ["# file: train_gpt.py" if fmt == "ours" else "import torch", "print('hello')", SEP,
             "Running Python 3.11.2", "Running PyTorch 2.13.0+cpu"]
    if fmt == "ours":
        lines.append("config: " + json.dumps({"run_id": tag, "seed": seed, "num_iterations": total, "preset": "x"}))
    lines.append(SEP)

    def loss_at(step):
        return final_loss + 8.0 * (1 - step / total) ** 2

    for step in range(upto + 1):
        time_ms = step * step_ms
        avg = "nan" if step == 0 else f"{step_ms:.2f}"
        if step > 0:
            train = f" train_loss:{loss_at(step) + 0.1:.4f}" if fmt == "ours" else ""
            avg_train = "nan" if (fmt == "official" and step == 1) else avg
            lines.append(f"step:{step}/{total}{train} train_time:{time_ms:.0f}ms step_avg:{avg_train}ms")
        if step % val_every == 0 or step == total:
            lines.append(f"step:{step}/{total} val_loss:{loss_at(step):.{decimals}f} train_time:{time_ms:.0f}ms "
                         f"step_avg:{avg}ms")
    if crash:
        lines += ["error: boom", "Traceback (most recent call last):", '  File "train_gpt.py", line 1',
                  "RuntimeError: boom"]
    text = "\n".join(lines) + "\n" + tail
    if not newline_at_end:
        text = text.rstrip("\n")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return str(path)


# ----------------------------------------------------------------------------------------------- runlog


def test_parse_official_fixture():
    log = runlog.parse_log(OFFICIAL)
    assert log.format == "official" and log.config is None
    assert [(p.step, p.loss) for p in log.val] == [(0, 10.8258), (5, 6.512345), (10, 4.1032), (15, 3.210987),
                                                    (20, 2.918765)]
    assert log.total_steps == 20 and log.finished and not log.crashed and not log.truncated
    assert log.final_val == runlog.ValPoint(20, 2.918765, 2261.0)
    assert math.isnan(log.train[0].step_avg_ms) and log.train[0].loss is None  # step:1 ... step_avg:nanms
    assert log.step_avg_ms == 119.0 and log.peak_memory_allocated_mib == 57397
    assert log.tag == "official_record" and log.seed is None and log.group == "official_record"
    assert any("NVIDIA H100" in line for line in log.header_lines)
    # The docstring in the source part holds a progress line, a traceback line and an error line: ignored.
    assert 1 not in [p.step for p in log.val] and log.error_lines == []


def test_parse_ours_crashed_fixture():
    log = runlog.parse_log(CRASHED)
    assert log.format == "ours" and log.config["optimizer"] == "spectral_ord"
    assert log.tag == "ord-spectral_lr_1-s2" and log.seed == 2 and log.group == "ord-spectral_lr_1"
    assert [(p.step, p.loss) for p in log.val] == [(0, 10.8251), (4, 8.402)]
    assert [p.loss for p in log.train][:4] == [10.8143, 9.9021, 9.1177, 8.5112]
    assert math.isnan(log.train[-1].loss)  # train_loss:nan parses
    assert log.crashed and log.has_traceback and log.error_lines[0].startswith("error: training diverged")
    assert not log.finished and log.last_step == 5 and log.total_steps == 8
    assert log.exception == "RuntimeError: non-finite loss"


def test_parse_generated_both_formats(tmp_path):
    ours = runlog.parse_log(write_log(tmp_path / "a-s3.txt", seed=3, tail="peak memory allocated: 123 MiB "
                                                                           "reserved: 456 MiB\n"))
    official = runlog.parse_log(write_log(tmp_path / "b.txt", fmt="official", decimals=6))
    for log in (ours, official):
        assert log.finished and log.final_val.step == 20 and abs(log.final_val.loss - 3.0) < 1e-9
        assert [p.step for p in log.val] == [0, 5, 10, 15, 20] and len(log.train) == 20
        assert log.step_avg_ms == 100.0 and log.train_time_ms == 2000.0
    assert ours.format == "ours" and official.format == "official"
    assert ours.seed == 3 and ours.group == "a" and ours.train[0].loss == round(3.0 + 8 * 0.95**2 + 0.1, 4)
    assert (ours.peak_memory_allocated_mib, ours.peak_memory_reserved_mib) == (123, 456)
    assert official.val[1].loss == round(3.0 + 8 * 0.75**2, 6)
    crashed = runlog.parse_log(write_log(tmp_path / "c.txt", fmt="official", upto=9, crash=True))
    assert crashed.crashed and crashed.exception == "RuntimeError: boom" and crashed.error_lines == ["error: boom"]
    assert not crashed.finished and crashed.last_step == 9


def test_truncated_empty_and_header_only_logs(tmp_path):
    # A line cut in the middle of a number is ignored (and flagged); a complete last line without "\n" counts.
    for tail in ("step:8/20 val_loss:3.4", "step:8/20 val_loss:3.4000 train_time:80",
                 "step:8/20 train_loss:3.5000 train_time:800ms step_avg:10"):
        cut = runlog.parse_log(write_log(tmp_path / "cut.txt", upto=7, tail=tail))
        assert cut.truncated and cut.last_step == 7 and [p.step for p in cut.val] == [0, 5], tail
    whole = runlog.parse_log(write_log(tmp_path / "whole.txt", newline_at_end=False))
    assert whole.finished and not whole.truncated
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    log = runlog.parse_log(empty)
    assert log.empty and log.val == [] and log.last_step is None and not log.finished and not log.crashed
    header_only = tmp_path / "header.txt"
    header_only.write_text(f"# file: train_gpt.py\nx = 1\n{SEP}\nRunning Python 3.11\nconfig: {{\"run_id\": \"h\"")
    log = runlog.parse_log(header_only)  # config line cut while being written
    assert log.config is None and log.val == [] and log.tag == "header"


def test_find_logs_skips_side_files(tmp_path):
    write_log(tmp_path / "sweep" / "a-s0.txt")
    (tmp_path / "sweep" / "a-s0.console.log").write_text("x")
    (tmp_path / "sweep" / "a-s0.txt.attempt1").write_text("x")
    (tmp_path / "sweep" / "a-s0.status.json").write_text("{}")
    expected = [os.path.normpath(tmp_path / "sweep" / "a-s0.txt")]
    assert runlog.find_logs([str(tmp_path)]) == expected
    assert runlog.find_logs([str(tmp_path / "sweep" / "*")]) == expected
    with pytest.raises(ValueError, match="no log matches"):
        runlog.find_logs([str(tmp_path / "nothing*.txt")])


# ----------------------------------------------------------------------------------------------- launch_sweep


SPEC = {
    "name": "demo",
    "base": {"preset": "cpu-tiny", "num-iterations": 10, "compile": False, "optimizer_args": {"a": 1}},
    "configs": [{"tag": "muon", "optimizer": "muon"}, {"tag": "ord", "optimizer": "spectral_ord",
                                                         "optimizer_args.spectral_lr_mul": 1.0, "gpus_per_run": 2}],
    "grid": {"lr": [0.01, 0.02]},
    "seeds": [0, 1],
}


def test_expand_spec_tags_flags_and_commands(tmp_path):
    sweep = launch_sweep.expand_spec(SPEC, "demo.toml", log_dir=str(tmp_path))
    assert [r.tag for r in sweep.runs] == [f"{c}-lr{lr}-s{s}" for c in ("muon", "ord") for lr in (0.01, 0.02)
                                           for s in (0, 1)]
    assert [r.gpus for r in sweep.runs] == [1] * 4 + [2] * 4
    run = sweep.runs[5]  # ord-lr0.01-s1
    assert run.seed == 1 and run.flags["lr"] == 0.01 and run.flags["optimizer_args"] == {"a": 1, "spectral_lr_mul": 1.0}
    command = launch_sweep.build_command(run, sweep, ["torchrun"])
    assert command[:4] == ["torchrun", "--standalone", "--nproc_per_node=2", sweep.train_script]
    text = " ".join(command)
    assert "--num-iterations 10" in text and "--no-compile" in text and "--lr 0.01" in text
    assert "--optimizer-args a=1,spectral_lr_mul=1.0" in text
    assert f"--run-id ord-lr0.01-s1 --log-dir {tmp_path} --seed 1" in text
    assert sweep.train_script == os.path.join(ROOT, "train_gpt.py")
    # --gpus-per-run on the command line overrides the spec and the configs
    assert {r.gpus for r in launch_sweep.expand_spec(SPEC, "demo.toml", gpus_per_run=4).runs} == {4}


def test_spec_files_toml_json_py_agree(tmp_path):
    toml = tmp_path / "s.toml"
    toml.write_text('name = "demo"\nseeds = [0, 1]\n[base]\npreset = "cpu-tiny"\n[grid]\nlr = [0.01, 0.02]\n')
    jsn = tmp_path / "s.json"
    jsn.write_text(json.dumps({"name": "demo", "seeds": [0, 1], "base": {"preset": "cpu-tiny"},
                               "grid": {"lr": [0.01, 0.02]}}))
    py = tmp_path / "s.py"
    py.write_text("SPEC = dict(name='demo', repeats=2, base={'preset': 'cpu-tiny'}, grid={'lr': [0.01, 0.02]})\n")
    expanded = [launch_sweep.expand_spec(launch_sweep.load_spec(str(p)), str(p)).runs for p in (toml, jsn, py)]
    assert expanded[0] == expanded[1] == expanded[2]
    assert [r.tag for r in expanded[0]] == ["demo-lr0.01-s0", "demo-lr0.01-s1", "demo-lr0.02-s0", "demo-lr0.02-s1"]


@pytest.mark.parametrize("spec, message", [
    ({"bogus": 1}, "unknown spec keys"),
    ({"base": {"seed": 3}}, "set by the launcher"),
    ({"grid": {"run-id": ["a"]}}, "set by the launcher"),
    ({"configs": [{"tag": "a"}, {"tag": "a"}]}, "duplicate run tags"),
    ({"configs": [{"lr": 1}]}, "needs a non-empty 'tag'"),
    ({"seeds": [0], "repeats": 2}, "both 'seeds' and 'repeats'"),
    ({"grid": {"lr": []}}, "non-empty list"),
    ({"gpus_per_run": 0}, "positive integer"),
])
def test_bad_specs_raise_clear_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        launch_sweep.expand_spec(spec, "x.toml")


@pytest.mark.skipif(not os.path.exists(os.path.join(ROOT, "train_gpt.py")), reason="train_gpt.py not in checkout")
def test_example_ord_spec_gives_valid_train_gpt_commands():
    train_gpt = pytest.importorskip("train_gpt")
    from optimizers import get_optimizer_class

    path = os.path.join(ROOT, "sweeps", "ord_experiment.toml")
    sweep = launch_sweep.expand_spec(launch_sweep.load_spec(path), path)
    assert [r.tag for r in sweep.runs] == ["baseline_std_0-s0", "spectral_lr_0-s0", "spectral_lr_1-s0"]
    configs = []
    for run in sweep.runs:
        command = launch_sweep.build_command(run, sweep, ["torchrun"])
        assert command[2] == "--nproc_per_node=8"
        configs.append(train_gpt.parse_config(command[4:]))  # unknown flags would exit here
    for cfg in configs:
        get_optimizer_class(cfg.optimizer)  # a registered name
        assert (cfg.num_iterations, cfg.val_loss_every, cfg.seed) == (1600, 50, 0)
    assert [train_gpt.parse_optimizer_args(c.optimizer_args) for c in configs] == [
        {}, {"spectral_lr_mul": 0.0}, {"spectral_lr_mul": 1.0}]


def _fake_schedule(runs, gpu_ids, max_parallel=None):
    """Drive launch_sweep.schedule with fake processes that end in start order; record concurrency."""
    active, starts, peak = [], [], [0]
    busy: set[int] = set()

    def start(run, ids):
        assert not busy & set(ids), "a GPU was given to two runs at once"
        busy.update(ids)
        handle = object()
        active.append((handle, ids))
        starts.append((run.tag, ids))
        peak[0] = max(peak[0], len(active))
        return handle

    def wait(_active):
        handle, ids = active.pop(0)
        busy.difference_update(ids)
        return [(handle, 0)]

    done = launch_sweep.schedule(runs, launch_sweep.GpuPool(gpu_ids), max_parallel, start, wait)
    return starts, peak[0], done


def test_schedule_packs_gpus():
    def runs(*sizes):
        return [launch_sweep.RunSpec(f"r{i}", 0, {}, g) for i, g in enumerate(sizes)]

    starts, peak, done = _fake_schedule(runs(*[1] * 8), list(range(8)))  # eight 1-GPU runs: all at once
    assert peak == 8 and sorted(ids[0] for _, ids in starts) == list(range(8)) and len(done) == 8
    starts, peak, _ = _fake_schedule(runs(8, 8), list(range(8)))  # 8-GPU runs: one after another
    assert peak == 1 and all(ids == list(range(8)) for _, ids in starts)
    starts, peak, _ = _fake_schedule(runs(4, 8, 4, 2, 2), list(range(8)))  # backfill around the 8-GPU run
    assert peak == 3 and starts[:4] == [("r0", [0, 1, 2, 3]), ("r2", [4, 5, 6, 7]), ("r3", [0, 1]), ("r4", [2, 3])]
    assert starts[4] == ("r1", list(range(8)))
    _, peak, _ = _fake_schedule(runs(1, 1, 1), [], max_parallel=2)  # CPU: no GPUs, --max-parallel caps
    assert peak == 2
    with pytest.raises(ValueError, match="more GPUs than"):
        _fake_schedule(runs(16), list(range(8)))


def test_a_run_that_cannot_start_is_recorded_as_crashed(tmp_path):
    sweep = launch_sweep.expand_spec({"name": "x"}, "x.toml", log_dir=str(tmp_path))
    runner = launch_sweep.ProcessRunner(sweep, [str(tmp_path / "no-such-torchrun")], threads=1, poll_s=0.01)
    handle = runner.start(sweep.runs[0], [])
    assert runner.wait({handle: None}) == [(handle, 127)]
    status = runlog.read_status(runlog.status_path(str(tmp_path), "x-s0"))
    assert (status["state"], status["exit_code"]) == ("crashed", 127)
    assert "could not start the run" in open(runlog.console_path(str(tmp_path), "x-s0")).read()


def test_dry_run_prints_commands_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # the launcher sets it only when the caller has not
    spec = tmp_path / "s.json"
    spec.write_text(json.dumps({**SPEC, "log_dir": str(tmp_path / "logs")}))
    assert launch_sweep.main([str(spec), "--dry-run", "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    commands = [line for line in out.splitlines() if "--nproc_per_node" in line]
    assert len(commands) == 8 and not (tmp_path / "logs").exists()
    # four 1-GPU runs on GPUs 0..3, then the 2-GPU runs packed on 4-5 and 6-7, then a new wave
    devices = [line.split()[0] for line in commands]
    assert devices == ["CUDA_VISIBLE_DEVICES=0", "CUDA_VISIBLE_DEVICES=1", "CUDA_VISIBLE_DEVICES=2",
                       "CUDA_VISIBLE_DEVICES=3", "CUDA_VISIBLE_DEVICES=4,5", "CUDA_VISIBLE_DEVICES=6,7",
                       "CUDA_VISIBLE_DEVICES=0,1", "CUDA_VISIBLE_DEVICES=2,3"]
    assert f"# muon-lr0.01-s0 [run] log: {tmp_path / 'logs' / 'muon-lr0.01-s0.txt'}" in out
    # CPU: CUDA hidden, gloo processes, threads shared
    assert launch_sweep.main([str(spec), "--dry-run", "--cpu", "--only", "muon-*"]) == 0
    commands = [line for line in capsys.readouterr().out.splitlines() if "--nproc_per_node" in line]
    assert len(commands) == 4 and all(line.startswith("CUDA_VISIBLE_DEVICES='' OMP_NUM_THREADS=") for line in commands)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the caller's setting is inherited, not overridden
    assert launch_sweep.main([str(spec), "--dry-run", "--cpu", "--only", "muon-*"]) == 0
    commands = [line for line in capsys.readouterr().out.splitlines() if "--nproc_per_node" in line]
    assert len(commands) == 4 and not any("OMP_NUM_THREADS" in line for line in commands)
    assert launch_sweep.main([str(spec), "--gpus", "1"]) == 2  # the 2-GPU runs cannot fit: nothing starts
    assert "runs need 2 GPUs but 1 are available" in capsys.readouterr().err and not (tmp_path / "logs").exists()


# ----------------------------------------------------------------------------------------------- monitor_runs


def test_monitor_classifies_every_kind_of_run(tmp_path, capsys):
    d = tmp_path / "logs"
    old = time.time() - 3600
    write_log(d / "done-s0.txt", final_loss=2.9)
    shutil.copy(OFFICIAL, d / "official.txt")
    shutil.copy(CRASHED, d / "ord-spectral_lr_1-s2.txt")
    write_log(d / "live-s0.txt", upto=12, step_ms=250.0, tail="step:13/20 train_lo")  # running, cut line
    write_log(d / "stuck-s0.txt", upto=6)
    os.utime(d / "stuck-s0.txt", (old, old))
    (d / "fresh-s0.txt").write_text("")  # just created
    # the launcher saw this one exit with code 1 before it wrote any log
    runlog.write_status(runlog.status_path(str(d), "nolog-s0"), {"tag": "nolog-s0", "state": "crashed",
                                                                  "exit_code": 1})
    runlog.write_status(runlog.status_path(str(d), "waiting-s0"), {"tag": "waiting-s0", "state": "queued",
                                                                    "exit_code": None})
    # processes that are gone: a launcher killed while a run waited, and a run killed with its launcher
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    host = socket.gethostname()
    runlog.write_status(runlog.status_path(str(d), "orphan-s0"), {"state": "queued", "launcher_pid": gone.pid,
                                                                   "host": host})
    write_log(d / "killed-s0.txt", upto=3)
    runlog.write_status(runlog.status_path(str(d), "killed-s0"), {"state": "running", "pid": gone.pid, "host": host,
                                                                   "exit_code": None})
    rows = {r.tag: r for r in monitor_runs.collect_runs([str(d)], target=2.92, stall_s=600)}
    assert {t: r.status for t, r in rows.items()} == {
        "done-s0": "finished", "official": "finished", "ord-spectral_lr_1-s2": "crashed",
        "live-s0": "running", "stuck-s0": "stalled", "fresh-s0": "running", "nolog-s0": "crashed",
        "waiting-s0": "queued", "orphan-s0": "cancelled", "killed-s0": "crashed"}
    assert "process gone" in rows["killed-s0"].note
    live = rows["live-s0"]
    assert (live.step, live.total, live.step_avg_ms) == (12, 20, 250.0)
    assert live.eta_s == pytest.approx((20 - 12) * 0.25) and live.note == "last line incomplete"
    assert live.last_val == pytest.approx(3.0 + 8 * 0.5**2) and live.target_step is None
    assert rows["done-s0"].target_step == 20 and rows["official"].target_step == 20
    assert rows["official"].best_val == 2.918765 and rows["done-s0"].eta_s is None
    assert "exit code 1" in rows["nolog-s0"].note and "diverged" in rows["ord-spectral_lr_1-s2"].note

    assert monitor_runs.main([str(d), "--target", "2.95"]) == 0
    table = capsys.readouterr().out
    assert "official" in table and "yes@20" in table and "10 runs:" in table
    assert monitor_runs.main([str(d), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 10
    with pytest.raises(SystemExit):  # argparse: "no such log file or directory"
        monitor_runs.main([str(tmp_path / "missing")])
    assert "no such log file or directory" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- plot_loss


def test_aggregate_mean_band_and_ema():
    a = [(0, 10.0, 0.0), (5, 4.0, 500.0), (10, 3.0, 1000.0)]
    b = [(0, 10.0, 0.0), (5, 5.0, 700.0), (10, math.nan, 1500.0)]  # b's last value is non-finite: left out
    c = [(0, 10.0, 0.0), (5, 6.0, 600.0)]  # c stopped early
    steps, mean, low, high, time_ms = plot_loss.aggregate([a, b, c])
    assert steps.tolist() == [0, 5, 10]
    assert mean.tolist() == [10.0, 5.0, 3.0] and low.tolist() == [10.0, 4.0, 3.0] and high.tolist() == [10.0, 6.0, 3.0]
    assert time_ms.tolist() == [0.0, 600.0, 1000.0]
    _, mean, low, high, _ = plot_loss.aggregate([a, b, c], band="std")
    assert high[1] - mean[1] == pytest.approx(np.std([4.0, 5.0, 6.0], ddof=1)) and low[2] == high[2] == 3.0
    # bias-corrected EMA: constant stays constant; two values give (0.9*0.5*1 + 0.5*3) / (1 - 0.5^2)
    assert plot_loss.ema([2.0] * 5, 0.3) == pytest.approx([2.0] * 5)
    assert plot_loss.ema([1.0, 3.0], 0.5)[1] == pytest.approx((0.25 * 1.0 + 0.5 * 3.0) / 0.75)


def _colour_pixels(image, rgb, tol=0.04):
    return int((np.abs(image[..., :3] - np.array(rgb)).max(axis=-1) < tol).sum())


def test_plot_draws_curves_bands_and_target(tmp_path, capsys):
    import matplotlib.image

    logs_dir = tmp_path / "logs"
    for seed, final in enumerate((2.90, 3.10, 3.30)):
        write_log(logs_dir / f"muon-s{seed}.txt", seed=seed, final_loss=final, total=200, val_every=25)
    write_log(logs_dir / "adam-s0.txt", final_loss=3.6, total=200, val_every=25)
    shutil.copy(OFFICIAL, logs_dir / "official.txt")
    out = tmp_path / "loss.png"
    assert plot_loss.main([str(logs_dir / "*.txt"), "--out", str(out)]) == 0
    assert "5 runs" in capsys.readouterr().out
    image = matplotlib.image.imread(str(out))
    # The same figure with the y range moved away from every curve: only the legend keeps the colours.
    blank = tmp_path / "blank.png"
    assert plot_loss.main([str(logs_dir / "*.txt"), "--out", str(blank), "--ylim", "100", "200"]) == 0
    blank_image = matplotlib.image.imread(str(blank))
    assert image.shape == blank_image.shape
    c0, c1 = (0x1F / 255, 0x77 / 255, 0xB4 / 255), (0xFF / 255, 0x7F / 255, 0x0E / 255)
    # Groups take colours in order of the sorted paths: adam C0, muon C1 (its seed band: C1 at alpha 0.2 on white).
    band = tuple(0.8 + 0.2 * x for x in c1)
    for name, rgb, minimum in (("adam", c0, 1500), ("muon mean", c1, 1500), ("muon band", band, 3000)):
        drawn, legend_only = _colour_pixels(image, rgb), _colour_pixels(blank_image, rgb)
        assert drawn > minimum and drawn > 10 * legend_only, (name, drawn, legend_only)
    for ext, magic in (("svg", b"<?xml"), ("pdf", b"%PDF")):
        path = tmp_path / f"loss.{ext}"
        plot_loss.plot_runs([runlog.parse_log(p) for p in runlog.find_logs([str(logs_dir)])], str(path))
        assert path.read_bytes().startswith(magic)
    with pytest.raises(ValueError, match="use a .png, .svg or .pdf"):
        plot_loss.plot_runs([runlog.parse_log(OFFICIAL)], str(tmp_path / "x.jpg"))
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / "e.txt").write_text("")
    assert plot_loss.main([str(tmp_path / "none"), "--out", str(out)]) == 2  # nothing to plot: clear error


def test_default_ylim_keeps_the_end_readable():
    logs = [runlog.parse_log(OFFICIAL)]
    curves, _ = plot_loss.build_curves(logs, "minmax", 0.05)
    low, high = plot_loss.default_ylim(curves, 2.92, skip_frac=0.1)
    # the step-0 loss (10.83) is left out of the range; the end (2.9188) and the target are inside
    assert 6.512345 < high < 7.0 and low < 2.918765 and low < 2.92


# ----------------------------------------------------------------------------------------------- make_record


def test_make_record_statistics_match_scipy_and_hand_computation(tmp_path):
    finals, step_ms = [2.9181, 2.9176, 2.9190], [50_000.0, 51_000.0, 49_500.0]
    paths = [write_log(tmp_path / "logs" / f"rec-s{i}.txt", seed=i, final_loss=f, step_ms=ms)
             for i, (f, ms) in enumerate(zip(finals, step_ms))]
    runlog.write_status(runlog.status_path(str(tmp_path / "logs"), "rec-s0"), {"command": "torchrun --x 1"})
    folder = make_record.make_record(paths, "medium", "test-rec", date="2025-01-02",
                                     records_dir=str(tmp_path / "records"))
    assert folder == str(tmp_path / "records" / "medium" / "2025-01-02_test-rec")
    assert sorted(os.listdir(folder)) == ["README.md", "rec-s0.txt", "rec-s1.txt", "rec-s2.txt", "stats.json"]
    summary = json.loads(open(os.path.join(folder, "stats.json")).read())
    readme = open(os.path.join(folder, "README.md")).read()

    n, mean = 3, sum(finals) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in finals) / (n - 1))
    t = (mean - 2.92) / (sd / math.sqrt(n))
    p_hand = 0.5 + t / (2 * math.sqrt(2 + t * t))  # Student t CDF with 2 degrees of freedom, closed form
    p_scipy = stats.ttest_1samp(finals, 2.92, alternative="less").pvalue
    assert summary["p_value"] == pytest.approx(p_scipy, rel=1e-12) == pytest.approx(p_hand, rel=1e-9)
    assert summary["t_statistic"] == pytest.approx(t, rel=1e-9) and summary["loss_std"] == pytest.approx(sd)
    times = [20 * ms / 1000 for ms in step_ms]  # 20 steps
    assert summary["time_mean_s"] == pytest.approx(np.mean(times))
    assert summary["time_std_s"] == pytest.approx(np.std(times, ddof=1))
    assert f"p = {p_scipy:.3g}" in readme and "record rule p < 0.01: NOT met" in readme  # p ~ 0.04 here
    assert "| rec-s1.txt | 1 | 20 | 2.9176 | 1020.0 |" in readme and "torchrun --x 1" in readme

    # With more runs the rule is met; official 6-decimal logs are printed as they were logged.
    official = [write_log(tmp_path / "off" / f"o{i}.txt", fmt="official", decimals=6, final_loss=2.9165 + 1.23e-4 * i)
                for i in range(6)]
    folder = make_record.make_record(official, "medium", "off", date="2025-01-03", command="torchrun ...",
                                     records_dir=str(tmp_path / "records"))
    readme = open(os.path.join(folder, "README.md")).read()
    assert "| o5.txt | - | 20 | 2.917115 | 2.0 |" in readme and "record rule p < 0.01: met" in readme


def test_make_record_refuses_bad_input(tmp_path, capsys):
    done = write_log(tmp_path / "done.txt")
    running = write_log(tmp_path / "running.txt", upto=10)
    records = str(tmp_path / "records")
    with pytest.raises(ValueError, match="not finished"):
        make_record.make_record([done, running], "medium", "x", records_dir=records)
    with pytest.raises(ValueError, match="plain folder name"):
        make_record.make_record([done], "medium", "../x", records_dir=records)
    assert make_record.main([done, "--track", "medium", "--name", "one", "--records-dir", records,
                             "--date", "2025-01-01"]) == 0
    assert "n/a (one run)" in capsys.readouterr().out  # one run: no std, no t-test
    assert make_record.main([done, "--track", "medium", "--name", "one", "--records-dir", records,
                             "--date", "2025-01-01"]) == 2
    assert "already exists" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- end to end


TRAIN_GPT = os.path.join(ROOT, "train_gpt.py")
# The smallest model train_gpt.py accepts with every feature on (a step takes a fraction of a second on a CPU).
TINY_FLAGS = {
    "preset": "cpu-tiny", "num_iterations": 3, "val_loss_every": 0, "report_baselines": False,
    "num_layers": 2, "model_dim": 32, "num_heads": 2, "head_dim": 16, "seq_len": 64, "micro_batch_tokens": 128,
    "batch_tokens": 256, "val_seq_len": 128, "val_tokens": 512, "skip_connections": "0:1",
    "long_window_layers": "0", "num_value_embeds": 1, "max_window_tokens": 64, "window_block": 16,
}


def _run_tool(args, cwd, timeout):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _monitor_rows(cwd, log_dir):
    proc = _run_tool([os.path.join(ROOT, "monitor_runs.py"), log_dir, "--json"], cwd, 30)
    assert proc.returncode == 0, proc.stderr
    return {row["tag"]: row for row in json.loads(proc.stdout)}


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(TRAIN_GPT), reason="train_gpt.py is not in this checkout")
def test_sweep_end_to_end_on_cpu(tmp_path):
    """Three real train_gpt.py runs through launch_sweep.py (2 at a time, gloo): one crashes at step 1, the
    others finish; monitor_runs.py reports exactly that. Re-running the fixed spec restarts only the crashed run."""
    from data.shards import write_shard

    rng = np.random.default_rng(0)
    for name, n in (("syn_val_000000.bin", 2048), ("syn_train_000001.bin", 8192)):
        tokens = rng.integers(0, 50000, size=n).astype(np.uint16)
        tokens[rng.random(n) < 0.025] = 50256
        tokens[0] = 50256
        write_shard(str(tmp_path / name), tokens)
    base = {**TINY_FLAGS, "train_files": str(tmp_path / "syn_train_*.bin"),
            "val_files": str(tmp_path / "syn_val_*.bin")}
    spec = {"name": "e2e", "log_dir": "logs/e2e", "max_parallel": 2, "base": base, "seeds": [0],
            "configs": [{"tag": "boom", "debug_crash_at_step": 1}, {"tag": "a"}, {"tag": "b", "lr": 0.01}]}
    spec_path = tmp_path / "e2e.json"
    spec_path.write_text(json.dumps(spec))
    log_dir = str(tmp_path / "logs" / "e2e")

    first = _run_tool([os.path.join(ROOT, "launch_sweep.py"), str(spec_path), "--cpu"], tmp_path, 80)
    assert first.returncode == 1, first.stdout + first.stderr  # one run failed
    summary = first.stdout[first.stdout.index("tag "):]
    assert [line.split()[:2] for line in summary.splitlines()[2:]] == [
        ["boom-s0", "crashed"], ["a-s0", "finished"], ["b-s0", "finished"]]
    rows = _monitor_rows(tmp_path, log_dir)
    assert {tag: row["status"] for tag, row in rows.items()} == {
        "boom-s0": "crashed", "a-s0": "finished", "b-s0": "finished"}
    assert "debug crash at step 1" in rows["boom-s0"]["note"]
    boom = runlog.read_status(runlog.status_path(log_dir, "boom-s0"))
    assert boom["exit_code"] != 0 and "--debug-crash-at-step 1" in boom["command"]
    assert runlog.parse_log(runlog.log_path(log_dir, "boom-s0")).has_traceback
    assert "debug crash at step 1" in open(runlog.console_path(log_dir, "boom-s0")).read()
    for tag, lr in (("a-s0", 0.02), ("b-s0", 0.01)):
        log = runlog.parse_log(runlog.log_path(log_dir, tag))
        assert log.final_val.step == 3 and log.config["lr"] == lr and log.config["report_baselines"] is False
        assert len(log.train) == 3 and math.isfinite(log.final_val.loss)

    spec["configs"][0] = {"tag": "boom"}  # fix the crashing config; same tag, so only it runs again
    spec_path.write_text(json.dumps(spec))
    second = _run_tool([os.path.join(ROOT, "launch_sweep.py"), str(spec_path), "--cpu"], tmp_path, 60)
    assert second.returncode == 0, second.stdout + second.stderr
    summary = second.stdout[second.stdout.index("tag "):]
    assert [line.split()[:2] for line in summary.splitlines()[2:]] == [
        ["boom-s0", "finished"], ["a-s0", "skipped"], ["b-s0", "skipped"]]
    assert os.path.exists(runlog.log_path(log_dir, "boom-s0") + ".attempt1")  # the crashed log is kept
    assert runlog.read_status(runlog.status_path(log_dir, "boom-s0"))["attempt"] == 2
    assert {row["status"] for row in _monitor_rows(tmp_path, log_dir).values()} == {"finished"}
