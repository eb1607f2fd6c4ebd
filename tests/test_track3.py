"""The optimizer benchmark (track 3): its significance rules on hand-computed examples and on the published numbers of
the benchmark's README, steps-to-target in runlog / monitor_runs, make_record --track track3, the sweep spec."""
import json
import math
import os

import numpy as np
import pytest
from scipy import stats

import make_record
import monitor_runs
import runlog
import track3

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEP = "=" * 100
# Final val losses of the ten runs of the track-3 baseline #36 (tuned Muon + aux AdamW, 3250 steps), as printed in
# their logs (records/track_3_optimization/results/20260610_tuned_baseline_3250/); README: 3.2787 (n=10).
BASELINE_36 = [3.27722, 3.27941, 3.27699, 3.28091, 3.27822, 3.28034, 3.27873, 3.27932, 3.27720, 3.27825]


def track3_val_steps(total):
    """The benchmark's cadence: every 125 steps, every 25 once step / total >= 0.9, and the last step."""
    return [s for s in range(total + 1) if s == total or s % (125 if s / total < 0.9 else 25) == 0]


def write_track3_log(path, final, total=3250, fmt="official", seed=None, target=None):
    """A track-3 log whose val loss is `final` at the last step and rises by 0.0045 per 100 steps before it
    (rounded to the 5 decimals the official logs print). fmt "official": train_time in seconds, no config."""
    lines = ["import torch", SEP, "Running PyTorch 2.10.0+cu128 on NVIDIA H100 80GB HBM3 with world_size 8"]
    if fmt == "ours":
        config = {"run_id": os.path.splitext(os.path.basename(path))[0], "seed": seed, "preset": "track3"}
        if target is not None:
            config["val_loss_target"] = target
        lines.append("config: " + json.dumps(config))
    lines.append(SEP)
    for step in track3_val_steps(total):
        loss = round(final + 0.0045 * (total - step) / 100, 5)
        avg = "nan" if step == 0 else "155.00"
        time_text = f"{0.155 * step:.3f}s" if fmt == "official" else f"{155 * step}ms"
        lines.append(f"step:{step}/{total} val_loss:{loss:.5f} train_time:{time_text} step_avg:{avg}ms")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return str(path)


# ----------------------------------------------------------------------------------------------- the rules


def test_rule_on_the_readme_examples():
    # "for a single non-cherry-picked run, any val loss below 3.276 suffices, and for n=4 runs, any average below
    # 3.278 suffices"
    assert track3.rule_statistic(3.2759, 1) >= track3.MARGIN > track3.rule_statistic(3.2761, 1)
    assert track3.rule_statistic(3.2779, 4) >= track3.MARGIN > track3.rule_statistic(3.2781, 4)
    # baseline #36: mean 3.278659, (3.28 - 3.278659) * sqrt(10) = 0.001341 * 3.16228 = 0.0042406 >= 0.004
    result = track3.rule_at_step(3250, BASELINE_36)
    assert result.mean == pytest.approx(3.278659, abs=1e-12)
    assert result.statistic == pytest.approx(0.001341 * math.sqrt(10), rel=1e-9) and result.met
    # the z-test behind it: p = P(Z > statistic / sigma); 0.004 is 3.077 sigma, p < 0.001 at 3.09 sigma
    assert result.p_value == pytest.approx(stats.norm.sf(0.0042406 / 0.0013), rel=1e-3)
    assert track3.rule_p_value(3.28 - 0.004, 1) == pytest.approx(0.5 * math.erfc(0.004 / 0.0013 / math.sqrt(2)))


def test_pairwise_rule_on_the_readme_examples():
    # #13 (3210 steps, 3.2785, n=16) vs #11 (3225, 3.2785, n=10): 15 steps = 0.000675; / sqrt(1/16 + 1/10)
    assert track3.pairwise_statistic(3.2785, 16, 3225, 3.2785, 10, 3210) == pytest.approx(0.000675 / 0.403113, rel=1e-5)
    assert track3.pairwise_statistic(3.2785, 16, 3225, 3.2785, 10, 3210) == pytest.approx(0.00167, abs=5e-6)
    # #13 vs #8 (3250, 3.2778, n=10): ((3.2778 - 3.2785) + 40/100 * 0.0045) / (1/10 + 1/16)**0.5 = 0.0027
    assert track3.pairwise_statistic(3.2778, 10, 3250, 3.2785, 16, 3210) == pytest.approx(0.0011 / 0.403113, rel=1e-5)
    # #12 (3325, 3.2790, n=20) vs #6 (3375, 3.2788, n=20): (-0.0002 + 0.00225) / sqrt(0.1) = 0.00648, significant
    value = track3.pairwise_statistic(3.2788, 20, 3375, 3.2790, 20, 3325)
    assert value == pytest.approx(0.00205 / math.sqrt(0.1), rel=1e-9) and value >= track3.MARGIN


