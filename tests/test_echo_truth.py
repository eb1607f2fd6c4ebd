"""The truth study (echo_truth.py, spectral_probe.py --truth): its truth and errors against direct computations
on synthetic replicas with a known gradient, and the command line end to end on a tiny checkpoint."""
import json
import math

import numpy as np
import pytest
import torch

import echo_truth
import spectral_probe
from optimizers import reverb
from optimizers.muon import muon_update
from tests.synthetic import spiked

pytestmark = pytest.mark.usefixtures("single_thread")  # small float64 SVDs


def test_momentum_input_is_muons():
    gen = torch.Generator().manual_seed(0)
    g, buf = torch.randn(2, 5, 7, generator=gen, dtype=torch.float64)
    for nesterov in (True, False):
        expected = muon_update(g, buf.clone(), 0.9, nesterov)
        torch.testing.assert_close(echo_truth.momentum_input(g, buf, 0.9, nesterov), expected)


def test_truth_accumulator_keeps_two_halves():
    acc = echo_truth.TruthAccumulator()
    for k in range(6):
        acc.add({"w": torch.full((2, 3), float(k))})
    a, b = acc.half_means("w")
    torch.testing.assert_close(a, torch.full((2, 3), 2.0, dtype=torch.float64))  # replicates 0, 2, 4
    torch.testing.assert_close(b, torch.full((2, 3), 3.0, dtype=torch.float64))  # replicates 1, 3, 5


def test_truth_for_a_known_gradient_matches_direct_computations():
    M, N = 20, 40
    gen = torch.Generator().manual_seed(1)
    G = spiked(M, N, [8.0, 5.0, 3.5], math.sqrt(N), gen)
    R = G + torch.randn(8, M, N, generator=gen, dtype=torch.float64)
    buf = G + 0.3 * torch.randn(M, N, generator=gen, dtype=torch.float64)
    recs = echo_truth.truth_for_matrix(R, G, G, buf, 0.9, True, k_list=(4, 8), plot_k=8)
    assert [(r["K"], r["atoms"]) for r in recs] == [(K, a) for K in (4, 8) for a in echo_truth.KINDS]
    by = {(r["K"], r["atoms"]): r for r in recs}
    for r in recs:  # halves equal to G: the truth has no noise of its own
        assert all(v == 0 or math.isnan(v) for v in r["floor"]["zeta"].values())  # NaN: an empty region
        assert r["regions"]["top"] >= 3 and sum(r["regions"].values()) == M
    # the truth of each kind is true_echo of that kind's matrix
    X = echo_truth.momentum_input(R.mean(0), buf, 0.9, True)
    torch.testing.assert_close(by[8, "momentum"]["curves"]["zeta_true"], reverb.true_echo(X, G)["zeta"])
    torch.testing.assert_close(by[8, "replica"]["curves"]["zeta_true"], reverb.true_echo(R[0], G)["zeta"])
    # errors are those of the estimate against that truth, by region
    est = reverb.reverb_echo(R, "none", "fieller")["zeta"]
    truth = reverb.true_echo(R[0], G)["zeta"]
    top = torch.arange(M) < 8  # the first rank bin of 8 atoms holds the 3 spikes: the top of the smoothed curve
    assert torch.equal(echo_truth.regions(truth, torch.linalg.svdvals(R[0]))["top"], top)
    assert by[8, "replica"]["zeta"][echo_truth.USERS_OPTIMIZER]["top"]["rmse"] == pytest.approx(
        float((est - truth)[top].pow(2).mean().sqrt()), rel=1e-9)
    # the amplitude estimates are optimizers/echo.py's cross-projections at each operating point
    from optimizers import echo
    torch.testing.assert_close(echo_truth.amplitude_estimate(R, "mean", buf, 0.9, True),
                               echo.estimate_echo(R, leave_one_out=True).mean_curve()[1])
    torch.testing.assert_close(echo_truth.amplitude_estimate(R, "replica", buf, 0.9, True),
                               echo.cross_project(R[:1], R[1:]).echo)
    torch.testing.assert_close(echo_truth.amplitude_estimate(R, "momentum", buf, 0.9, False),  # echo.py: no Nesterov
                               echo.cross_project(R[:4], R[4:], momentum_buffer=buf, momentum=0.9).echo)
    # separated spikes, isotropic noise: the reverb is good on the top atoms, msign is ~1 off in the bulk
    assert by[8, "replica"]["zeta"]["reverb:greedy_mean:fieller"]["top"]["rmse"] < 0.1
    assert by[8, "replica"]["zeta"]["msign"]["bulk"]["rmse"] > 0.8
    # cross-projection of replica 0's atoms with the other 7 is unbiased: small error on the strong atoms
    assert by[8, "replica"]["amplitude"]["cross_projection"]["top"]["rmse"] < 0.05
    assert by[8, "mean"]["plateau"]["true_top"] == pytest.approx(
        float(reverb.true_echo(R.mean(0), G)["zeta"][:echo_truth.PLATEAU_TOP].median()))


