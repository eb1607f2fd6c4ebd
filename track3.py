"""The optimizer benchmark (modded-nanogpt track 3) as code: its significance rules and the fence of `--preset track3`.

The benchmark (records/track_3_optimization/README.md of KellerJordan/modded-nanogpt): a fixed GPT-2 small
architecture, data and batch; the fewest steps to val loss 3.28. Its rules, as used here:
  - a set of n runs of one setup, validated at the same steps, reaches the target at step s when its mean val loss
    at s satisfies (3.28 - mean) * sqrt(n) >= 0.004: a one-sided z-test with sigma 0.0013 at p < 0.001
    (0.004 ~ 3.09 sigma). The earliest such step among the validations common to all runs is the set's step
    count (stopping at a step chosen the same way for every run is allowed; per-run choices are not);
  - a new set beats an older one when
        ((old_mean - new_mean) + (old_steps - new_steps) / 100 * 0.0045) / sqrt(1 / n_old + 1 / n_new) >= 0.004,
    where 0.0045 val loss per 100 steps is the benchmark's measured exchange rate near the target.
make_record.py (`--track track3`) applies these to logs; config.py calls `preset_problems` to refuse flags that
would take a `track3` run off the benchmark, and train_gpt.py writes `benchmark_statement` into the log and prints it
with `--dry-run` (that line names the steps, tokens/step, layers and width a track3 run will use).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

TARGET = 3.28  # val loss to reach
SIGMA = 0.0013  # run-to-run std of the final val loss the rule assumes
MARGIN = 0.004  # (TARGET - mean) * sqrt(n) must reach this (~3.09 SIGMA: one-sided p < 0.001)
LOSS_PER_100_STEPS = 0.0045  # near the target, 100 more steps lower the val loss by about this much

# -----------------------------------------------------------------------------------------------
# Significance


def rule_statistic(mean: float, n: int, target: float = TARGET) -> float:
    """(target - mean) * sqrt(n): the set reaches the target when this is >= MARGIN."""
    return (target - mean) * math.sqrt(n)


def rule_p_value(mean: float, n: int, target: float = TARGET) -> float:
    """One-sided z-test p-value of mean < target with known sigma SIGMA (rule met <=> p < ~0.001)."""
    from scipy import stats

    return float(stats.norm.sf(rule_statistic(mean, n, target) / SIGMA))


def seeds_needed(expected_mean: float, power: float = 0.8, target: float = TARGET) -> int | None:
    """Runs for a setup whose true mean is expected_mean to meet the rule with probability `power`
    (the mean of n runs has std SIGMA / sqrt(n)): the least n with (target - mu) sqrt(n) >= MARGIN + z_power SIGMA.
    None when expected_mean is not below the target (no n suffices)."""
    from scipy import stats

    if not expected_mean < target:
        return None
    z_power = float(stats.norm.ppf(power))
    return max(1, math.ceil(((MARGIN + z_power * SIGMA) / (target - expected_mean)) ** 2 - 1e-9))


def pairwise_statistic(old_mean: float, old_n: int, old_steps: int, new_mean: float, new_n: int,
                       new_steps: int) -> float:
    """The benchmark's pairwise rule: the new set is significantly better when this is >= MARGIN."""
    step_gain = (old_steps - new_steps) / 100 * LOSS_PER_100_STEPS  # the loss the saved steps are worth
    return ((old_mean - new_mean) + step_gain) / math.sqrt(1 / old_n + 1 / new_n)


@dataclass
class RuleAtStep:
    step: int
    n: int
    mean: float
    std: float  # sample std (ddof=1); nan for one run
    statistic: float  # (target - mean) * sqrt(n)
    p_value: float  # z-test with SIGMA
    met: bool


@dataclass
class SetResult:
    """One set of runs under the rule: the rule at every common validation step, and the set's step count."""
    total_steps: int
    steps: int  # the earliest common validation step where the rule is met; the final step when never
    met: bool
    losses: list[float]  # per run, at `steps`
    seeds: list[int | None]
    rows: list[RuleAtStep]  # every validation step that all runs share, in order

    @property
    def at_steps(self) -> RuleAtStep:
        return next(r for r in self.rows if r.step == self.steps)


def rule_at_step(step: int, losses: list[float], target: float = TARGET) -> RuleAtStep:
    values = np.asarray(losses, dtype=np.float64)
    n, mean = len(values), float(values.mean())
    statistic = rule_statistic(mean, n, target)
    return RuleAtStep(step=step, n=n, mean=mean, std=float(values.std(ddof=1)) if n > 1 else math.nan,
                      statistic=statistic, p_value=rule_p_value(mean, n, target), met=statistic >= MARGIN)


