"""bench/optimizer_race.py: the specs it writes, grid extension, its statistics against hand computations, the
controls, and the whole toy protocol end to end (real train_gpt.py runs through launch_sweep.py, timing, report)
so the race cannot rot."""
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


def test_specs_pair_seeds_and_keep_the_tune_seed_out():
    protocol = race.PROTOCOLS["cpu"]
    contenders, left_out = race.select_contenders(protocol, None, tune_all=False)
    names = [c.name for c in contenders]
    assert names == [n for n in protocol.contenders if n not in left_out]
    assert all("not registered" in why for why in left_out.values())
    assert protocol.tune_seed not in protocol.seeds + protocol.aa_seeds and len(protocol.seeds) >= 5
    assert not set(protocol.seeds) & set(protocol.aa_seeds)
    grids = race.current_grids(protocol, contenders, "/nonexistent")
    tuned = {c.name for c in contenders if c.lr_from is None}
    # the ORD variants and the brake take Muon's lr, the fixed echo curve the fitted one's
    assert tuned == {"adamw", "muon", "normuon", "echo", "echo_plateau", "echo_reverb"} and not left_out
    assert all(len(grid) >= 5 and grid == sorted(grid) for grid in grids.values())
    tune = race.tune_spec(protocol, contenders, grids, protocol.flags, "/tmp/x")
    assert {cfg["tag"] for cfg in tune["configs"]} == {f"{n}-lr{race.lr_text(lr)}" for n in tuned for lr in grids[n]}
    assert tune["seeds"] == [protocol.tune_seed]

    chosen = {"adamw": 3e-3, "muon": 0.028, "echo": 0.04, "normuon": 0.02, "echo_plateau": 0.057,
              "echo_reverb": 0.04}
    chosen.update({c.name: chosen[c.lr_from] for c in contenders if c.lr_from})
    final = launch_sweep.expand_spec(race.final_spec(protocol, contenders, chosen, protocol.flags, "/tmp/x"), "f")
    assert {run.tag for run in final.runs} == {race.run_tag(n, chosen[n], s) for n in names for s in protocol.seeds}
    aa = launch_sweep.expand_spec(race.aa_spec(protocol, contenders, chosen, protocol.flags, "/tmp/x"), "aa")
    assert {run.tag for run in aa.runs} == {race.run_tag("muon", 0.028, s) for s in protocol.aa_seeds}
    for run in final.runs:  # every command is one train_gpt.py accepts, with the intended optimizer and lr
        command = launch_sweep.build_command(run, final, ["torchrun"])
        cfg = train_gpt.parse_config(command[command.index(final.train_script) + 1:])
        contender = run.tag.split("-lr")[0]
        assert cfg.lr == chosen[contender] and cfg.num_iterations == protocol.flags["num_iterations"]
        assert cfg.preset == "cpu-bytes" and cfg.sample_rows and cfg.batch_tokens // cfg.micro_batch_tokens == 4
        args = train_gpt.parse_optimizer_args(cfg.optimizer_args)
        if contender.startswith("ord_"):
            assert cfg.optimizer == "spectral_ord" and args["decompose"] is True and args["diagnostics_every"] == 10
        if contender == "brake":
            assert cfg.optimizer == "spectral_ord" and args == {"brake_outward": 0.5}
        if contender == "echo_fixed":
            assert cfg.optimizer == "spectral_echo" and args == {"mode": "fit", "c_rel": race.ECHO_FIXED_C_REL}
        if contender.startswith("echo_") and contender != "echo_fixed":
            assert args["fit_every"] == protocol.echo_fit_every and args["mode"] in ("plateau", "reverb_svd")

    all_tuned, _ = race.select_contenders(protocol, ["muon", "ord_gperp"], tune_all=True)
    assert all(c.lr_from is None for c in all_tuned)
    alone, _ = race.select_contenders(protocol, ["ord_par1.0"], tune_all=False)  # its source is not racing
    assert alone[0].lr_from is None
    with pytest.raises(ValueError, match="unknown contenders"):
        race.select_contenders(protocol, ["muon", "lion"], tune_all=False)


