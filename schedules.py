"""Schedules: everything that changes with the step, as pure functions of (cfg, step).

The loop, `--dry-run` and the tests all read these functions, so the table `--dry-run` prints is what a run does.

Stages: a schedule given as n values (batch sizes, windows, lr peaks) splits the scheduled steps
S = num_iterations - extension_steps into n equal stages; step s < S is in stage int(n * (s / S)) (batch, window)
or in the last stage k with s / S > k / n (lr). The extension steps s >= S run at the full batch, the extension
window and the final lr. All comparisons are written as the record writes them, so boundaries fall on the same
steps.

Windows are in tokens: a query sees itself and the `window` tokens before it (FlashAttention's window_size=(W, 0)).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from config import Hyperparameters, parse_float_list, parse_int_list

# YaRN interpolation ramp (in full rotations over the old window): frequencies that turn fewer than YARN_ALPHA
# times are interpolated by old/new, more than YARN_BETA times kept, linear in between.
YARN_ALPHA, YARN_BETA = 1.0, 32.0


@dataclass(frozen=True)
class StepSchedule:
    """What step `step` (0-based count of steps done) runs with."""

    step: int
    tokens: int  # tokens per optimizer step, all ranks together
    lr_mult: float  # multiplier of every optimizer's lr
    momentum: float  # matrix-optimizer momentum
    long_window: int  # tokens (see the module docstring); 0 without a sliding window (no window to change)
    short_window: int
    mtp_weights: tuple[float, ...]  # loss weight of the token 1, 2, ... positions ahead; (1.0,) = next token only
    tied: bool  # the input embedding is the head's weight
    attn_scale: float  # softmax scale
    yarn_changes: tuple[tuple[int, int], ...]  # (old, new) long windows (tokens) at which YaRN rescaled rotary
    # which piece of each piecewise schedule the step is in (rows of the --dry-run table)
    lr_phase: str
    momentum_phase: str
    mtp_phase: int


def scheduled_steps(cfg: Hyperparameters) -> int:
    return cfg.num_iterations - cfg.extension_steps


def stage_of(step: int, num_stages: int, total: int) -> int:
    """The record's stage rule: int(n * x) with x = step / total."""
    return int(num_stages * (step / total))


def first_step_of_stage(stage: int, num_stages: int, total: int) -> int:
    """Smallest step whose stage_of is >= stage (stage in 1..n-1)."""
    step = math.ceil(stage * total / num_stages)
    while step > 0 and stage_of(step - 1, num_stages, total) >= stage:
        step -= 1
    while stage_of(step, num_stages, total) < stage:
        step += 1
    return step


def tokens_at(cfg: Hyperparameters, step: int) -> int:
    """Tokens per optimizer step: the batch_schedule stage, batch_tokens without a schedule or in the extension."""
    stages = parse_int_list(cfg.batch_schedule)
    total = scheduled_steps(cfg)
    if not stages or step >= total:
        return cfg.batch_tokens
    return stages[stage_of(step, len(stages), total)]


def forwards_per_step(cfg: Hyperparameters) -> int:
    """Forward/backward passes per optimizer step over all ranks (fixed; the tokens per forward follow the
    batch schedule, so every world size that divides this sees the same data)."""
    return cfg.batch_tokens // cfg.micro_batch_tokens


def lr_multiplier(cfg: Hyperparameters, step: int) -> float:
    """Peak of the stage (lr_stages; 1.0 without), then a linear cooldown to final_lr_frac over the last
    cooldown_frac of the scheduled steps; final_lr_frac during the extension."""
    total = scheduled_steps(cfg)
    if step > total:
        return cfg.final_lr_frac
    x = step / total
    peaks = parse_float_list(cfg.lr_stages) or [1.0]
    peak = peaks[0]
    for k in range(1, len(peaks)):
        if x > k / len(peaks):
            peak = peaks[k]
    if cfg.cooldown_frac > 0 and x >= 1 - cfg.cooldown_frac:
        w = (1 - x) / cfg.cooldown_frac
        return peak * w + (1 - w) * cfg.final_lr_frac
    return peak


