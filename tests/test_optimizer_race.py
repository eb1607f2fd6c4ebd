"""bench/optimizer_race.py: the specs it writes, its statistics against hand computations, and the whole toy
protocol end to end (real train_gpt.py runs through launch_sweep.py, timing, report) so the race cannot rot."""
import json
import math
import os

import numpy as np
import pytest
from scipy import stats

import launch_sweep
import runlog
import train_gpt
from bench import optimizer_race as race

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_specs_tune_only_tuned_contenders_and_reuse_the_tune_seed_run():
    protocol = race.PROTOCOLS["cpu"]
    contenders = race.select_contenders(protocol, None, tune_all=False)
    names = [c.name for c in contenders]
    assert names == list(protocol.contenders)
    tune = race.tune_spec(protocol, contenders, protocol.flags, "/tmp/x")
    tuned = {c.name for c in contenders if c.lr_from is None}
    assert tuned == {"adamw", "muon", "echo"}  # the ORD variants take Muon's lr
    expected = {f"{c.name}-lr{race.lr_text(lr)}" for c in contenders if c.lr_from is None
                for lr in protocol.lr_grids[c.grid]}
    assert {cfg["tag"] for cfg in tune["configs"]} == expected and tune["seeds"] == [protocol.tune_seed]

    chosen = {"adamw": 3e-3, "muon": 0.02, "echo": 0.04}
    chosen.update({c.name: chosen[c.lr_from] for c in contenders if c.lr_from})
    final = race.final_spec(protocol, contenders, chosen, protocol.flags, "/tmp/x")
    sweep = launch_sweep.expand_spec(final, "final.json")
    tags = {run.tag for run in sweep.runs}
    assert tags == {race.run_tag(n, chosen[n], s) for n in names for s in protocol.seeds}
    # the tune-seed run at the chosen lr has the same tag in both specs, so launch_sweep skips it
    tune_tags = {run.tag for run in launch_sweep.expand_spec(tune, "tune.json").runs}
    assert {race.run_tag(n, chosen[n], protocol.tune_seed) for n in tuned} <= tune_tags & tags
    for run in sweep.runs:  # every command is one train_gpt.py accepts, with the intended optimizer and lr
        command = launch_sweep.build_command(run, sweep, ["torchrun"])
        cfg = train_gpt.parse_config(command[command.index(sweep.train_script) + 1:])
        contender = run.tag.split("-lr")[0]
        assert cfg.lr == chosen[contender] and cfg.num_iterations == protocol.flags["num_iterations"]
        if contender.startswith("ord_"):
            args = train_gpt.parse_optimizer_args(cfg.optimizer_args)
            assert cfg.optimizer == "spectral_ord" and args["decompose"] is True and args["diagnostics_every"] == 10

    all_tuned = race.select_contenders(protocol, ["muon", "ord_gperp"], tune_all=True)
    assert all(c.lr_from is None for c in all_tuned)
    alone = race.select_contenders(protocol, ["ord_par1.0"], tune_all=False)  # its source is not racing
    assert alone[0].lr_from is None
    with pytest.raises(ValueError, match="unknown contenders"):
        race.select_contenders(protocol, ["muon", "lion"], tune_all=False)


def test_statistics_match_hand_computations():
    a, b = [3.10, 3.14, 3.12], [3.20, 3.25, 3.21, 3.24]
    t, p = race.welch_vs(a, b)
    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    t_hand = (np.mean(a) - np.mean(b)) / math.sqrt(va + vb)
    dof = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))  # Welch-Satterthwaite
    assert t == pytest.approx(t_hand, rel=1e-12)
    assert p == pytest.approx(2 * stats.t.sf(abs(t_hand), dof), rel=1e-9)
    assert all(math.isnan(x) for x in race.welch_vs([3.0], b))
    mean, std = race.mean_std(a)
    assert mean == pytest.approx(3.12) and std == pytest.approx(0.02)
    points = [runlog.ValPoint(0, 10.8, 0.0), runlog.ValPoint(20, 7.0, 2000.0), runlog.ValPoint(40, 6.5, 4100.0),
              runlog.ValPoint(60, 6.4, 6000.0)]
    assert race.to_target(points, 6.5) == (40, 4.1)
    assert race.to_target(points, 6.0) == (None, None)


