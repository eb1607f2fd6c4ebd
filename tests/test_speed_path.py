"""The speed path's switches on the CPU: the compile warm-up's plan against the --dry-run table, bf16 storage of
embeddings, head and gates (under CPU bf16 autocast, standing in for CUDA's), and the errors for bad settings."""
from __future__ import annotations

import ast

import pytest
import torch

import schedules
import train_gpt
from config import parse_config


def dry_run_transitions(capsys, argv: list[str]) -> list[int]:
    """The `transition steps: [...]` line of the --dry-run table."""
    assert train_gpt.main([*argv, "--dry-run"]) == 0
    (line,) = [x for x in capsys.readouterr().out.splitlines() if x.startswith("transition steps: ")]
    return ast.literal_eval(line[len("transition steps: "):])


@pytest.mark.parametrize("argv", [["--preset", "medium"], ["--preset", "medium-r8"],
                                  ["--preset", "medium-tiny", "--warmup-steps", "1"]],
                         ids=["medium", "medium-r8", "medium-tiny"])
def test_warmup_plan_visits_every_transition_of_the_dry_run_table(capsys, argv):
    transitions = dry_run_transitions(capsys, argv)
    cfg = parse_config(argv)
    plan = schedules.warmup_plan(cfg)
    assert len(transitions) > 1 and plan == sorted(set(plan))
    for step in transitions:  # the transition and the steps on either side, inside the run
        assert {s for s in (step - 1, step, step + 1) if 0 <= s < cfg.num_iterations} <= set(plan), step
    assert set(range(cfg.warmup_steps)) <= set(plan)
    # every graph the run needs is compiled by one of the warm-up steps
    needed = {schedules.compile_key(schedules.schedule_at(cfg, s)) for s in range(cfg.num_iterations)}
    assert needed == {schedules.compile_key(schedules.schedule_at(cfg, s)) for s in plan}
    assert schedules.warmup_plan(parse_config([*argv, "--warmup-steps", "0"])) == []


def test_medium_warmup_plan_is_record_18s():
    """Record 18 warms up at its window changes (every 1/12 of 4700 steps) and the steps on either side; ours adds
    the batch, MTP and untie transitions, which fall on the same steps except the untie (after step 785)."""
    cfg = parse_config(["--preset", "medium"])
    window_changes = [0, 392, 784, 1175, 1567, 1959, 2350, 2742, 3134]
    assert schedules.transition_steps(cfg) == sorted(window_changes + [786])
    assert schedules.warmup_plan(cfg) == sorted(set(range(10)) | {s + o for s in window_changes + [786]
                                                                   for o in (-1, 0, 1) if s + o >= 0})


def test_bf16_storage_converts_the_record_roles_and_trains_under_autocast():
    cfg = parse_config(["--preset", "medium-tiny", "--vocab-size", "512", "--bos-id", "511"])
    torch.manual_seed(0)
    model = train_gpt.GPT(cfg)
    roles = model.parameter_roles()
    converted = train_gpt.apply_bf16_storage(model)
    expected = [name for role in train_gpt.BF16_STORAGE_ROLES for name, _ in roles.get(role, [])]
    assert converted == expected and {"embed.weight", "head.weight", "smear_gate"} <= set(converted)
    for role, members in roles.items():
        for name, p in members:
            assert p.dtype == (torch.bfloat16 if role in train_gpt.BF16_STORAGE_ROLES else torch.float32), name
    cfg.bf16_storage = True  # what validate_config allows on CUDA only
    adam, matrix = train_gpt.build_optimizers(model, cfg)
    gen = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 511, (1, 129), generator=gen)
    masks = model.attention_masks(idx[:, :-1], 64, 32, False)
    losses = []
    for _ in range(2):  # Adam steps on the second call (step_every 2)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(idx[:, :-1], idx[:, 1:], masks, torch.tensor([1.0, 0.5, 0.25]))
        loss.backward()
        losses.append(loss.item())
        adam.step()
        matrix.step()
        model.zero_grad(set_to_none=True)
    head = adam.state[model.head.weight]
    assert head["exp_avg"].dtype == head["exp_avg_sq"].dtype == torch.bfloat16
    assert model.head.weight.dtype == torch.bfloat16 and all(x == x for x in losses)  # finite, not NaN
    assert matrix.state[model.blocks[0].attn.value_gate]["momentum_buffer"].dtype == torch.bfloat16


@pytest.mark.parametrize("flags, message", [(["--bf16-storage", "--device", "cpu"], "--bf16-storage"),
                                             (["--log-flush-every", "0"], "--log-flush-every")])
def test_speed_switches_reject_bad_settings(capsys, flags, message):
    assert train_gpt.main(["--preset", "medium-tiny", *flags, "--dry-run"]) == 2
    assert message in capsys.readouterr().err


def test_timing_bench_stages_and_wall_clock_estimate_match_the_record():
    """bench/gpu_timing.py's stage split of `medium` and its wall-clock sum, fed record 18's own stage times, give
    the record's schedule (steps 0-391, 392-783, 784-1174, then 524K) and about its measured time."""
    from bench import gpu_timing

    stages = gpu_timing.stage_steps(parse_config(["--preset", "medium"]))
    assert {tokens: (steps[0], steps[-1]) for tokens, steps in stages.items()} == {
        131_072: (0, 391), 262_144: (392, 783), 393_216: (784, 1174), 524_288: (1175, 4739)}
    counts = {tokens: len(steps) for tokens, steps in stages.items()}
    estimate = gpu_timing.wall_clock_estimate(counts, gpu_timing.RECORD_18_STAGE_MS)
    assert estimate == pytest.approx(392 * 0.0721 + 392 * 0.1292 + 391 * 0.1894 + 3565 * 0.2485)
    assert abs(estimate - gpu_timing.RECORD_18_WALL_CLOCK_S) < 0.01 * gpu_timing.RECORD_18_WALL_CLOCK_S