def test_estimates_reused_across_k_equal_each_estimator_run_on_the_first_k_replicas():
    gen = torch.Generator().manual_seed(2)
    G = spiked(12, 24, [6.0, 4.0, 3.9, 2.5], math.sqrt(24), gen)  # a near-degenerate pair: alignment matters
    R = G + torch.randn(8, 12, 24, generator=gen, dtype=torch.float64)
    got = echo_truth.reverb_estimates(reverb.replica_svds(R), R, (4, 6, 8))
    for K in (4, 6, 8):
        svds, mean = reverb.replica_svds(R[:K]), reverb.mean_svd(R[:K])
        for name in echo_truth.REVERB_VARIANTS:
            _, align, solver = name.split(":")
            torch.testing.assert_close(got[K][name], reverb.reverb_from_svds(svds, mean, align, solver)["zeta"],
                                       msg=f"{name} K={K}")
        torch.testing.assert_close(got[K]["cross_polar"], reverb.cross_polar_echo(R[:K])["zeta"])


def test_null_atoms_are_counted_apart_and_the_oracle_is_the_replicas_own_truth():
    # rank-4 replicas of a 10 x 16 matrix (rows spanned by 4 vectors, as layer 0's Q/K/V under few distinct
    # inputs): atoms 4.. are numerically null and belong to no region
    gen = torch.Generator().manual_seed(3)
    basis = torch.randn(4, 16, generator=gen, dtype=torch.float64)
    G = torch.randn(10, 4, generator=gen, dtype=torch.float64) @ basis
    R = G + 0.5 * torch.randn(6, 10, 4, generator=gen, dtype=torch.float64) @ basis
    recs = echo_truth.truth_for_matrix(R, G, G, None, 0.9, True, k_list=(4, 6), plot_k=6)
    for r in recs:
        assert r["regions"]["null"] == 6 and sum(r["regions"][g] for g in echo_truth.REGIONS) == 4
        assert sum(r["zeta"]["msign"][g]["n"] for g in echo_truth.REGIONS) == 4
    # regions follow the true zeta averaged over 8 atoms by rank: one atom's dip or spike does not move it
    zeta = torch.tensor([0.9] * 7 + [0.2] + [0.3] * 8 + [0.02] * 7 + [0.4] + [0.5] * 3, dtype=torch.float64)
    s = torch.cat([torch.logspace(0, -3, 24, dtype=torch.float64), torch.full((3,), 1e-9, dtype=torch.float64)])
    masks = echo_truth.regions(zeta, s)
    assert [int(masks[g].sum()) for g in ("top", "knee", "bulk", "null")] == [8, 8, 8, 3]
    assert masks["top"][7] and masks["bulk"][23] and masks["null"][24:].all()
    # the oracle: the median over the K replicas of each one's own true zeta, by rank
    rec = next(r for r in recs if r["K"] == 6 and r["atoms"] == "replica")
    own = torch.stack([reverb.true_echo(R[a], G)["zeta"] for a in range(6)]).median(0).values
    torch.testing.assert_close(rec["curves"]["zeta_oracle_replica_median"], own)
    # the single-atom share of a replica atom's echo: the largest term of zeta_i = sum_j <u_i,u_j><v_i,v_j>
    U, _, Vh = torch.linalg.svd(R[0])
    Ug, _, Vgh = torch.linalg.svd(G)
    terms = torch.stack([torch.stack([(U[:, i] @ Ug[:, j]) * (Vh[i] @ Vgh[j]) for j in range(10)])
                         for i in range(10)])
    torch.testing.assert_close(echo_truth.single_atom_overlap(U, Vh[:10].mT, Ug, Vgh[:10].mT),
                               terms.abs().amax(1))


def test_disjoint_row_batches_never_reuse_a_token(tmp_path):

    from data.shards import write_shard

    write_shard(str(tmp_path / "t_000000.bin"), np.arange(400, dtype=np.uint16))
    write_shard(str(tmp_path / "t_000001.bin"), np.arange(400, 700, dtype=np.uint16))
    batches = spectral_probe.random_row_batches(str(tmp_path / "t_*.bin"), 2, 9, seed=0, disjoint=True)
    seen = []
    for _ in range(20):  # 40 rows of 10 tokens out of 700: the tokens are their positions, so overlap shows
        x, y = next(batches)
        rows = torch.cat([x, y[:, -1:]], 1)
        assert (rows[:, 1:] - rows[:, :-1] == 1).all()  # each row is contiguous text
        seen += rows.flatten().tolist()
    assert len(seen) == len(set(seen)) == 400
    with pytest.raises(ValueError, match="no free room"):
        for _ in range(100):
            next(batches)