def test_diagnostics_summary_pools_runs_and_skips_zero_weights(tmp_path):
    lines = {"a-s0": [{"step": 0, "matrices": [
        {"name": "blocks.0.attn.qkvo_w", "slice": 0, "w_norm": 1.0, "g_norm": 1.0, "rho": 0.1,
         "spectral_frac": 0.2, "term_ratio": 0.01, "cos_polar_w": -0.5},
        {"name": "blocks.0.attn.qkvo_w", "slice": 3, "w_norm": 0.0, "g_norm": 1.0, "rho": 0.0,
         "spectral_frac": 0.0, "term_ratio": 0.0, "cos_polar_w": 0.0},
        {"name": "blocks.0.attn.qkvo_w", "slice": 1, "w_norm": 1.0, "g_norm": 0.0, "rho": 0.0,
         "spectral_frac": 0.0, "term_ratio": 0.0, "cos_polar_w": 0.0}]},
        {"step": 10, "matrices": [{"name": "blocks.0.mlp.fc_w", "w_norm": 2.0, "g_norm": 1.0, "rho": 0.3,
                                   "spectral_frac": 0.4, "term_ratio": 0.02, "cos_polar_w": -0.1}]}],
        "a-s1": [{"step": 10, "matrices": [{"name": "blocks.0.mlp.fc_w", "w_norm": 2.0, "g_norm": 1.0, "rho": 0.5,
                                            "spectral_frac": 0.6, "term_ratio": 0.04, "cos_polar_w": -0.3}]}]}
    for tag, entries in lines.items():
        (tmp_path / f"{tag}.spectral_ord.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    summary = race.diagnostics_summary(str(tmp_path), ["a-s0", "a-s1", "missing-s2"])
    assert summary["files"] == 2
    assert summary["by_step"][0]["rho"]["n"] == 1  # the zero weight and the zero gradient are left out
    assert summary["by_step"][10]["cos_polar_w"]["min"] == -0.3 and summary["by_step"][10]["rho"]["max"] == 0.5
    assert set(summary["by_kind"]) == {"mlp_fc"}  # step 0 is not in the per-kind pool
    assert "| 10 |" in race.diagnostics_table(summary)


def _write_zipf_shards(directory):
    """Skewed synthetic tokens (a model learns their unigram statistics within a few steps)."""
    from data.shards import write_shard

    rng = np.random.default_rng(0)
    weights = 1.0 / np.arange(1, 2001) ** 1.1
    for name, n in (("zipf_val_000000.bin", 2048), ("zipf_train_000001.bin", 16384)):
        tokens = rng.choice(2000, size=n, p=weights / weights.sum()).astype(np.uint16)
        tokens[0] = 50256
        write_shard(str(directory / name), tokens)
    return str(directory / "zipf_train_*.bin"), str(directory / "zipf_val_*.bin")


@pytest.mark.slow
def test_toy_protocol_end_to_end(tmp_path, capsys):
    train, val = _write_zipf_shards(tmp_path)
    out, logs = tmp_path / "out", tmp_path / "logs"
    code = race.main(["--protocol", "toy", "--out", str(out), "--log-dir", str(logs),
                      "--flag", f"train_files={train}", "--flag", f"val_files={val}"])
    assert code == 0, capsys.readouterr().out
    doc = json.loads((out / "results.json").read_text())
    protocol = race.PROTOCOLS["toy"]

    # tuning: the chosen lr is the argmin of the tune-seed runs' final losses, read here from the logs
    tune_losses = {lr: runlog.parse_log(runlog.log_path(str(logs), race.run_tag("muon", lr, 0))).final_val.loss
                   for lr in protocol.lr_grids["muon"]}
    best = min(tune_losses, key=tune_losses.get)
    assert doc["chosen_lr"] == {"muon": best, "ord_par1.0": best}
    # the seed-0 run at the chosen lr ran once (tuning), not again in the final stage
    status = runlog.read_status(runlog.status_path(str(logs), race.run_tag("muon", best, 0)))
    assert status["attempt"] == 1 and not list(logs.glob("*.attempt*"))

    # statistics recomputed from the logs
    finals = {}
    for name in ("muon", "ord_par1.0"):
        res = doc["results"][name]
        parsed = [runlog.parse_log(runlog.log_path(str(logs), race.run_tag(name, best, s))) for s in protocol.seeds]
        losses = [log.final_val.loss for log in parsed]
        finals[name] = losses
        assert [r["final_val_loss"] for r in res["runs"]] == losses and res["n"] == 2
        assert res["final_val_mean"] == pytest.approx(np.mean(losses))
        assert res["final_val_std"] == pytest.approx(np.std(losses, ddof=1))
        for run, log in zip(res["runs"], parsed):
            hit = [p for p in log.val if p.loss <= doc["target"]]
            assert run["steps_to_target"] == (hit[0].step if hit else None)
    p_hand = stats.ttest_ind(finals["ord_par1.0"], finals["muon"], equal_var=False).pvalue
    assert doc["results"]["ord_par1.0"]["vs_muon"]["p_value"] == pytest.approx(p_hand)

    # ORD diagnostics written by train_gpt.py and pooled in the report
    assert doc["diagnostics"]["ord_par1.0"]["files"] == 2
    assert doc["diagnostics"]["ord_par1.0"]["by_step"]
    # timing: shares in (0, 1), the parts add up to no more than the whole step
    for t in doc["timing"].values():
        assert 0 < t["matrix_share"] < 1 and t["steps"] == protocol.timing_steps
        assert t["matrix_ms_mean"] + t["adam_ms_mean"] <= t["total_ms_mean"]
    readme = (out / "README.md").read_text()
    assert "`ord_par1.0`" in readme and "launch_sweep.py" in readme
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "ord_diagnostics.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "final.json").read_text())["seeds"] == list(protocol.seeds)


def test_bad_arguments_are_refused(tmp_path, capsys):
    assert race.main(["--protocol", "toy", "--out", str(tmp_path), "--contenders", "muon,nope"]) == 2
    assert "unknown contenders" in capsys.readouterr().err
    assert race.main(["--protocol", "toy", "--out", str(tmp_path), "--flag", "num_iterations"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err


def test_timing_sequential_path_matches_the_interleaved_one(tmp_path):
    """The one-contender-at-a-time path (used on CUDA) measures the same phases; run here on CPU."""
    from dataclasses import replace

    train, val = _write_zipf_shards(tmp_path)
    toy = race.PROTOCOLS["toy"]
    flags = {**toy.flags, "train_files": train, "val_files": val}
    contenders = race.select_contenders(toy, None, tune_all=False)
    lrs = {"muon": 0.02, "ord_par1.0": 0.02}
    for protocol in (toy, replace(toy, cpu=False)):
        timing = race.time_optimizer_steps(protocol, contenders, lrs, flags, steps=2, warmup=1)
        assert set(timing) == {"muon", "ord_par1.0"}
        for t in timing.values():
            assert t["steps"] == 2 and 0 < t["matrix_share"] < 1
            assert t["forward_backward_ms_mean"] + t["adam_ms_mean"] + t["matrix_ms_mean"] == \
                pytest.approx(t["total_ms_mean"], rel=1e-6)