def evaluate_set(curves: list[dict[int, float]], total_steps: int, seeds: list[int | None],
                 target: float = TARGET) -> SetResult:
    """curves: per run {step: val loss} (every run validated at total_steps). The rule at every step all runs
    validated at; the set's steps: the earliest step that meets it, else total_steps (not met)."""
    if not curves:
        raise ValueError("a set needs at least one run")
    common = sorted(set.intersection(*(set(c) for c in curves)))
    if total_steps not in common:
        raise ValueError(f"every run of a set must validate at its last step {total_steps}")
    rows = [rule_at_step(step, [c[step] for c in curves], target) for step in common]
    passing = [r.step for r in rows if r.met]  # a non-finite loss makes the mean nan: never met
    steps = passing[0] if passing else total_steps
    return SetResult(total_steps=total_steps, steps=steps, met=bool(passing), losses=[c[steps] for c in curves],
                     seeds=list(seeds), rows=rows)


@dataclass
class Comparison:
    """A new set against a baseline set: the benchmark's pairwise rule and a t-test of the same difference."""
    statistic: float  # pairwise_statistic; significant when >= MARGIN
    significant: bool
    loss_gain: float  # old_mean - new_mean at the sets' own step counts
    step_gain: int  # old_steps - new_steps
    step_gain_loss: float  # step_gain / 100 * LOSS_PER_100_STEPS
    test: str  # "paired" (the same seeds in both sets) or "welch"
    t_statistic: float  # nan with fewer than 2 runs (pairs) per side
    p_value: float  # one-sided, H1: the new set is better by the step-adjusted difference


def compare_sets(old: SetResult, new: SetResult) -> Comparison:
    """The new set vs the old one at their own step counts. The t-test compares old losses with the new losses
    shifted by the loss the step difference is worth: paired by seed when both sets have the same distinct seeds,
    else Welch's unequal-variance test."""
    from scipy import stats

    old_losses, new_losses = np.asarray(old.losses), np.asarray(new.losses)
    step_gain = old.steps - new.steps
    step_gain_loss = step_gain / 100 * LOSS_PER_100_STEPS
    statistic = pairwise_statistic(float(old_losses.mean()), len(old_losses), old.steps,
                                   float(new_losses.mean()), len(new_losses), new.steps)
    new_adjusted = new_losses - step_gain_loss
    paired = (None not in old.seeds and None not in new.seeds and len(set(old.seeds)) == len(old.seeds)
              and sorted(old.seeds) == sorted(new.seeds))
    t_stat = p_value = math.nan
    if paired:
        order_old, order_new = np.argsort(old.seeds), np.argsort(new.seeds)
        if len(old_losses) >= 2:
            result = stats.ttest_rel(old_losses[order_old], new_adjusted[order_new], alternative="greater")
            t_stat, p_value = float(result.statistic), float(result.pvalue)
    elif len(old_losses) >= 2 and len(new_losses) >= 2:
        result = stats.ttest_ind(old_losses, new_adjusted, equal_var=False, alternative="greater")
        t_stat, p_value = float(result.statistic), float(result.pvalue)
    return Comparison(statistic=statistic, significant=statistic >= MARGIN,
                      loss_gain=float(old_losses.mean() - new_losses.mean()), step_gain=step_gain,
                      step_gain_loss=step_gain_loss, test="paired" if paired else "welch", t_statistic=t_stat,
                      p_value=p_value)


# -----------------------------------------------------------------------------------------------
# The preset's fence

