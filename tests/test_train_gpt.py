"""train_gpt.py: config, model paths, schedules, and end-to-end runs (1 vs 2 processes, resume, guards)."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import attention
import schedules
import train_gpt
from config import Hyperparameters, parse_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A model small enough that a step takes milliseconds; every record feature stays switched on.
TINY_ARGS = [
    "--preset", "cpu-tiny", "--num-layers", "2", "--model-dim", "32", "--num-heads", "2", "--head-dim", "16",
    "--seq-len", "64", "--micro-batch-tokens", "128", "--batch-tokens", "256", "--val-seq-len", "128",
    "--val-tokens", "512", "--skip-connections", "0:1", "--long-window-layers", "0", "--num-value-embeds", "1",
    "--max-window-tokens", "64", "--window-block", "16", "--print-every", "1", "--momentum-warmup-steps", "3",
]


def tiny_cfg(**overrides) -> Hyperparameters:
    cfg = parse_config(TINY_ARGS)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def write_synthetic_shards(out_dir: str) -> tuple[str, str]:
    """Random tokens with a document start every ~40 tokens, in the real shard format; (train, val) globs."""
    from data.shards import write_shard

    rng = np.random.default_rng(0)
    for name, n in (("syn_val_000000.bin", 4096), ("syn_train_000001.bin", 20000)):
        tokens = rng.integers(0, 50000, size=n).astype(np.uint16)
        tokens[rng.random(n) < 0.025] = 50256
        tokens[0] = 50256
        write_shard(os.path.join(out_dir, name), tokens)
    return os.path.join(out_dir, "syn_train_*.bin"), os.path.join(out_dir, "syn_val_*.bin")


def one_vs_two_process_args(train_files: str, val_files: str, log_dir: str) -> list[str]:
    """Arguments of the 1-process vs 2-process comparison (bench/stress_dist.py launches the 2-process run)."""
    return [*TINY_ARGS, "--train-files", train_files, "--val-files", val_files, "--num-iterations", "6",
            "--val-loss-every", "3", "--log-dir", log_dir]


@pytest.fixture(scope="module")
def synthetic_shards(tmp_path_factory):
    return write_synthetic_shards(str(tmp_path_factory.mktemp("shards")))


def run_train_gpt(args, nproc=1, cwd=ROOT, check=True, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if nproc == 1:
        cmd = [sys.executable, os.path.join(ROOT, "train_gpt.py"), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               os.path.join(ROOT, "train_gpt.py"), *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"train_gpt.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def read_losses(log_path):
    val, train = {}, {}
    with open(log_path) as f:
        for line in f:
            if not line.startswith("step:"):
                continue
            fields = dict(item.split(":", 1) for item in line.split())
            step = int(fields["step"].split("/")[0])
            if "val_loss" in fields:
                val[step] = float(fields["val_loss"])
            if "train_loss" in fields:
                train[step] = float(fields["train_loss"])
    return val, train


# ---------------------------------------------------------------------------------------------- config

def test_presets_defaults_and_flags():
    assert parse_config([], cuda_available=True).preset == "medium"
    assert parse_config([], cuda_available=False).preset == "cpu-bytes"
    cfg = parse_config(["--preset", "cpu-tiny", "--num-iterations", "7", "--no-compile", "--lr", "0.5",
                        "--optimizer", "muon"])
    assert (cfg.num_iterations, cfg.compile, cfg.lr, cfg.model_dim) == (7, False, 0.5, 128)
    medium = parse_config(["--preset", "medium"])
    assert (medium.num_layers, medium.model_dim, medium.vocab_size, medium.batch_tokens) == (16, 1024, 50304, 524288)
    with pytest.raises(SystemExit):
        parse_config(["--no-such-flag", "1"])
    with pytest.raises(SystemExit):
        parse_config(["--preset", "huge"])


def test_optimizer_args_parsing():
    args = train_gpt.parse_optimizer_args("spectral_lr_mul=0.5, decompose=true,steps=3,mode=matched")
    assert args == {"spectral_lr_mul": 0.5, "decompose": True, "steps": 3, "mode": "matched"}
    with pytest.raises(ValueError, match="key=value"):
        train_gpt.parse_optimizer_args("oops")


def test_impossible_configs_fail_before_work(synthetic_shards):
    train_files, val_files = synthetic_shards
    cfg = tiny_cfg(train_files=train_files, val_files=val_files)
    assert train_gpt.validate_config(cfg, world_size=1) == 2  # 256 tokens/step = 2 micro-batches of 128
    with pytest.raises(train_gpt.ConfigError, match="--batch-tokens"):
        train_gpt.validate_config(cfg, world_size=3)
    with pytest.raises(train_gpt.ConfigError, match="muon"):  # the message lists the valid choices
        train_gpt.validate_config(tiny_cfg(train_files=train_files, val_files=val_files, optimizer="sgdx"), 1)
    with pytest.raises(train_gpt.ConfigError, match="no file matches"):
        train_gpt.validate_config(tiny_cfg(train_files="/nonexistent/*.bin", val_files=val_files), 1)
    # GPT-2 ids (up to 50256) for a byte-level model: refused before any work, naming the presets that fit
    with pytest.raises(train_gpt.ConfigError, match="another tokenizer.*cpu-bytes"):
        train_gpt.validate_config(tiny_cfg(train_files=train_files, val_files=val_files, vocab_size=256, bos_id=0), 1)
    with pytest.raises(train_gpt.ConfigError, match="bos_id"):
        train_gpt.validate_config(tiny_cfg(train_files=train_files, val_files=val_files, bos_id=60000), 1)


def test_config_error_exit_code_and_message(tmp_path):
    proc = run_train_gpt([*TINY_ARGS, "--train-files", str(tmp_path / "none_*.bin"), "--log-dir", str(tmp_path)],
                         check=False, timeout=120)
    assert proc.returncode == 2
    assert "no file matches" in proc.stderr and "prepare_demo_data" in proc.stderr or "cached_fineweb" in proc.stderr


# ---------------------------------------------------------------------------------------------- model

def test_schedules_closed_forms():
    cfg = Hyperparameters(num_iterations=1000, cooldown_frac=0.7, final_lr_frac=0.0, max_window_tokens=3456,
                          window_block=128, momentum=0.95, momentum_warmup_start=0.85, momentum_warmup_steps=300)
    assert schedules.lr_multiplier(cfg, 0) == 1.0 and schedules.lr_multiplier(cfg, 299) == 1.0
    assert math.isclose(schedules.lr_multiplier(cfg, 650), 0.5)
    assert schedules.lr_multiplier(cfg, 1000) == 0.0
    for step in (0, 100, 500, 999):
        x = step / 1000
        expected = 3456 * (4 * x**3 - 6 * x**2 + 3 * x)
        got = schedules.window_tokens_at(cfg, step)
        assert got % 128 == 0 and expected <= got < expected + 128 + 1e-9 or (expected == 0 and got == 128)
    assert math.isclose(schedules.momentum_at(cfg, 150), 0.90) and schedules.momentum_at(cfg, 600) == 0.95


def test_attention_mask_is_causal_same_document_and_windowed():
    """A window of W tokens: the query and the W positions before it (FlashAttention's window_size=(W, 0))."""
    doc_ids = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1])
    mask = attention.dense_attention_mask(doc_ids, torch.tensor(2))
    for q in range(8):
        for k in range(8):
            expected = k <= q and doc_ids[q] == doc_ids[k] and q - k <= 2
            assert bool(mask[q, k]) == bool(expected)


