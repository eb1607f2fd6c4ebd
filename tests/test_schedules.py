"""schedules.py against record 18 (train_gpt_medium.py at d701163974e3e98d41b22aaece1cd2aa1ab41cd7 of
KellerJordan/modded-nanogpt): the expected numbers below are the record's, worked out by hand from its constants
(4700 scheduled + 40 extension steps, stages by twelfths, 128-token blocks), not read back from schedules.py."""
import math

import pytest
import torch

import schedules
import train_gpt
from attention import YARN_ALPHA, YARN_BETA, yarn_freqs
from config import parse_config

MEDIUM = parse_config(["--preset", "medium"])
# first step of each twelfth of 4700 steps: ceil(k * 4700 / 12)
STAGE_STARTS = [0, 392, 784, 1175, 1567, 1959, 2350, 2742, 3134, 3525, 3917, 4309]
RECORD_WINDOWS = [3, 7, 11, 13, 15, 17, 19, 21, 23, 23, 23, 23]  # long window, blocks of 128 tokens


@pytest.mark.parametrize("step, tokens", [
    (0, 131072), (391, 131072), (392, 262144), (783, 262144), (784, 393216), (1174, 393216), (1175, 524288),
    (4699, 524288), (4700, 524288), (4739, 524288)])
def test_tokens_per_step_at_the_record_boundaries(step, tokens):
    assert schedules.tokens_at(MEDIUM, step) == tokens
    forwards = schedules.forwards_per_step(MEDIUM)
    assert forwards == 8 and tokens % forwards == 0  # 8 GPUs x 1 or 1 GPU x 8 forwards of tokens / 8


@pytest.mark.parametrize("step, peak", [(0, 1.0), (391, 1.0), (392, 1.52), (783, 1.52), (784, 1.73), (1175, 1.73),
                                        (1176, 2.0), (1410, 2.0)])
def test_lr_multiplier_stages(step, peak):
    """Peaks 1.0, 1.52 after 1/12, 1.73 after 2/12, 2.0 after 3/12 (strictly after: step 1175 is exactly 3/12)."""
    assert schedules.lr_multiplier(MEDIUM, step) == peak


def test_lr_multiplier_cooldown_and_extension():
    """Linear from 2.0 to 0.1 over the last 70% of the 4700 scheduled steps, then 0.1 for the 40 extension steps."""
    assert math.isclose(schedules.lr_multiplier(MEDIUM, 3055), 1.05)  # x = 0.65: halfway down the cooldown
    for step in range(1411, 4701, 97):
        w = (1 - step / 4700) / 0.7
        assert math.isclose(schedules.lr_multiplier(MEDIUM, step), 2.0 * w + 0.1 * (1 - w), rel_tol=1e-12), step
    for step in (4700, 4701, 4739):
        assert math.isclose(schedules.lr_multiplier(MEDIUM, step), 0.1)


def test_momentum_warmup_and_cooldown():
    """0.85 -> 0.95 over the first 300 steps, back towards 0.85 over the last 50 of the 4740."""
    expected = {0: 0.85, 150: 0.90, 299: 0.85 + 299 / 300 * 0.1, 300: 0.95, 4690: 0.95, 4715: 0.90, 4739: 0.852}
    for step, value in expected.items():
        assert math.isclose(schedules.momentum_at(MEDIUM, step), value, rel_tol=1e-12), step


