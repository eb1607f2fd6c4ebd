"""Bad input gets exit code 2 and a message saying how to fix it, before any work and without touching the run's
files: the three cases that were tracebacks (--lr -1, --seq-len 0, a corrupt shard header) and their neighbours."""
import dataclasses
import json

import numpy as np
import pytest

import train_gpt
from config import parse_config
from data.shards import write_shard


@pytest.fixture()
def data(tmp_path):
    for name in ("d_train_000001.bin", "d_train_000002.bin", "d_val_000000.bin"):
        write_shard(tmp_path / name, np.arange(6000) % 500)
    return ["--train-files", str(tmp_path / "d_train_*.bin"), "--val-files", str(tmp_path / "d_val_*.bin"),
            "--log-dir", str(tmp_path / "logs"), "--checkpoint-dir", str(tmp_path / "ckpt")]


def run_main(args, capsys):
    code = train_gpt.main(["--preset", "medium-tiny", "--vocab-size", "512", "--bos-id", "499", *args])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


@pytest.mark.parametrize("args, expected", [
    (["--lr", "-1"], "--lr must be >= 0 (a step size), got -1.0; preset medium-tiny uses --lr 0.015"),
    (["--seq-len", "0"], "--seq-len must be a positive integer, got 0; preset medium-tiny uses --seq-len 65536"),
    (["--micro-batch-tokens", "0"], "--micro-batch-tokens must be a positive integer"),
    (["--scalar-lr", "-0.5"], "--scalar-lr must be >= 0"),
    (["--momentum", "1.5"], "--momentum must be in [0, 1)"),
    (["--optimizer-args", "msign_steps=0"], "msign_steps must be an integer >= 1"),
    (["--optimizer-args", "no_such_arg=1"], "unexpected keyword argument 'no_such_arg'"),
    (["--batch-schedule", "256,501"], "--batch-schedule entries [501] are not positive multiples of the 2 forwards"),
    (["--backout-layer", "16"], "--backout-layer must be -1 (off) or a layer in 0..15"),
    (["--matrix-lr-muls", "attn=2,head=1"], "--matrix-lr-muls item 'head=1'"),
])
def test_bad_flags_exit_2_before_any_work(data, tmp_path, capsys, args, expected):
    code, err = run_main(data + args, capsys)
    assert code == 2 and expected in err, err
    assert not (tmp_path / "logs").exists()  # nothing was started


def test_corrupt_shard_header_is_found_before_any_work(data, tmp_path, capsys):
    with open(tmp_path / "d_train_000002.bin", "r+b") as f:  # a later shard: the loader would reach it much later
        f.write(np.array([12345], dtype="<i4").tobytes())
    code, err = run_main(data, capsys)
    assert code == 2 and "d_train_000002.bin: expected magic number 20240520, found 12345" in err
    assert "re-download" in err and not (tmp_path / "logs").exists()


def test_short_val_files_and_resume_keep_the_checkpoint(data, tmp_path, capsys):
    code, err = run_main(data + ["--val-tokens", "8192", "--val-seq-len", "1024"], capsys)
    assert code == 2 and "fewer than the 8193 needed" in err
    checkpoint = tmp_path / "ckpt" / "run" / "step_000004"
    checkpoint.mkdir(parents=True)
    (checkpoint / "meta.json").write_text("{}")
    code, err = run_main(data + ["--resume", str(checkpoint)], capsys)
    assert code == 2 and "not written by this version" in err
    saved = parse_config(["--preset", "medium-tiny", "--vocab-size", "512", "--bos-id", "499", *data])
    meta = dict(step=4, train_time_ms=1.0, world_size=1, config=dataclasses.asdict(saved))
    (checkpoint / "meta.json").write_text(json.dumps(meta))
    with open(tmp_path / "d_val_000000.bin", "r+b") as f:
        f.write(np.array([0], dtype="<i4").tobytes())
    code, err = run_main(data + ["--resume", str(checkpoint)], capsys)
    assert code == 2 and "d_val_000000.bin" in err
    assert sorted(p.name for p in checkpoint.iterdir()) == ["meta.json"]  # nothing lost or rewritten