def lr_phase(cfg: Hyperparameters, step: int) -> str:
    total = scheduled_steps(cfg)
    x = step / total
    if step > total:
        return "extension"
    if cfg.cooldown_frac > 0 and x >= 1 - cfg.cooldown_frac:
        return "cooldown"
    peaks = parse_float_list(cfg.lr_stages) or [1.0]
    return f"stage {max([0] + [k for k in range(1, len(peaks)) if x > k / len(peaks)])}"


def momentum_at(cfg: Hyperparameters, step: int) -> float:
    """momentum_warmup_start -> momentum over the first momentum_warmup_steps, back to momentum_warmup_start over
    the run's last momentum_cooldown_steps (the record's expressions)."""
    low, high = cfg.momentum_warmup_start, cfg.momentum
    if step < cfg.momentum_warmup_steps:
        return low + step / cfg.momentum_warmup_steps * (high - low)
    cooldown_start = cfg.num_iterations - cfg.momentum_cooldown_steps
    if cfg.momentum_cooldown_steps > 0 and step > cooldown_start:
        return high - (step - cooldown_start) / cfg.momentum_cooldown_steps * (high - low)
    return high


def momentum_phase(cfg: Hyperparameters, step: int) -> str:
    if step < cfg.momentum_warmup_steps:
        return "warm-up"
    if cfg.momentum_cooldown_steps > 0 and step > cfg.num_iterations - cfg.momentum_cooldown_steps:
        return "cool-down"
    return "flat"


def window_tokens_at(cfg: Hyperparameters, step: int, final: bool = False) -> int:
    """Long window (tokens) at this step; final=True: the window of the final validation."""
    block = cfg.window_block
    if final and cfg.final_window_blocks:
        return cfg.final_window_blocks * block
    total = scheduled_steps(cfg)
    stages = parse_int_list(cfg.window_schedule)
    if step >= total and cfg.extension_window_blocks:
        return cfg.extension_window_blocks * block
    if stages:
        return stages[min(stage_of(step, len(stages), total), len(stages) - 1)] * block
    x = min(step / total, 1.0)  # record 8's cubic schedule, rounded up to whole blocks
    tokens = cfg.max_window_tokens * (4 * x**3 - 6 * x**2 + 3 * x)
    return max(1, math.ceil(tokens / block)) * block