def test_seeds_needed_from_sigma():
    # true mean 3.2787 (the baseline at 3250 steps): (0.004 + z_0.8 * 0.0013) / 0.0013 = 3.9185, squared 15.35
    z80 = stats.norm.ppf(0.8)
    assert track3.seeds_needed(3.2787) == math.ceil(((0.004 + z80 * 0.0013) / 0.0013) ** 2) == 16
    # at even odds: (0.004 / 0.0013)^2 = 9.47 -> 10, the baseline's own n
    assert track3.seeds_needed(3.2787, power=0.5) == 10
    assert track3.seeds_needed(3.270) == 1 and track3.seeds_needed(3.28) is None
    # the claim behind it: with n = seeds_needed, a simulated set meets the rule at about the asked rate
    rng = np.random.default_rng(0)
    n = track3.seeds_needed(3.2787)
    means = 3.2787 + rng.normal(0, 0.0013, size=(20000, n)).mean(axis=1)
    rate = np.mean((3.28 - means) * math.sqrt(n) >= track3.MARGIN)
    assert 0.8 <= rate < 0.84  # 0.8 at n = 15.35; the rounding up to 16 adds a little


def test_set_takes_the_earliest_common_step_that_meets_the_rule():
    # 8 runs at 3250 steps, mean 3.2740 at the end, +0.001125 per 25 steps before it: the rule needs
    # (3.28 - 3.274 - 0.001125 k) sqrt(8) >= 0.004, k <= 4.08: step 3250 - 4 * 25 = 3150 (mean 3.2785).
    offsets = np.linspace(-0.002, 0.002, 8)
    curves = [{s: 3.274 + o + 0.0045 * (3250 - s) / 100 for s in track3_val_steps(3250)} for o in offsets]
    result = track3.evaluate_set(curves, 3250, list(range(8)))
    assert result.met and result.steps == 3150 and result.at_steps.mean == pytest.approx(3.2785)
    assert result.at_steps.statistic == pytest.approx(0.0015 * math.sqrt(8))
    assert not next(r for r in result.rows if r.step == 3125).met
    assert result.losses == pytest.approx([curve[3150] for curve in curves])
    # runs validated at different steps: only the shared ones count; a nan run never meets the rule
    curves[0] = {s: v for s, v in curves[0].items() if s % 100 == 0 or s == 3250}
    assert track3.evaluate_set(curves, 3250, list(range(8))).steps == 3200
    curves[1] = {s: math.nan for s in curves[1]}
    assert not track3.evaluate_set(curves, 3250, list(range(8))).met
    with pytest.raises(ValueError, match="validate at its last step"):
        track3.evaluate_set([{0: 11.0}], 3250, [None])


def test_comparison_paired_by_seed_or_welch_against_hand_formulas():
    old_losses = [3.2790, 3.2775, 3.2801, 3.2783]
    new_losses = [3.2771, 3.2768, 3.2779, 3.2760]
    old = track3.SetResult(3250, 3250, False, old_losses, [0, 1, 2, 3], [])
    new = track3.SetResult(3200, 3200, True, new_losses[::-1], [3, 2, 1, 0], [])  # same seeds, other order
    cmp = track3.compare_sets(old, new)
    # paired: d_i = old_i - (new_i - 50/100 * 0.0045), matched by seed
    d = [o - (n - 0.00225) for o, n in zip(old_losses, new_losses)]
    t_hand = np.mean(d) / (np.std(d, ddof=1) / 2)
    assert cmp.test == "paired" and cmp.t_statistic == pytest.approx(t_hand, rel=1e-9)
    assert cmp.p_value == pytest.approx(stats.t.sf(t_hand, 3), rel=1e-9)
    assert cmp.step_gain == 50 and cmp.step_gain_loss == pytest.approx(0.00225)
    gain = np.mean(old_losses) - np.mean(new_losses)
    assert cmp.loss_gain == pytest.approx(gain)
    assert cmp.statistic == pytest.approx((gain + 0.00225) / math.sqrt(0.5)) and cmp.significant
    # other seeds: Welch, with the Welch-Satterthwaite degrees of freedom
    new = track3.SetResult(3200, 3200, True, new_losses, [4, 5, 6, 7], [])
    cmp = track3.compare_sets(old, new)
    a, b = np.asarray(old_losses), np.asarray(new_losses) - 0.00225
    va, vb = a.var(ddof=1) / 4, b.var(ddof=1) / 4
    t_hand = (a.mean() - b.mean()) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / 3 + vb**2 / 3)
    assert cmp.test == "welch" and cmp.t_statistic == pytest.approx(t_hand, rel=1e-9)
    assert cmp.p_value == pytest.approx(stats.t.sf(t_hand, df), rel=1e-9)