def test_extend_grid_adds_one_point_beyond_the_edge():
    grid = [0.01, 0.02, 0.04]
    assert race.extend_grid(grid, [3.0, 2.0, 2.5]) is None  # interior
    assert race.extend_grid(grid, [2.0, 2.1, 2.5]) == [0.005, 0.01, 0.02, 0.04]
    assert race.extend_grid(grid, [3.0, 2.5, 2.0]) == [0.01, 0.02, 0.04, 0.08]
    assert race.extend_grid([0.014, 0.02, 0.028], [3.0, 2.9, 2.8]) == [0.014, 0.02, 0.028, 0.039]
    assert race.extend_grid(grid, [2.0, 2.5, math.inf]) == [0.005, 0.01, 0.02, 0.04]  # diverged runs lose


def test_statistics_match_hand_computations():
    a, b = [3.10, 3.14, 3.12, 3.20, 3.05], [3.15, 3.16, 3.18, 3.24, 3.09]
    out = race.paired_stats(a, b)
    d = np.subtract(a, b)
    se = d.std(ddof=1) / math.sqrt(len(d))
    assert out["n"] == 5 and out["mean_diff"] == pytest.approx(d.mean())
    assert out["t"] == pytest.approx(d.mean() / se, rel=1e-12)
    assert out["p"] == pytest.approx(2 * stats.t.sf(abs(d.mean() / se), 4), rel=1e-9)
    half = stats.t.ppf(0.975, 4) * se
    assert (out["ci_low"], out["ci_high"]) == (pytest.approx(d.mean() - half), pytest.approx(d.mean() + half))
    partial = race.paired_stats([3.0, None, 3.2, math.inf], [3.1, 3.0, 3.1, 3.0])  # only complete pairs count
    assert partial["n"] == 2 and partial["mean_diff"] == pytest.approx(0.0)
    assert math.isnan(race.paired_stats([1.0], [2.0])["p"])
    # Holm: sorted p times (m - i), running maximum, capped at 1
    assert race.holm({"x": 0.01, "y": 0.04, "z": 0.03, "w": math.nan}) == \
        {"x": pytest.approx(0.03), "y": pytest.approx(0.06), "z": pytest.approx(0.06), "w": pytest.approx(math.nan,
                                                                                                           nan_ok=True)}
    points = [runlog.ValPoint(0, 10.8, 0.0), runlog.ValPoint(20, 7.0, 2000.0), runlog.ValPoint(40, 6.0, 4100.0)]
    assert race.steps_to_target(points, 6.5) == pytest.approx(30.0)  # halfway between 7.0 and 6.0
    assert race.steps_to_target(points, 7.0) == 20.0 and race.steps_to_target(points, 5.0) is None


def _results(adamw, muon):
    return {name: {"final_val_loss": losses, "vs_muon": race.paired_stats(losses, muon) if name != "muon" else None,
                   "family": "baseline"} for name, losses in (("adamw", adamw), ("muon", muon))}