PRESET = "track3"
# Fields the benchmark fixes (architecture, data, batch, target). Every Hyperparameters field is in FIXED_FIELDS or
# FREE_FIELDS (a test checks it), so a field added later must be classified before track3 runs.
FIXED_FIELDS = (
    # architecture (the record-18 features are switched off by the preset and stay off; windows and gates unused)
    "vocab_size", "num_layers", "model_dim", "num_heads", "head_dim", "mlp_ratio", "merged_qkvo", "qk_norm",
    "v_norm", "rotary", "rotary_base", "attn_scale", "num_value_embeds", "x0_mix", "skip_connections",
    "mlp_only_layers", "relu_squared", "logit_softcap", "doc_mask", "bos_id", "sliding_window",
    "long_window_layers", "max_window_tokens", "window_block", "linear_bias", "norm_gains",
    "qkvo_scales", "key_offset", "yarn", "attn_output_gate", "gate_dims", "value_embed_gates", "second_embed",
    "smear", "gated_skips", "backout_layer", "logit_softcap_kind", "logit_sigmoid_shift",
    "logit_sigmoid_temperature", "tied_head_frac", "window_schedule", "short_window_max_blocks",
    "extension_window_blocks", "final_window_blocks", "yarn_max_window_blocks",
    # the objective: next-token cross-entropy on fp32 logits (no multi-token prediction)
    "mtp_weights", "mtp_frac", "bf16_cross_entropy",
    # data and batch (micro_batch_tokens only splits the same batch into forward passes)
    "train_files", "val_files", "val_tokens", "seq_len", "align_to_bos", "sample_rows", "pack_documents",
    "max_doc_tokens", "batch_tokens", "batch_schedule", "val_loss_target",
)
# Free: the optimizer and its schedules, the initialisation (a freedom of the benchmark), step count, validation
# cadence, memory splits (val_seq_len: a multiple of seq_len, see benchmark_deviations) and run control.
# sum_train_loss only scales the gradient (an optimizer matter: Adam's eps sees it).
FREE_FIELDS = (
    "preset", "run_id", "log_dir", "seed", "device", "compile", "cpu_threads", "micro_batch_tokens", "val_seq_len",
    "hidden_init", "qkv_init_gain", "zero_init_proj", "zero_init_value_embeds", "resid_lambda_init", "head_init_std",
    "sum_train_loss", "num_iterations", "extension_steps", "lr_stages", "cooldown_frac", "final_lr_frac",
    "optimizer", "optimizer_args", "lr", "momentum", "momentum_warmup_start", "momentum_warmup_steps",
    "momentum_cooldown_steps", "weight_decay", "mlp_weight_decay_mul", "cautious_weight_decay", "matrix_lr_muls",
    "matrix_shape_scale", "head_lr", "embed_lr", "value_embed_lr", "second_embed_lr", "gate_lr", "x0_lambda_lr",
    "scalar_lr", "adam_beta1", "adam_beta2", "scalar_beta1", "scalar_beta2", "adam_eps", "adam_weight_decay",
    "embed_head_weight_decay_mul", "value_embed_weight_decay_mul", "scalar_weight_decay_mul", "adam_step_every",
    "warmup_steps", "val_loss_every", "val_loss_every_late", "val_late_start", "print_every", "checkpoint_every",
    "checkpoint_dir", "resume", "report_baselines", "debug_crash_at_step", "dry_run", "off_benchmark",
    # speed and storage: bit-identical reductions, log buffering; bf16 storage of embeddings, head and Adam moments
    # (upstream stores its embedding in bf16 too)
    "overlap_comm", "log_flush_every", "bf16_storage",
)


def benchmark_deviations(cfg) -> list[str]:
    """The fixed fields whose value differs from the track3 preset's, and val_seq_len when it is not a multiple of
    seq_len (validation scores rows of seq_len tokens only then). Empty for other presets."""
    from config import PRESETS, Hyperparameters

    if cfg.preset != PRESET:
        return []
    reference = Hyperparameters(**PRESETS[PRESET])
    changed = [name for name in FIXED_FIELDS if getattr(cfg, name) != getattr(reference, name)]
    if cfg.val_seq_len % cfg.seq_len:  # validation rows would not be the training rows of seq_len tokens
        changed.append("val_seq_len")
    return changed


def _flag(name: str, value) -> str:
    if isinstance(value, bool):
        return f"--{'' if value else 'no-'}{name.replace('_', '-')}"
    return f"--{name.replace('_', '-')} {value!r}"


def preset_problems(cfg) -> list[str]:
    """A config error for flags that change what the track3 preset fixes, unless --off-benchmark is given."""
    changed = benchmark_deviations(cfg)
    if not changed or cfg.off_benchmark:
        return []
    flags = " ".join(_flag(name, getattr(cfg, name)) for name in changed)
    return [f"{flags}: the run would leave the benchmark (--preset {PRESET} fixes the optimizer benchmark's "
            "architecture, data and batch; only the optimizer, its schedules, the initialisation and the step count "
            "are free). Drop the flag(s), or add --off-benchmark to run anyway with the log marked off-benchmark"]


def benchmark_statement(cfg) -> str | None:
    """The line a track3 run's log carries: on the benchmark (what is fixed) or off it (what changed)."""
    if cfg.preset != PRESET:
        return None
    changed = benchmark_deviations(cfg)
    if changed:
        return (f"benchmark: OFF the optimizer benchmark (--off-benchmark): changed "
                f"{' '.join(_flag(name, getattr(cfg, name)) for name in changed)}; not comparable with track-3 results")
    return (f"benchmark: optimizer benchmark (modded-nanogpt track 3), target val loss {cfg.val_loss_target:g} in the "
            f"fewest steps; fixed: GPT-2 small ({cfg.num_layers} layers, d {cfg.model_dim}, biases, norm gains, "
            f"causal attention over {cfg.seq_len}-token rows), FineWeb, {cfg.batch_tokens} tokens/step, val on "
            f"{cfg.val_tokens} tokens; free: optimizer {cfg.optimizer} and its settings, schedules, init, "
            f"{cfg.num_iterations} steps; one forward-backward per step; significance: "
            f"({cfg.val_loss_target:g} - mean) * sqrt(n) >= {MARGIN:g} over n runs (make_record.py --track track3)")