@pytest.mark.slow
def test_truth_command_line_end_to_end(tmp_path):
    from tests.test_train_gpt import TINY_ARGS, run_train_gpt
    from data.shards import write_shard


    rng = np.random.default_rng(0)
    for name, n in (("syn_val_000000.bin", 4096), ("syn_train_000001.bin", 20000)):
        write_shard(str(tmp_path / name), rng.integers(0, 50000, size=n).astype(np.uint16))
    run_train_gpt([*TINY_ARGS, "--train-files", str(tmp_path / "syn_train_*.bin"),
                   "--val-files", str(tmp_path / "syn_val_*.bin"), "--num-iterations", "3", "--val-loss-every", "0",
                   "--checkpoint-every", "2", "--checkpoint-dir", str(tmp_path / "ckpt"), "--run-id", "t",
                   "--log-dir", str(tmp_path)])
    ckpts = [str(tmp_path / "ckpt" / "t" / "step_000002")]
    out = tmp_path / "truth"
    args = ["--truth", "--checkpoint", *ckpts, "--out", str(out), "--truth-replicates", "8", "--k-list", "4",
            "--plot-k", "4", "--layers", "1"]
    assert spectral_probe.main(args) == 0
    recs = [json.loads(line) for line in open(out / "truth.jsonl")]
    assert {r["step"] for r in recs} == {2} and {r["atoms"] for r in recs} == set(echo_truth.KINDS)
    assert {r["type"] for r in recs} >= {"q", "k", "v", "o", "mlp_in", "mlp_out"}
    text = (out / "summary.md").read_text()
    for phrase in ("Enough replicates", "Alignment", "monotone", "O(1) constants", "stable over training"):
        assert phrase in text
    assert (out / "truth_step2.png").exists()
    assert json.load(open(out / "meta.json"))["n_truth"] == 8
    assert spectral_probe.main(["--summarize", str(out)]) == 0  # rebuilt from the JSONL alone
    import gzip
    import shutil
    with open(out / "truth.jsonl", "rb") as src, gzip.open(out / "truth.jsonl.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)  # how a large study is committed
    (out / "truth.jsonl").unlink()
    assert spectral_probe.main(["--summarize", str(out)]) == 0 and (out / "summary.md").read_text() == text
    # bad input: a clear error (exit 2) before any work
    for bad, message in ((["--k-list", "2,8"], "k-list"), (["--truth-replicates", "7"], "even"),
                         (["--plot-k", "16"], "plot-k")):
        with pytest.raises(SystemExit) as exc:
            spectral_probe.main([*args, *bad])
        assert exc.value.code == 2
    with pytest.raises(SystemExit):
        spectral_probe.main(["--truth", "--checkpoint", str(tmp_path), "--out", str(out)])  # not a checkpoint


# ---- the summary's statistics: verdict limits, intervals, the curve tests -----------------------------------


def curve_record(name, step, z, s, kind="momentum", typ="q"):
    return {"kind": "truth", "name": name, "type": typ, "step": step, "K": 8, "atoms": kind,
            "curves": {"s": list(map(float, s)), "zeta_true": list(map(float, z))}}


def test_limit_verdicts_need_the_whole_interval_on_one_side():
    assert echo_truth.limit_verdict((0.05, 0.02, 0.09), 0.1) == "holds"
    assert echo_truth.limit_verdict((0.05, 0.02, 0.10), 0.1) == "holds"
    assert echo_truth.limit_verdict((0.2, 0.11, 0.3), 0.1) == "fails"
    assert echo_truth.limit_verdict((0.1, 0.05, 0.15), 0.1) == "undecided"
    assert echo_truth.limit_verdict((0.05, float("nan"), float("nan")), 0.1).startswith("undecided")


def test_cluster_bootstrap_interval_covers_the_median_at_its_nominal_rate():
    # 20 matrices x 5 steps, a per-matrix offset (steps of one matrix are correlated): the population median is 0
    gen = np.random.default_rng(0)
    hits, n_draws = 0, 200
    for d in range(n_draws):
        offsets = gen.normal(0, 1, 20)
        clusters = {f"m{i}": list(o + 0.5 * gen.normal(0, 1, 5)) for i, o in enumerate(offsets)}
        _, lo, hi = echo_truth.cluster_bootstrap(clusters, n_boot=500, seed=d)
        hits += lo <= 0 <= hi
    assert 0.85 <= hits / n_draws <= 0.95, hits / n_draws
    # each draw's median is np.median of the drawn clusters' values
    gen_check = np.random.default_rng(7)
    picks = gen_check.integers(0, 20, (3, 20))
    groups = list(clusters.values())
    expected = sorted(float(np.median(np.concatenate([groups[i] for i in p]))) for p in picks)
    assert echo_truth.cluster_bootstrap(clusters, n_boot=3, level=1.0, seed=7)[1] == pytest.approx(expected[0])
    assert echo_truth.cluster_bootstrap(clusters, n_boot=3, level=1.0, seed=7)[2] == pytest.approx(expected[-1])
    # resampling single values instead of clusters would be too narrow: the clustered interval is wider
    flat = {str(i): [v] for i, v in enumerate(sum(clusters.values(), []))}
    width = lambda ci: ci[2] - ci[1]
    assert width(echo_truth.cluster_bootstrap(clusters)) > 1.3 * width(echo_truth.cluster_bootstrap(flat))


def test_reversal_test_finds_a_planted_rise_and_not_noise_around_a_falling_curve():
    gen = np.random.default_rng(1)
    s = np.logspace(0, -3, 96)
    falling = s ** 2 / (s ** 2 + 0.01 ** 2) * 0.7
    for _ in range(5):
        z = falling + gen.normal(0, 0.05, s.size)
        _, _, p = echo_truth.reversal_tests(*echo_truth.true_curve(curve_record("m", 0, z, s)))
        assert p.min() > 0.05 / p.size  # no false alarm at the family-wise 5% level
    bumped = falling.copy()
    bumped[48:56] += 0.3  # one bin rises 0.3 above its higher-s neighbour
    z = bumped + gen.normal(0, 0.05, s.size)
    rise, _, p = echo_truth.reversal_tests(*echo_truth.true_curve(curve_record("m", 0, z, s)))
    assert p.min() < 0.05 / p.size and p.argmin() == 5 and rise[5] > 0.1  # bin 6 (atoms 48-55) over bin 5


def test_family_fits_and_transfers_are_scored_held_out_against_a_free_curve():
    gen = np.random.default_rng(2)
    s = np.logspace(0, -3, 128)
    hill_floor = lambda tau: 0.05 + 0.95 * s ** 2 / (s ** 2 + tau ** 2)  # in the family: r0 + (1 - r0) hill
    recs = [curve_record(f"m{i}", step, hill_floor(tau) + gen.normal(0, 0.03, s.size), s)
            for i in range(2) for step, tau in ((0, 0.03), (50, 0.03), (100, 0.3))]
    wavy = np.clip(0.5 + 0.3 * np.sin(1.5 * np.log(s)), 0, 1) + gen.normal(0, 0.03, s.size)
    recs.append(curve_record("w", 0, wavy, s, typ="v"))
    analysis = echo_truth.CurveAnalysis(recs)
    fits = analysis.fits
    for i in range(2):
        assert fits[f"m{i}", 0, "momentum"]["hill_floor"] / fits[f"m{i}", 0, "momentum"]["free"] < 1.1
    assert fits["w", 0, "momentum"]["hill_floor"] / fits["w", 0, "momentum"]["free"] > 1.5  # 2 constants miss it
    ratios = echo_truth.transfer_ratios(analysis, "momentum", "hill_floor")
    for i in range(2):
        same, moved = ratios[f"m{i}"]  # steps 0 -> 50 (same tau), 50 -> 100 (tau x 10)
        assert same < 1.1 and moved > 2.0
    shared = echo_truth.shared_curve_ratios(analysis, "momentum", "hill_floor")
    assert all(r < 1.1 for i in range(2) for r in shared[f"m{i}"])  # the two matrices share their curve


def test_weight_cosine_is_scale_free_and_one_for_the_true_zeta():
    s = np.array([3.0, 2.0, 1.0, 1e-12])  # the null atom is left out
    z = np.array([0.8, 0.4, 0.1, 0.9])
    rec = curve_record("m", 0, z, s)
    rec["curves"].update({"zeta_a": list(2 * z), "zeta_msign": [1.0] * 4})
    assert echo_truth.weight_cosine(rec, "a") == pytest.approx(1.0)
    assert echo_truth.weight_cosine(rec, "msign") == pytest.approx(z[:3].sum() / (math.sqrt(3) * np.linalg.norm(z[:3])))
    assert echo_truth.weight_cosine(rec, "absent") is None