def test_windows_per_stage_extension_and_final_validation():
    for stage, (start, blocks) in enumerate(zip(STAGE_STARTS, RECORD_WINDOWS)):
        for step in (start, min(start + 1, 4699)):
            s = schedules.schedule_at(MEDIUM, step)
            assert s.long_window == blocks * 128, (stage, step)
            assert s.short_window == min(11, blocks // 2) * 128, (stage, step)
        if stage:
            assert schedules.window_tokens_at(MEDIUM, start - 1) == RECORD_WINDOWS[stage - 1] * 128
    for step in (4700, 4739):  # extension: long 23 blocks, short 23 // 2
        s = schedules.schedule_at(MEDIUM, step)
        assert (s.long_window, s.short_window) == (23 * 128, 11 * 128)
    final = schedules.schedule_at(MEDIUM, 4740, final=True)
    assert (final.long_window, final.short_window) == (27 * 128, 11 * 128)


def test_mtp_weights():
    """[1, 0.5, 0.25 (1 - 3x)] -> [1, 0.5 (1 - (3x - 1))] -> [1] with x = step / 1175."""
    assert schedules.mtp_weights_at(MEDIUM, 0)[0] == (1.0, 0.5, 0.25)
    for step in (1, 200, 391):
        x = step / 1175
        assert schedules.mtp_weights_at(MEDIUM, step)[0] == pytest.approx((1.0, 0.5, 0.25 * (1 - 3 * x)), rel=1e-12)
    for step in (392, 600, 783):
        x = step / 1175
        assert schedules.mtp_weights_at(MEDIUM, step)[0] == pytest.approx((1.0, 0.5 * (1 - (3 * x - 1))), rel=1e-12)
    for step in (784, 2000, 4739):
        assert schedules.mtp_weights_at(MEDIUM, step)[0] == (1.0,)


def test_untie_step_and_transitions():
    """Tied through step 785 = ceil(4700 / 6) | 1; transitions: batch 392/784/1175, windows at stage starts up to
    23 blocks, MTP stages 392/784, first split step 786."""
    assert schedules.untie_step(MEDIUM) == 785
    assert schedules.schedule_at(MEDIUM, 785).tied and not schedules.schedule_at(MEDIUM, 786).tied
    assert schedules.transition_steps(MEDIUM) == [0, 392, 784, 786, 1175, 1567, 1959, 2350, 2742, 3134]


def test_yarn_attention_scale():
    """0.1, times 1 + 0.2 ln(new / old) at each window change up to 13 blocks (3->7->11->13), none after."""
    scale = 0.1
    for step, (old, new) in ((392, (3, 7)), (784, (7, 11)), (1175, (11, 13))):
        scale *= 1 + 0.2 * math.log(new / old)
        s = schedules.schedule_at(MEDIUM, step)
        assert math.isclose(s.attn_scale, scale, rel_tol=1e-12) and s.yarn_changes[-1] == (old * 128, new * 128)
    for step in (1567, 4739):
        assert math.isclose(schedules.schedule_at(MEDIUM, step).attn_scale, scale, rel_tol=1e-12)
    assert math.isclose(schedules.schedule_at(MEDIUM, 4740, final=True).attn_scale, scale, rel_tol=1e-12)


def test_yarn_frequencies_against_the_formula():
    base = torch.tensor([1.0, 0.1, 0.01, 0.0])
    got = yarn_freqs(base, [(384, 896), (896, 1408)])
    expected = []
    for f in base.tolist():
        for old, new in ((384, 896), (896, 1408)):
            turns = old * f / (2 * math.pi)
            w = min(max((turns - YARN_ALPHA) / (YARN_BETA - YARN_ALPHA), 0.0), 1.0)
            f *= old / new + w * (1 - old / new)
        expected.append(f)
    torch.testing.assert_close(got, torch.tensor(expected), rtol=1e-6, atol=0)


def test_medium_tiny_crosses_every_transition_in_40_steps():
    cfg = parse_config(["--preset", "medium-tiny"])
    steps = [schedules.schedule_at(cfg, s) for s in range(cfg.num_iterations)]
    assert sorted({s.tokens for s in steps}) == [256, 512, 768, 1024]
    assert {s.long_window // cfg.window_block for s in steps} == set(RECORD_WINDOWS)
    assert [len(s.mtp_weights) for s in steps][:1] == [3] and len(steps[-1].mtp_weights) == 1
    assert {len(s.mtp_weights) for s in steps} == {1, 2, 3}
    assert 0 < schedules.untie_step(cfg) < cfg.num_iterations - 1
    assert any(s.step >= 38 for s in steps)  # extension steps
    assert len(schedules.transition_steps(cfg)) == 10


def test_r8_presets_keep_the_cubic_window_schedule():
    for preset in ("medium-r8", "cpu-tiny"):
        cfg = parse_config(["--preset", preset])
        assert schedules.forwards_per_step(cfg) * cfg.micro_batch_tokens == cfg.batch_tokens
        for step in (0, cfg.num_iterations // 3, cfg.num_iterations - 1):
            s = schedules.schedule_at(cfg, step)
            assert s.tokens == cfg.batch_tokens and s.mtp_weights == (1.0,) and not s.tied
            assert s.short_window == s.long_window // 2
    assert parse_config(["--preset", "medium-r8"]).weight_decay == 0.01


def test_dry_run_prints_config_and_table_without_data_or_gpu(capsys):
    code = train_gpt.main(["--preset", "medium", "--dry-run", "--train-files", "/nonexistent/train_*.bin",
                           "--val-files", "/nonexistent/val_*.bin"])
    out = capsys.readouterr().out
    assert code == 0 and '"preset": "medium"' in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line[:1].isdigit()}
    assert rows["0-299"][1] == "131,072" and rows["392-783"][1] == "262,144" and rows["1175"][1] == "524,288"
    assert rows["392-783"][2:5] == ["8", "x", "32,768"]  # world size 1: 8 forwards of 262,144 / 8 tokens
    assert "27b/11b" in out and "split" in rows["786-1174"]
    assert not torch.cuda.is_initialized()


def test_dry_run_world_size_and_bad_config_exit_codes(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert train_gpt.main(["--preset", "medium", "--dry-run"]) == 0
    assert "1 x 16,384" in capsys.readouterr().out  # 8 ranks: 1 forward of 16,384 tokens each at step 0
    assert train_gpt.main(["--preset", "medium", "--dry-run", "--window-schedule", "3,x"]) == 2
    assert "--window-schedule" in capsys.readouterr().err