# ----------------------------------------------------------------------------------------------- logs and tools


def test_runlog_reads_track3_logs_and_steps_to_target(tmp_path):
    path = write_track3_log(tmp_path / "official.txt", 3.27722)
    log = runlog.parse_log(path)
    assert log.finished and log.final_val == runlog.ValPoint(3250, 3.27722, 503750.0)  # 503.750s
    assert [p.step for p in log.val] == track3_val_steps(3250) and len(log.val) == 38
    # 3.27722 + 0.0045 k / 4 <= 3.28 for k <= 2.47: the first val at or below 3.28 is 3250 - 2 * 25 = 3200
    assert log.first_val_at_or_below(3.28).step == 3200 and log.first_val_at_or_below(3.0) is None
    summary = log.summary(3.28)
    assert summary["steps_to_target"] == 3200 and summary["train_time_to_target_s"] == pytest.approx(496.0)
    assert summary["final_val_loss"] == 3.27722 and log.target(2.92) == 2.92  # no config: the default
    ours = runlog.parse_log(write_track3_log(tmp_path / "ours.txt", 3.2790, fmt="ours", seed=3, target=3.28))
    assert ours.target(2.92) == 3.28 and ours.seed == 3 and ours.summary(3.28)["steps_to_target"] == 3250
    # a line cut after the seconds' digits is not a progress line
    assert runlog.parse_progress_line("step:5/10 val_loss:3.3 train_time:12.5") is None
    assert runlog.parse_progress_line("step:5/10 val_loss:3.3 train_time:12.5s")[2]["train_time"] == 12500.0


def test_monitor_uses_each_runs_target(tmp_path, capsys):
    d = tmp_path / "logs"
    write_track3_log(d / "t3-s0.txt", 3.2770, fmt="ours", seed=0, target=3.28)
    write_track3_log(d / "official.txt", 3.2770)
    rows = {r.tag: r for r in monitor_runs.collect_runs([str(d)], target=None, stall_s=1e9)}
    assert (rows["t3-s0"].target, rows["t3-s0"].target_step) == (3.28, 3200)  # its config names 3.28
    assert (rows["official"].target, rows["official"].target_step) == (2.92, None)  # no config: 2.92
    assert monitor_runs.main([str(d)]) == 0
    table = capsys.readouterr().out
    assert "<=target" in table and "yes@3200 (3.28)" in table
    assert monitor_runs.main([str(d), "--target", "3.28", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["target"], r["target_step"]) for r in rows] == [(3.28, 3200), (3.28, 3200)]


def test_make_record_track3_rule_and_pairwise_comparison(tmp_path, capsys):
    base = [write_track3_log(tmp_path / "base" / f"b{i}.txt", loss) for i, loss in enumerate(BASELINE_36)]
    finals = [round(3.2740 + o, 5) for o in (-0.0014, -0.001, -0.0006, -0.0002, 0.0002, 0.0006, 0.001, 0.0014)]
    new = [write_track3_log(tmp_path / "new" / f"n-s{i}.txt", loss, fmt="ours", seed=i, target=3.28)
           for i, loss in enumerate(finals)]
    records = str(tmp_path / "records")
    folder = make_record.make_record(new, "track3", "t", baseline=base, date="2026-01-02", records_dir=records)
    summary = json.loads(open(os.path.join(folder, "stats.json")).read())
    readme = open(os.path.join(folder, "README.md")).read()
    result = summary["track3"]
    # new set: mean 3.2740 at 3250, meets the rule first at 3150 (mean 3.2785, 0.0015 * sqrt(8) = 0.00424)
    assert summary["target"] == 3.28 and result["met"] and result["steps"] == 3150
    at = next(r for r in result["rows"] if r["step"] == 3150)
    assert at["mean"] == pytest.approx(3.2785, abs=1e-9) and at["statistic"] == pytest.approx(0.0015 * 8**0.5)
    # baseline #36: met at 3250 only (at 3225 the mean is 3.279784: 0.000216 * sqrt(10) = 0.00068)
    base_result = result["baseline"]
    assert base_result["steps"] == 3250 and base_result["met"]
    cmp = base_result["comparison"]
    # ((3.278659 - 3.2785) + 100 / 100 * 0.0045) / sqrt(1/10 + 1/8) = 0.004659 / 0.474342 = 0.0098220
    assert cmp["statistic"] == pytest.approx(0.004659 / math.sqrt(0.1 + 0.125), rel=1e-6) and cmp["significant"]
    assert cmp["test"] == "welch" and cmp["step_gain"] == 100  # the official logs carry no seeds
    at_3150 = np.asarray([round(f + 0.0045, 5) for f in finals])  # the new set's losses at its steps
    welch = stats.ttest_ind(BASELINE_36, at_3150 - 0.0045, equal_var=False, alternative="greater")
    assert cmp["p_value"] == pytest.approx(welch.pvalue, rel=1e-6)
    assert [r["steps_to_target"] for r in summary["runs"]] == [
        next(s for s in track3_val_steps(3250) if round(f + 0.0045 * (3250 - s) / 100, 5) <= 3.28) for f in finals]
    assert "first at step **3150**" in readme and "**significant**" in readme and "steps to 3.28 |" in readme
    assert "| 3150 | 8 | 3.27850 |" in readme and "record rule p < 0.01" not in readme
    # the same logs without --track track3: the speedrun's t-test, no benchmark section
    folder = make_record.make_record(new, "medium", "m", target=3.28, date="2026-01-02", records_dir=records)
    assert "record rule p < 0.01" in open(os.path.join(folder, "README.md")).read()
    # refusals: --baseline outside track3, a set mixing step counts; the CLI exits 2 with the message
    with pytest.raises(ValueError, match="--track track3"):
        make_record.make_record(new, "medium", "x", baseline=base, records_dir=records)
    short = write_track3_log(tmp_path / "short" / "s.txt", 3.279, total=3000)
    assert make_record.main([*new, short, "--track", "track3", "--name", "y", "--records-dir", records]) == 2
    assert "mix step counts [3000, 3250]" in capsys.readouterr().err