def short_window_tokens(cfg: Hyperparameters, long_window: int) -> int:
    """Short window of the non-long layers: half the long one (whole blocks with a window_schedule), capped at
    short_window_max_blocks."""
    block = cfg.window_block
    short = (long_window // block // 2) * block if cfg.window_schedule else long_window // 2
    if cfg.short_window_max_blocks:
        short = min(short, cfg.short_window_max_blocks * block)
    return short


_WINDOW_CHANGES: dict[tuple, list[tuple[int, int, int]]] = {}  # long_window_changes by the fields it reads


def long_window_changes(cfg: Hyperparameters) -> list[tuple[int, int, int]]:
    """(step, old, new) for every training step whose long window differs from the previous step's (stage
    schedules only: the cubic schedule changes every few steps and has no YaRN)."""
    key = (cfg.window_schedule, cfg.num_iterations, cfg.extension_steps, cfg.window_block, cfg.extension_window_blocks)
    if key not in _WINDOW_CHANGES:
        _WINDOW_CHANGES[key] = _find_window_changes(cfg)
    return _WINDOW_CHANGES[key]


def _find_window_changes(cfg: Hyperparameters) -> list[tuple[int, int, int]]:
    stages = parse_int_list(cfg.window_schedule)
    if not stages:
        return []
    total = scheduled_steps(cfg)
    starts = [first_step_of_stage(k, len(stages), total) for k in range(1, len(stages))]
    if cfg.extension_steps:
        starts.append(total)
    changes = []
    for step in starts:
        old, new = window_tokens_at(cfg, step - 1), window_tokens_at(cfg, step)
        if old != new and step < cfg.num_iterations:
            changes.append((step, old, new))
    return changes


def yarn_at(cfg: Hyperparameters, step: int, final: bool = False) -> tuple[tuple[tuple[int, int], ...], float]:
    """(YaRN changes so far, attention scale). A change of the long window old -> new applies YaRN when new is
    at most yarn_max_window_blocks blocks; the scale is multiplied by 1 + 0.2 ln(new / old) at each applied change."""
    scale = cfg.attn_scale or 1 / math.sqrt(cfg.head_dim)
    if not cfg.yarn:
        return (), scale
    cap = cfg.yarn_max_window_blocks * cfg.window_block
    moves = [(old, new) for s, old, new in long_window_changes(cfg) if s <= step]
    if final:
        last, end = window_tokens_at(cfg, cfg.num_iterations), window_tokens_at(cfg, step, final=True)
        if end != last:
            moves.append((last, end))
    applied = []
    for old, new in moves:
        if not cap or new <= cap:
            applied.append((old, new))
            scale *= 0.2 * math.log(new / old) + 1
    return tuple(applied), scale


def mtp_weights_at(cfg: Hyperparameters, step: int) -> tuple[tuple[float, ...], int]:
    """(weights, phase). With K extra targets and x = step / (mtp_frac * S): in phase j = 0..K-1 (x in
    [j, j + 1) / (K + 1)) the weights are w[0..K-j], the last one decaying linearly to 0 over the phase; from
    phase K on, next token only. Record 18: [1, 0.5, 0.25 (1 - 3x)] -> [1, 0.5 (1 - (3x - 1))] -> [1]."""
    weights = parse_float_list(cfg.mtp_weights) or [1.0]
    extra = len(weights) - 1
    if extra == 0:
        return (weights[0],), 0
    x = step / (cfg.mtp_frac * scheduled_steps(cfg))
    phase = sum(1 for j in range(1, extra + 1) if x >= j / (extra + 1))
    if phase == extra:
        return (weights[0],), phase
    kept = weights[:extra - phase + 1]
    return (*kept[:-1], kept[-1] * (1 - ((extra + 1) * x - phase))), phase


def untie_step(cfg: Hyperparameters) -> int:
    """The step after whose optimizer step the embedding is split from the head (odd, so that it follows an Adam
    step of the record's odd-step Adam); -1 if the model is never tied."""
    if cfg.tied_head_frac <= 0:
        return -1
    return math.ceil(cfg.tied_head_frac * scheduled_steps(cfg)) | 1


def schedule_at(cfg: Hyperparameters, step: int, final: bool = False) -> StepSchedule:
    """Everything step `step` runs with; final=True: the final validation at step num_iterations."""
    long_window = window_tokens_at(cfg, step, final=final) if cfg.sliding_window else 0
    mtp, mtp_phase = mtp_weights_at(cfg, step)
    changes, scale = yarn_at(cfg, step, final=final)
    split = untie_step(cfg)
    return StepSchedule(
        step=step, tokens=tokens_at(cfg, step), lr_mult=lr_multiplier(cfg, step), momentum=momentum_at(cfg, step),
        long_window=long_window, short_window=short_window_tokens(cfg, long_window), mtp_weights=mtp,
        tied=split >= 0 and step <= split, attn_scale=scale, yarn_changes=changes,
        lr_phase=lr_phase(cfg, step), momentum_phase=momentum_phase(cfg, step), mtp_phase=mtp_phase)


def validation_due(cfg: Hyperparameters, step: int) -> bool:
    """Whether the loop validates before training step `step` (0-based; step == num_iterations is the end):
    always at the end; every val_loss_every steps; with val_loss_every_late > 0, every val_loss_every_late steps
    instead once step / num_iterations >= val_late_start (track 3: 125, then 25 in the last 10%)."""
    if step == cfg.num_iterations:
        return True
    late = cfg.val_loss_every_late > 0 and step / cfg.num_iterations >= cfg.val_late_start
    every = cfg.val_loss_every_late if late else cfg.val_loss_every
    return every > 0 and step % every == 0


def compile_key(s: StepSchedule) -> tuple:
    """What changes the shapes or the code of a training step: tokens, windows, MTP stage, tie state."""
    return s.tokens, s.long_window, s.short_window, len(s.mtp_weights), s.tied


def transition_steps(cfg: Hyperparameters) -> list[int]:
    """Step 0 and every step whose batch size, windows, MTP stage or tie state differ from the previous step's
    (YaRN changes coincide with window changes): the steps a compile warm-up has to visit."""
    steps, previous = [], None
    for step in range(cfg.num_iterations):
        key = compile_key(schedule_at(cfg, step))
        if key != previous:
            steps.append(step)
            previous = key
    return steps


def warmup_plan(cfg: Hyperparameters) -> list[int]:
    """The steps the untimed compile warm-up runs, in order: steps 0..warmup_steps-1 together with every transition
    step and the steps on either side of it (as record 18 does), within the run; [] when warmup_steps is 0.
    Every graph the timed steps need is then compiled before the clock starts."""
    if cfg.warmup_steps <= 0:
        return []
    steps = set(range(min(cfg.warmup_steps, cfg.num_iterations)))
    steps |= {s + offset for s in transition_steps(cfg) for offset in (-1, 0, 1)}
    return sorted(s for s in steps if 0 <= s < cfg.num_iterations)


# -----------------------------------------------------------------------------------------------
# The --dry-run table


def schedule_rows(cfg: Hyperparameters, world_size: int) -> list[dict]:
    """Step ranges over which every schedule is constant or on one ramp, plus the final validation."""
    per_step = forwards_per_step(cfg)
    rows: list[dict] = []
    key = None
    for step in range(cfg.num_iterations):
        s = schedule_at(cfg, step)
        row_key = (compile_key(s), s.lr_phase, s.momentum_phase, s.mtp_phase)
        if row_key != key:
            rows.append(dict(first=s, last=s, accum=per_step // world_size, tokens_per_forward=s.tokens // per_step))
            key = row_key
        else:
            rows[-1]["last"] = s
    final = schedule_at(cfg, cfg.num_iterations, final=True)
    rows.append(dict(first=final, last=final, accum=None, tokens_per_forward=None))
    return rows


def _span(a: float, b: float, fmt: str) -> str:
    return format(a, fmt) if format(a, fmt) == format(b, fmt) else f"{format(a, fmt)}->{format(b, fmt)}"


def _window(cfg: Hyperparameters, tokens: int) -> str:
    if not cfg.sliding_window:
        return "-"
    if tokens % cfg.window_block == 0:
        return f"{tokens // cfg.window_block}b"
    return f"{tokens}t"


def format_schedule_table(cfg: Hyperparameters, world_size: int) -> str:
    """The schedule as a text table: step ranges, tokens/step, accumulation steps x tokens per forward at this
    world size, lr multiplier, momentum, long/short window (b: blocks of window_block tokens), MTP weights, head."""
    header = ["steps", "tokens/step", "accum x tokens/fwd", "lr mult", "momentum", "window long/short",
              "MTP weights", "head", "attn scale"]
    lines = []
    for row in schedule_rows(cfg, world_size):
        a, b = row["first"], row["last"]
        if row["accum"] is None:
            steps, tokens, accum = f"final val @{a.step}", "-", "-"
            lr = momentum = "-"
        else:
            steps = f"{a.step}" if a.step == b.step else f"{a.step}-{b.step}"
            tokens, accum = f"{a.tokens:,}", f"{row['accum']} x {row['tokens_per_forward']:,}"
            lr, momentum = _span(a.lr_mult, b.lr_mult, ".3f"), _span(a.momentum, b.momentum, ".3f")
        mtp = "/".join(_span(x, y, ".3g") for x, y in zip(a.mtp_weights, b.mtp_weights))
        window = f"{_window(cfg, a.long_window)}/{_window(cfg, a.short_window)}"
        lines.append([steps, tokens, accum, lr, momentum, window, mtp, "tied" if a.tied else "split",
                      f"{a.attn_scale:.4f}"])
    widths = [max(len(r[i]) for r in [header] + lines) for i in range(len(header))]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    out.append("  ".join("-" * w for w in widths))
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in lines]
    split = untie_step(cfg)
    notes = [f"window block: {cfg.window_block} tokens; scheduled steps {scheduled_steps(cfg)}, "
             f"extension {cfg.extension_steps}"]
    if split >= 0:
        notes.append(f"head and embedding split after the optimizer step of step {split} (with the head's Adam state)")
    notes.append(f"transition steps: {transition_steps(cfg)}")
    if cfg.val_loss_every_late > 0:
        late = next(s for s in range(cfg.num_iterations + 1) if s / cfg.num_iterations >= cfg.val_late_start)
        due = [s for s in range(cfg.num_iterations + 1) if validation_due(cfg, s)]
        notes.append(f"validation: every {cfg.val_loss_every} steps, every {cfg.val_loss_every_late} from step {late} "
                     f"(val_late_start {cfg.val_late_start:g}) and at the end: {len(due)} validations")
    return "\n".join(out + notes)