def test_flex_attention_path_matches_sdpa_path():
    """Both attention paths built from the one mask definition give the same logits (CPU forward)."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    cfg = tiny_cfg(seq_len=128)
    torch.manual_seed(0)
    model = train_gpt.GPT(cfg)
    for p in model.parameters():  # zero-init projections would hide attention differences
        p.data.normal_(0, 0.05)
    idx = torch.randint(0, 50000, (1, 128))
    idx[0, [0, 37, 90]] = cfg.bos_id
    with torch.no_grad():
        dense = model(idx, None, model.attention_masks(idx, 48, 24, use_flex=False))
        try:
            flex = model(idx, None, model.attention_masks(idx, 48, 24, use_flex=True))
        except (NotImplementedError, RuntimeError) as exc:
            pytest.skip(f"FlexAttention forward unavailable on this CPU build: {exc}")
    torch.testing.assert_close(flex, dense, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("switch", [
    dict(merged_qkvo=False), dict(qk_norm=False, v_norm=False), dict(rotary="full"), dict(rotary="none"),
    dict(num_value_embeds=0), dict(x0_mix=False), dict(skip_connections=""), dict(mlp_only_layers="1"),
    dict(relu_squared=False), dict(zero_init_proj=False), dict(logit_softcap=0.0), dict(doc_mask=False),
    dict(sliding_window=False), dict(doc_mask=False, sliding_window=False),
    dict(linear_bias=True, merged_qkvo=False), dict(norm_gains=True), dict(hidden_init="normal"),
])
def test_every_feature_switch_trains(switch):
    cfg = tiny_cfg(**switch)
    torch.manual_seed(0)
    model = train_gpt.GPT(cfg)
    optimizers = train_gpt.build_optimizers(model, cfg)
    idx = torch.randint(0, 50000, (2, 65))
    losses = []
    for _ in range(3):
        loss = model(idx[:, :-1], idx[:, 1:], model.attention_masks(idx[:, :-1], 64, 32, use_flex=False))
        loss.backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


def test_every_parameter_in_exactly_one_group():
    cfg = tiny_cfg()
    model = train_gpt.GPT(cfg)
    optimizers = train_gpt.build_optimizers(model, cfg)
    seen = [id(p) for opt in optimizers for g in opt.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())
    matrix_params = [p for g in optimizers[1].param_groups for p in g["params"]]
    assert all(p.ndim >= 2 for p in matrix_params)


# ---------------------------------------------------------------------------------------------- end to end

@pytest.mark.slow
def test_two_processes_reproduce_one_process(tmp_path, synthetic_shards):
    """Same global batch: 1 process x 2 accumulation steps vs 2 gloo processes x 1 step (distributed optimizers)."""
    common = one_vs_two_process_args(*synthetic_shards, str(tmp_path))
    run_train_gpt([*common, "--run-id", "one"])
    run_train_gpt([*common, "--run-id", "two"], nproc=2)
    val1, train1 = read_losses(tmp_path / "one.txt")
    val2, train2 = read_losses(tmp_path / "two.txt")
    assert sorted(val1) == sorted(val2) == [0, 3, 6] and sorted(train1) == sorted(train2) == list(range(1, 7))
    for step in train1:
        assert math.isclose(train1[step], train2[step], rel_tol=0, abs_tol=2e-4), (step, train1, train2)
    for step in val1:
        assert math.isclose(val1[step], val2[step], rel_tol=0, abs_tol=2e-4), (step, val1, val2)
    assert train1[6] < train1[1]


@pytest.mark.slow
def test_resume_after_kill_matches_uninterrupted_run(tmp_path, synthetic_shards):
    train_files, val_files = synthetic_shards
    common = [*TINY_ARGS, "--train-files", train_files, "--val-files", val_files, "--num-iterations", "8",
              "--val-loss-every", "4", "--log-dir", str(tmp_path), "--checkpoint-dir", str(tmp_path / "ckpt")]
    run_train_gpt([*common, "--run-id", "full"])
    # the interrupted run dies at step 6, after its checkpoint at step 4
    crashed = run_train_gpt([*common, "--run-id", "killed", "--checkpoint-every", "4", "--debug-crash-at-step", "6"],
                            check=False)
    assert crashed.returncode != 0
    ckpt = tmp_path / "ckpt" / "killed" / "step_000004"
    assert (ckpt / "meta.json").exists() and not (tmp_path / "ckpt" / "killed" / "step_000004.tmp").exists()
    run_train_gpt([*common, "--resume", str(ckpt)])
    val_full, train_full = read_losses(tmp_path / "full.txt")
    val_res, train_res = read_losses(tmp_path / "killed.txt")  # resumed lines are appended; later ones win
    for step in range(5, 9):
        assert train_res[step] == train_full[step], (step, train_res, train_full)
    assert val_res[8] == val_full[8]
    assert "Traceback" in (tmp_path / "killed.txt").read_text()


@pytest.mark.slow
def test_non_finite_loss_stops_with_checkpoint(tmp_path, synthetic_shards):
    train_files, val_files = synthetic_shards
    proc = run_train_gpt([*TINY_ARGS, "--train-files", train_files, "--val-files", val_files, "--num-iterations", "6",
                          "--val-loss-every", "0", "--embed-lr", "1e30", "--scalar-lr", "1e30", "--run-id", "nan",
                          "--log-dir", str(tmp_path), "--checkpoint-every", "100",
                          "--checkpoint-dir", str(tmp_path / "ckpt")], check=False)
    assert proc.returncode != 0
    log = (tmp_path / "nan.txt").read_text()
    assert "error: non-finite train loss" in log
    saved = [d for d in os.listdir(tmp_path / "ckpt" / "nan") if d.endswith("_nonfinite")]
    assert saved and os.path.exists(tmp_path / "ckpt" / "nan" / saved[0] / "model.pt")


@pytest.mark.slow
def test_log_has_record_format(tmp_path, synthetic_shards):
    train_files, val_files = synthetic_shards
    run_train_gpt([*TINY_ARGS, "--train-files", train_files, "--val-files", val_files, "--num-iterations", "2",
                   "--val-loss-every", "2", "--run-id", "fmt", "--log-dir", str(tmp_path)])
    text = (tmp_path / "fmt.txt").read_text()
    source, env, steps = text.split("\n" + "=" * 100 + "\n")
    assert source.startswith("# file: ") and "# file: train_gpt.py" in source and "# file: optimizers/muon.py" in source
    assert "Running PyTorch" in env
    config = json.loads(next(l for l in env.splitlines() if l.startswith("config: "))[len("config: "):])
    assert config["run_id"] == "fmt" and config["num_iterations"] == 2
    step_lines = [l for l in steps.splitlines() if l.startswith("step:")]
    assert step_lines[0].startswith("step:0/2 val_loss:") and step_lines[0].endswith("step_avg:nanms")
    assert step_lines[1].startswith("step:1/2 train_loss:") and step_lines[-1].startswith("step:2/2 val_loss:")


@pytest.mark.slow
def test_cpu_demo_learns_below_baselines_and_train_matches_val(tmp_path, demo_data_dir):
    """A shortened `python train_gpt.py` CPU run (preset cpu-bytes) on the real demo text: it ends well below the
    unigram and bigram models of the same data, and on the i.i.d. stream the train loss (mean of the 10 steps
    before each validation) stays within a few tenths of a nat of the val loss throughout."""
    from data.shards import bigram_cross_entropy, unigram_cross_entropy

    train_files = os.path.join(demo_data_dir, "bytes_train_*.bin")
    val_files = os.path.join(demo_data_dir, "bytes_val_*.bin")
    run_train_gpt(["--num-iterations", "100", "--val-loss-every", "25", "--val-tokens", "16384",
                   "--train-files", train_files, "--val-files", val_files, "--run-id", "demo",
                   "--log-dir", str(tmp_path)], timeout=600)
    val, train = read_losses(tmp_path / "demo.txt")
    unigram = unigram_cross_entropy(train_files, val_files, vocab_size=256, val_tokens=16384)
    bigram = bigram_cross_entropy(train_files, val_files, vocab_size=256, val_tokens=16384)
    print(f"demo val loss {val[100]:.3f}, unigram {unigram:.3f}, bigram {bigram:.3f}")
    assert val[0] == pytest.approx(math.log(256), abs=1e-3)  # the zero-initialised head predicts uniformly
    assert bigram < unigram - 0.5
    assert val[100] < bigram - 0.2  # measured: 2.39 against 2.66 (bigram) and 3.28 (unigram)
    for step in (25, 50, 75, 100):
        recent = np.mean([train[s] for s in range(step - 9, step + 1)])
        assert abs(recent - val[step]) < 0.3, (step, recent, val[step])
    assert "vs bigram model of the same data" in (tmp_path / "demo.txt").read_text()