def test_controls_pass_and_fail_as_specified():
    protocol = race.PROTOCOLS["cpu"]
    muon = [2.30, 2.32, 2.29, 2.35, 2.31]
    aa = [{"final_val_loss": x} for x in (2.31, 2.30, 2.33, 2.32, 2.30)]
    interior = {"adamw": "interior", "muon": "interior"}
    good = race.evaluate_controls(protocol, _results([2.45, 2.48, 2.44, 2.50, 2.47], muon), aa, interior)
    assert good["positive"]["passed"] and good["aa"]["passed"] and good["tuning"]["passed"] and good["passed"]
    tie = race.evaluate_controls(protocol, _results([2.31, 2.30, 2.30, 2.36, 2.30], muon), aa, interior)
    assert not tie["positive"]["passed"] and not tie["passed"]
    shifted = [{"final_val_loss": x + 0.1} for x in muon]  # a "Muon" that differs from Muon: the A/A check fails
    assert not race.evaluate_controls(protocol, _results([2.45] * 5, muon), shifted, interior)["aa"]["passed"]
    edge = race.evaluate_controls(protocol, _results([2.45, 2.48, 2.44, 2.50, 2.47], muon), aa,
                                  {"adamw": "interior", "muon": "high edge"})
    assert not edge["tuning"]["passed"] and "muon" in edge["tuning"]["why"] and not edge["passed"]


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

    # tuning: a 2-point grid always has its best lr at an edge, so each grid grew by its one allowed point, and
    # the chosen lr is the argmin of the tune-seed runs' final losses over the grown grid, read here from the logs
    grids = json.loads((out / "grids.json").read_text())
    for name in ("adamw", "muon"):
        assert len(grids[name]) == 3 and set(protocol.lr_grids[name]) < set(grids[name])
        losses = {lr: runlog.parse_log(runlog.log_path(str(logs), race.run_tag(name, lr, 0))).final_val.loss
                  for lr in grids[name]}
        assert doc["chosen_lr"][name] == min(losses, key=losses.get)
    assert doc["chosen_lr"]["ord_par1.0"] == doc["chosen_lr"]["muon"]

    # per contender: the record's lists in seed order, recomputed from the logs, and the paired test vs Muon
    finals = {}
    for name in ("adamw", "muon", "ord_par1.0"):
        res = doc["contenders"][name]
        parsed = [runlog.parse_log(runlog.log_path(str(logs), race.run_tag(name, res["lr"], s)))
                  for s in protocol.seeds]
        finals[name] = [log.final_val.loss for log in parsed]
        assert res["final_val_loss"] == finals[name] and res["seeds"] == list(protocol.seeds)
        assert res["steps_to_target"] == [race.steps_to_target(log.val, doc["target"]) for log in parsed]
        assert res["lr"] == doc["chosen_lr"][name]
    for name in ("adamw", "ord_par1.0"):
        p_hand = stats.ttest_rel(finals[name], finals["muon"]).pvalue
        assert doc["contenders"][name]["p_vs_muon"] == pytest.approx(p_hand)
    assert doc["contenders"]["muon"]["p_vs_muon"] is None
    # the A/A control compares Muon with its runs on the other seeds; the controls decide what README.md shows
    aa = [runlog.parse_log(runlog.log_path(str(logs), race.run_tag("muon", doc["chosen_lr"]["muon"], s))).final_val.loss
          for s in protocol.aa_seeds]
    assert doc["controls"]["aa"]["aa_final_val_loss"] == aa
    assert set(doc["controls"]) == {"positive", "aa", "tuning", "passed"}
    readme = (out / "README.md").read_text()
    assert "## Controls" in readme and "launch_sweep.py" in readme
    assert ("## Verdicts" in readme) == doc["controls"]["passed"]
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert doc["diagnostics"]["ord_par1.0"]["files"] == 2 and doc["diagnostics"]["ord_par1.0"]["by_step"]
    for t in doc["timing"].values():  # shares in (0, 1), the parts add up to no more than the whole step
        assert 0 < t["matrix_share"] < 1 and t["steps"] == protocol.timing_steps
        assert t["matrix_ms_mean"] + t["adam_ms_mean"] <= t["total_ms_mean"]
    # resumable: a second call runs nothing new and writes the same numbers
    runs_before = sorted(p.name for p in logs.glob("*.txt"))
    assert race.main(["--protocol", "toy", "--out", str(out), "--log-dir", str(logs), "--stage", "report",
                      "--flag", f"train_files={train}", "--flag", f"val_files={val}"]) == 0
    assert sorted(p.name for p in logs.glob("*.txt")) == runs_before
    assert json.loads((out / "results.json").read_text())["contenders"] == doc["contenders"]


def test_bad_arguments_are_refused(tmp_path, capsys):
    assert race.main(["--protocol", "toy", "--out", str(tmp_path), "--contenders", "muon,nope"]) == 2
    assert "unknown contenders" in capsys.readouterr().err
    assert race.main(["--protocol", "toy", "--out", str(tmp_path), "--flag", "num_iterations"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
    assert race.main(["--protocol", "toy", "--out", str(tmp_path), "--contenders", "adamw"]) == 2
    assert "Muon must race" in capsys.readouterr().err


def test_timing_sequential_path_matches_the_interleaved_one(tmp_path):
    """The one-contender-at-a-time path (used on CUDA) measures the same phases; run here on CPU."""
    from dataclasses import replace

    train, val = _write_zipf_shards(tmp_path)
    toy = race.PROTOCOLS["toy"]
    flags = {**toy.flags, "train_files": train, "val_files": val}
    contenders, _ = race.select_contenders(toy, ["muon", "ord_par1.0"], tune_all=False)
    lrs = {"muon": 0.02, "ord_par1.0": 0.02}
    for protocol in (toy, replace(toy, cpu=False)):
        timing = race.time_optimizer_steps(protocol, contenders, lrs, flags, steps=2, warmup=1)
        assert set(timing) == {"muon", "ord_par1.0"}
        for t in timing.values():
            assert t["steps"] == 2 and 0 < t["matrix_share"] < 1
            assert t["forward_backward_ms_mean"] + t["adam_ms_mean"] + t["matrix_ms_mean"] == \
                pytest.approx(t["total_ms_mean"], rel=1e-6)