def test_sweep_spec_names_registered_optimizers_and_the_seeds():
    import launch_sweep
    from optimizers import OPTIMIZERS

    path = os.path.join(ROOT, "sweeps", "track3_optimizers.toml")
    sweep = launch_sweep.expand_spec(launch_sweep.load_spec(path), path)
    configs = ["muon", "ord_perp", "ord_half", "ord_full", "echo_layer", "echo_shape", "normuon"]
    assert [r.tag for r in sweep.runs] == [f"{c}-s{s}" for c in configs for s in range(16)]
    assert len(range(16)) == track3.seeds_needed(3.2787)  # the n the spec's comment derives
    assert all(r.flags["preset"] == "track3" and r.gpus == 8 for r in sweep.runs)
    ord_args = [r.flags.get("optimizer_args") for r in sweep.runs if r.tag.startswith("ord_") and r.seed == 0]
    assert ord_args == [{"spectral_lr_mul": 0.0, "decompose": True}, {"spectral_lr_mul": 0.5},
                        {"spectral_lr_mul": 1.0}]
    assert {r.flags["optimizer"] for r in sweep.runs} <= set(OPTIMIZERS)
    # every command parses, stays on the benchmark, and its optimizer builds on a (small) track3 model
    import train_gpt
    from config import parse_config, parse_optimizer_args
    from model import GPT

    tiny = ["--num-layers", "2", "--model-dim", "64", "--num-heads", "2", "--head-dim", "32", "--vocab-size", "96"]
    for run in sweep.runs[::16]:
        command = launch_sweep.build_command(run, sweep, ["torchrun"])
        assert command[2] == "--nproc_per_node=8"
        cfg = parse_config(command[4:])
        assert track3.preset_problems(cfg) == [] and cfg.num_iterations == 3250 and cfg.seed == 0
        assert parse_optimizer_args(cfg.optimizer_args) == run.flags.get("optimizer_args", {})
        small = parse_config([*command[4:], *tiny])
        matrix = train_gpt.build_optimizers(GPT(small), small)[1]
        assert type(matrix) is OPTIMIZERS[cfg.optimizer] and matrix.defaults["lr"] == cfg.lr


# ----------------------------------------------------------------------------------------------- the preset


def test_every_config_field_is_fixed_or_free():
    import dataclasses

    from config import Hyperparameters

    fields = {f.name for f in dataclasses.fields(Hyperparameters)}
    fixed, free = set(track3.FIXED_FIELDS), set(track3.FREE_FIELDS)
    assert not fixed & free and fixed | free == fields, (
        f"classify for --preset track3: unclassified {sorted(fields - fixed - free)}, "
        f"unknown {sorted((fixed | free) - fields)}")


def test_preset_is_the_baseline_recipe_and_parameter_count_matches_the_shapes():
    import torch

    from config import parse_config
    from model import GPT

    cfg = parse_config(["--preset", "track3"])
    assert (cfg.num_iterations, cfg.batch_tokens, cfg.seq_len, cfg.num_layers, cfg.model_dim) == (3250, 524288, 1024,
                                                                                                   12, 768)
    assert (cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.embed_lr, cfg.head_lr, cfg.scalar_lr) == (
        "muon", 0.025, 0.05, 0.7, 0.004, 0.015)
    assert cfg.adam_weight_decay == 0.001 and cfg.adam_eps * 524288 == 1e-10 and cfg.val_tokens == 20 * 524288
    with torch.device("meta"):
        model = GPT(cfg)
    # GPT-2 small (124M with tied embeddings and learned positions): 12 blocks of q, k, v, o (d x d + d each),
    # MLP d -> 4d -> d with biases and two norm gains; untied embedding and head (with bias); two global gains.
    V, d, L = 50304, 768, 12
    block = 4 * (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d) + 2 * d
    expected = V * d + L * block + (V * d + V) + 2 * d
    assert block == 7_086_336 and expected == 162_354_816
    assert sum(p.numel() for p in model.parameters()) == expected
    assert sum(p.numel() for p in model.blocks.parameters()) == 85_036_032  # the 85M hidden part of "124M"


def tiny_track3_args(*extra):
    return ["--preset", "track3", "--off-benchmark", "--num-layers", "2", "--model-dim", "64", "--num-heads", "2",
            "--head-dim", "32", "--vocab-size", "96", "--bos-id", "0", "--seq-len", "16", *extra]


def reference_forward(params: dict, idx, num_heads: int, softcap: float = 15.0, scale: float = 0.12):
    """The track-3 baseline architecture written out in float64 from its definition: RMSNorm with gains after the
    embedding; per block x += proj(attn(norm1(x))), x += mlp(norm2(x)); q, k RMS-normed, half-truncated rotary
    (head_dim/4 frequencies (1/1024)^linspace(0, 1), the rest unrotated), causal softmax with scale 0.12; ReLU^2
    MLP; final norm, head with bias, softcap 15 z / sqrt(z^2 + 225). Returns logits (B, T, V)."""
    import torch

    P = {k: v.detach().double() for k, v in params.items()}
    eps = torch.finfo(torch.float32).eps  # F.rms_norm's default for float32 inputs

    def norm(x, gain=None):
        y = x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)
        return y if gain is None else y * gain

    def rotate(x):  # (B, T, H, D)
        D = x.size(-1)
        freqs = torch.cat([(1 / 1024) ** torch.linspace(0, 1, D // 4, dtype=torch.float32),
                           torch.zeros(D // 4)]).double()
        angle = torch.arange(x.size(1), dtype=torch.float64)[:, None] * freqs  # (T, D/2)
        cos, sin = angle.cos()[None, :, None], angle.sin()[None, :, None]
        a, b = x[..., : D // 2], x[..., D // 2:]
        return torch.cat([a * cos + b * sin, b * cos - a * sin], -1)

    B, T = idx.shape
    x = norm(P["embed.weight"][idx], P["embed_gain"])
    layers = sorted({int(k.split(".")[1]) for k in P if k.startswith("blocks.")})
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i in layers:
        p = {k[len(f"blocks.{i}."):]: v for k, v in P.items() if k.startswith(f"blocks.{i}.")}
        h = norm(x, p["attn_gain"])
        q, k, v = (h @ p[f"attn.{n}_w"].T + p[f"attn.{n}_b"] for n in "qkv")
        q, k, v = (t.view(B, T, num_heads, -1) for t in (q, k, v))
        q, k = rotate(norm(q)), rotate(norm(k))
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
        weights = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        y = torch.einsum("bhqk,bkhd->bqhd", weights, v).reshape(B, T, -1)
        x = x + y @ p["attn.o_w"].T + p["attn.o_b"]
        h = norm(x, p["mlp_gain"])
        x = x + (torch.relu(h @ p["mlp.fc_w"].T + p["mlp.fc_b"]) ** 2) @ p["mlp.proj_w"].T + p["mlp.proj_b"]
    z = norm(x, P["final_gain"]) @ P["head.weight"].T + P["head.bias"]
    return softcap * z / torch.sqrt(z * z + softcap**2)


def test_forward_equals_a_minimal_reference_of_the_architecture():
    import torch
    import torch.nn.functional as F

    from config import parse_config
    from model import GPT

    cfg = parse_config(tiny_track3_args())
    torch.manual_seed(0)
    model = GPT(cfg)
    with torch.no_grad():  # every weight random (the init zeroes projections, biases; gains start at 1)
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.ndim < 2 else 1 / p.shape[-1] ** 0.5) + (1.0 if p.ndim < 2 else 0))
    idx = torch.randint(0, 96, (3, 16))
    targets = torch.randint(0, 96, (3, 16))
    masks = model.attention_masks(idx, 16, 8, use_flex=False)
    assert masks == {"long": None, "short": None}  # no document mask, no window: plain causal
    logits = model(idx, None, masks)
    expected = reference_forward(dict(model.named_parameters()), idx, num_heads=2)
    torch.testing.assert_close(logits.double(), expected, rtol=1e-5, atol=1e-5)
    loss = model(idx, targets, masks)
    torch.testing.assert_close(loss.double(), F.cross_entropy(expected.view(-1, 96), targets.view(-1)),
                               rtol=1e-5, atol=1e-6)
    # rows are independent sequences: the same row alone gives the same logits
    torch.testing.assert_close(model(idx[1:2], None, masks), logits[1:2], rtol=1e-5, atol=1e-6)


def test_optimizer_groups_are_the_baselines():
    """Muon on the 2-D block weights; AdamW on the embedding (lr 0.7), the head weight (0.004) and every 1-D
    parameter (0.015: biases, the head's bias, norm gains), all with weight decay 0.001: the baseline's split."""
    import train_gpt
    from config import parse_config
    from model import GPT

    cfg = parse_config(tiny_track3_args())
    model = GPT(cfg)
    adam, matrix = train_gpt.build_optimizers(model, cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["lr"]: sorted(names[id(p)] for p in g["params"]) for g in adam.param_groups}
    assert groups[0.7] == ["embed.weight"] and groups[0.004] == ["head.weight"]
    assert groups[0.015] == sorted(n for n, p in model.named_parameters() if p.ndim < 2)
    assert "head.bias" in groups[0.015] and "embed_gain" in groups[0.015] and "blocks.1.attn.o_b" in groups[0.015]
    assert {g["weight_decay"] * g["weight_decay_mul"] for g in adam.param_groups} == {0.001}
    assert adam.defaults["eps"] == 1e-10 / 524288
    muon = sorted(names[id(p)] for g in matrix.param_groups for p in g["params"])
    assert muon == sorted(n for n, p in model.blocks.named_parameters(prefix="blocks") if p.ndim == 2)
    assert len(muon) == 2 * 6 and {g["weight_decay"] * g["weight_decay_mul"] for g in matrix.param_groups} == {0.05}


def test_schedule_at_its_boundary_steps():
    from config import parse_config
    from schedules import lr_multiplier, momentum_at, validation_due, warmup_plan

    cfg = parse_config(["--preset", "track3"])
    # stable for progress < 0.3, then linear to 0 over the last 70% (step / 3250; 975 / 3250 = 0.3 exactly)
    assert [lr_multiplier(cfg, s) for s in (0, 974, 975)] == [1.0, 1.0, 1.0]
    assert lr_multiplier(cfg, 976) == pytest.approx((1 - 976 / 3250) / 0.7, rel=1e-12)
    assert lr_multiplier(cfg, 2000) == pytest.approx(1250 / 3250 / 0.7, rel=1e-12)
    assert lr_multiplier(cfg, 3249) == pytest.approx(1 / 3250 / 0.7, rel=1e-12)
    assert {momentum_at(cfg, s) for s in (0, 1, 150, 299, 300, 3249)} == {0.95}  # no momentum warm-up
    # validation: every 125 steps while step / 3250 < 0.9, then every 25 (from 2925 = 0.9 * 3250), and the end
    due = [s for s in range(3251) if validation_due(cfg, s)]
    assert due == track3_val_steps(3250) and len(due) == 38
    assert due[22:26] == [2750, 2875, 2925, 2950] and 2900 not in due and due[-2:] == [3225, 3250]
    # no window or batch to change: the compile warm-up is the first warmup_steps steps, no transition after step 0
    assert warmup_plan(cfg) == list(range(cfg.warmup_steps)) == list(range(10))


def test_flags_that_leave_the_benchmark_are_refused(tmp_path, capsys):
    import train_gpt
    from config import ConfigError, parse_config, validate_config

    demo = os.path.join(ROOT, "data", "demo")
    data = ["--train-files", os.path.join(demo, "demo_train_*.bin"),
            "--val-files", os.path.join(demo, "demo_val_*.bin")]
    refused = [["--num-layers", "2"], ["--batch-tokens", "262144"], ["--no-linear-bias"], ["--seq-len", "2048"],
               ["--val-loss-target", "3.3"], ["--val-seq-len", "1000"], ["--mtp-weights", "1,0.5"],
               ["--pack-documents"], ["--smear"], data]
    for flags in refused:
        with pytest.raises(ConfigError, match="would leave the benchmark") as info:
            validate_config(parse_config(["--preset", "track3", *flags]), 1)
        assert flags[0] in str(info.value) and "--off-benchmark" in str(info.value)
    # free: the optimizer and its settings, schedules, init, steps, memory splits, validation cadence
    free = parse_config(["--preset", "track3", "--optimizer", "spectral_ord", "--optimizer-args", "spectral_lr_mul=1",
                         "--lr", "0.02", "--weight-decay", "0", "--num-iterations", "3000", "--hidden-init", "uniform",
                         "--micro-batch-tokens", "32768", "--val-seq-len", "16384", "--val-loss-every-late", "50",
                         "--scalar-weight-decay-mul", "0", "--cautious-weight-decay",
                         "--momentum-cooldown-steps", "50"])
    assert track3.preset_problems(free) == [] and track3.benchmark_deviations(free) == []
    # --off-benchmark lets the run start and the log says what changed
    off = parse_config(["--preset", "track3", "--num-layers", "2", "--off-benchmark"])
    assert track3.preset_problems(off) == [] and track3.benchmark_deviations(off) == ["num_layers"]
    statement = track3.benchmark_statement(off)
    assert "OFF the optimizer benchmark" in statement and "--num-layers 2" in statement
    on = track3.benchmark_statement(parse_config(["--preset", "track3"]))
    for text in ("12 layers", "d 768", "524288 tokens/step", "3250 steps", "3.28", "sqrt(n) >= 0.004"):
        assert text in on
    assert track3.benchmark_statement(parse_config(["--preset", "cpu-tiny"])) is None
    # the CLI: exit code 2, the message names the flag, nothing is written
    assert train_gpt.main(["--preset", "track3", "--num-layers", "2", "--log-dir", str(tmp_path)]) == 2
    assert "--num-layers 2: the run would leave the benchmark" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_dry_run_prints_the_benchmark_statement_config_and_schedule(monkeypatch, capsys):
    import train_gpt

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert train_gpt.main(["--preset", "track3", "--dry-run"]) == 0  # no FineWeb here: the dry run reads no data
    out = capsys.readouterr().out
    config = json.loads(out[len("config: "):out.index("\n\npreset track3:")])
    assert (config["num_iterations"], config["batch_tokens"], config["num_layers"], config["model_dim"]) == (
        3250, 524288, 12, 768)
    statement = next(line for line in out.splitlines() if line.startswith("benchmark: optimizer benchmark"))
    for text in ("3250 steps", "524288 tokens/step", "12 layers", "d 768", "target val loss 3.28"):
        assert text in statement
    assert "preset track3: 3250 steps, world size 1, 8 accumulation step(s)" in out
    # the schedule: lr flat to step 975 (975 / 3250 = 0.3), then linear to 0; one batch size, no window to change
    rows = [line.split() for line in out.splitlines() if line[:1].isdigit() or line.startswith("final val")]
    assert [r[0] for r in rows] == ["0-975", "976-3249", "final"]
    assert rows[0][1:4] == ["524,288", "8", "x"] and rows[1][5] == "1.000->0.000"
    assert "transition steps: [0]" in out
    assert "every 125 steps, every 25 from step 2925 (val_late_start 0.9) and at the end: 38 validations" in out
    # a flag that leaves the benchmark: refused before anything is printed, unless --off-benchmark
    assert train_gpt.main(["--preset", "track3", "--dry-run", "--num-layers", "2"]) == 2
    captured = capsys.readouterr()
    assert "would leave the benchmark" in captured.err and captured.out == ""
    assert train_gpt.main(["--preset", "track3", "--dry-run", "--num-layers", "2", "--off-benchmark"]) == 0
    assert "benchmark: OFF the optimizer benchmark (--off-benchmark): changed --num-layers 2" in capsys.readouterr().out


def test_plain_causal_attention_runs_several_rows_per_forward_on_cuda(monkeypatch, demo_data_dir):
    """Without a document mask or window, the one-row rule of FlexAttention does not apply: the CUDA checks accept
    64 training rows per forward, and validation scores rows of seq_len on the FlexAttention path too."""
    import torch

    import config as config_module
    import train_gpt
    from config import ConfigError, parse_config, validate_config
    from model import GPT

    monkeypatch.setattr(config_module.torch.cuda, "is_available", lambda: True)
    cfg = parse_config(["--preset", "track3", "--device", "cuda"])
    assert validate_config(cfg, 8, check_data=False) == 1
    masked = parse_config(["--preset", "track3", "--device", "cuda", "--doc-mask", "--off-benchmark"])
    with pytest.raises(ConfigError, match="one row per forward"):
        validate_config(masked, 8, check_data=False)
    monkeypatch.undo()
    val_files = os.path.join(demo_data_dir, "demo_val_*.bin")
    small = parse_config(tiny_track3_args("--vocab-size", "50304", "--seq-len", "64", "--val-seq-len", "256",
                                          "--val-tokens", "1024", "--val-files", val_files))
    torch.manual_seed(0)
    model = GPT(small)
    with torch.no_grad():  # a non-trivial model (the init zeroes the projections and the head)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    device = torch.device("cpu")
    flex_path = train_gpt.evaluate(model, small, 0, 0, 1, device, use_flex=True)
    dense_path = train_gpt.evaluate(model, small, 0, 0, 1, device, use_flex=False)
    assert flex_path == pytest.approx(dense_path, rel=1e-6) and 5 < flex_path < 20


@pytest.fixture(scope="module")
def chain_shards(tmp_path_factory):
    """Tokens of a noisy cycle over 512 ids (next = 7 x + 3 mod 512, 10% random): learnable in a few steps."""
    from data.shards import write_shard

    out = tmp_path_factory.mktemp("chain")
    rng = np.random.default_rng(0)
    for name, n in (("chain_val_000000.bin", 4096), ("chain_train_000001.bin", 40000)):
        tokens = np.zeros(n, dtype=np.int64)
        noise, random_ids = rng.random(n) < 0.1, rng.integers(0, 512, n)
        for t in range(1, n):
            tokens[t] = random_ids[t] if noise[t] else (7 * tokens[t - 1] + 3) % 512
        write_shard(str(out / name), tokens.astype(np.uint16))
    return str(out / "chain_train_*.bin"), str(out / "chain_val_*.bin")


@pytest.mark.slow
def test_tiny_run_of_the_preset_recipe(tmp_path, chain_shards):
    """The track3 recipe (biases, gains, causal rows, Muon + AdamW with weight decay, the late validation cadence,
    the steps-to-target line) at 2 layers, d 64 and a 512-token vocabulary, through train_gpt.py."""
    import subprocess
    import sys

    train_files, val_files = chain_shards
    args = tiny_track3_args() + [
        "--vocab-size", "512", "--seq-len", "64", "--micro-batch-tokens", "256", "--batch-tokens", "512",
        "--val-seq-len", "256", "--val-tokens", "2048", "--train-files", train_files,
        "--val-files", val_files, "--num-iterations", "30", "--val-loss-every", "10", "--val-loss-every-late", "4",
        "--val-late-start", "0.75", "--val-loss-target", "3.5", "--no-compile", "--warmup-steps", "0",
        "--run-id", "tiny", "--log-dir", str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train_gpt.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = runlog.parse_log(tmp_path / "tiny.txt")
    assert log.finished and log.config["preset"] == "track3" and log.config["off_benchmark"] is True
    assert log.config["linear_bias"] and log.config["norm_gains"] and log.config["adam_weight_decay"] == 0.001
    assert [p.step for p in log.val] == [0, 10, 20, 24, 28, 30]  # every 10, then every 4 from 0.75 * 30
    assert log.val[0].loss == pytest.approx(math.log(512), abs=0.05)  # zero head: uniform logits at step 0
    assert log.final_val.loss < log.val[0].loss - 2.0  # measured 6.24 -> 2.96
    text = open(tmp_path / "tiny.txt").read()
    assert "benchmark: OFF the optimizer benchmark (--off-benchmark): changed --vocab-size 512" in text
    reached = log.first_val_at_or_below(3.5)
    assert reached is not None and f"steps to target val_loss 3.5: {reached.step}\n" in text
    # without --off-benchmark the same command is refused before any work
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train_gpt.py"),
                           *[a for a in args if a != "--off-benchmark"], "--run-id", "refused"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "would leave the benchmark" in proc.stderr
    assert not os.path.exists(tmp_path / "refused.txt")


@pytest.mark.slow
def test_gpu_cost_script_runs_small_on_the_cpu(tmp_path):
    """bench/track3_step_cost.py (what bench/gpu_track3.sh runs on one GPU) at its tiny size, so it cannot rot."""
    import subprocess

    env = dict(os.environ, OMP_NUM_THREADS="1", TRACK3_SIZE="tiny", TIMED_STEPS="3")
    proc = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_track3.sh"), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    log = runlog.parse_log(tmp_path / summary["log"])
    times = {p.step: p.train_time_ms for p in log.train}
    assert summary["size"] == "tiny" and summary["timed_steps"] == 3 and log.total_steps == 4
    assert summary["step_ms"] == pytest.approx((times[4] - times[1]) / 3)  # steps 2..4, after 1 untimed step
    assert summary["step_ms_each"] == [times[s] - times[s - 1] for s in (2, 3, 4)]
    assert summary["estimate_full_run"]["validations"] == 38 and summary["val_s"] >= 0
    assert summary["model"]["parameters_m"] > 0 and "torch" in summary and "triton" in summary
    assert "track3 on one device" in proc.stdout
