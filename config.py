"""The one training config: `Hyperparameters` (every field a flag), the presets, parsing and validation.

Precedence: dataclass defaults < `--preset` < explicit flags. `validate_config` checks everything that can be
checked before any work starts and raises `ConfigError` with a message that says how to fix it.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import os
from dataclasses import dataclass

import torch

# -----------------------------------------------------------------------------------------------
# Config


@dataclass
class Hyperparameters:
    """Every field is a command-line flag (`--num-iterations 200`); presets set several at once."""

    preset: str = "medium"  # one of PRESETS; without CUDA and no --preset given, cpu-tiny
    run_id: str = ""  # log goes to <log_dir>/<run_id>.txt; default: a fresh uuid4
    log_dir: str = "logs"
    seed: int = 0
    device: str = "auto"  # auto | cuda | cpu
    compile: bool = True  # torch.compile the model (slow to compile on CPU)

    # data: shards in the format of data/shards.py
    train_files: str = "data/fineweb10B/fineweb_train_*.bin"
    val_files: str = "data/fineweb10B/fineweb_val_*.bin"
    val_tokens: int = 10_485_760  # tokens of the val shard scored at every validation
    seq_len: int = 64 * 1024  # tokens per training row (documents packed, masked per document)
    micro_batch_tokens: int = 64 * 1024  # tokens per rank per forward/backward
    batch_tokens: int = 8 * 64 * 1024  # tokens per optimizer step, all ranks; accumulation fills the gap
    val_seq_len: int = 64 * 1024  # tokens per rank per validation forward (the record used 4x; memory-bound)
    val_batch_rows: int = 1  # sequences of val_seq_len per validation forward (> 1 needs plain causal attention)
    align_to_bos: bool = True  # every training row starts at a document start

    # model (GPT-2 Medium of the 22.98-min record)
    vocab_size: int = 50304  # 50257 padded to a multiple of 128
    num_layers: int = 16
    model_dim: int = 1024
    num_heads: int = 8
    head_dim: int = 128
    mlp_ratio: int = 4
    merged_qkvo: bool = True  # Q, K, V, O stored as one (4, d, d) parameter (orthogonalised per block)
    qk_norm: bool = True  # RMS-norm of q and k
    v_norm: bool = True  # RMS-norm of v
    rotary: str = "half"  # half: head_dim/4 frequencies, the other half zero frequency | full | none
    rotary_base: float = 1024.0
    attn_scale: float = 0.12  # softmax scale; 0 means 1/sqrt(head_dim)
    num_value_embeds: int = 3  # value-embedding tables, added to v in the first and last k layers
    x0_mix: bool = True  # x = l0 * x + l1 * x0 before every block
    skip_connections: str = "6:9,4:10,2:11"  # U-net skips "src:dst": output of block src added before block dst
    mlp_only_layers: str = "7"  # layers without attention
    relu_squared: bool = True  # MLP activation ReLU^2 (else GELU)
    zero_init_proj: bool = True  # attention output, MLP output and head start at zero
    logit_softcap: float = 15.0  # logits -> c * z / sqrt(z^2 + c^2); 0 turns it off
    doc_mask: bool = True  # attention stays within documents (split at bos_id)
    bos_id: int = 50256
    sliding_window: bool = True
    long_window_layers: str = "0,4,11,15"  # these layers see the full window, others half of it
    max_window_tokens: int = 3456  # window schedule: max_window * (4x^3 - 6x^2 + 3x), x = progress
    window_block: int = 128  # windows are whole 128-token blocks (FlexAttention block size)
    linear_bias: bool = False  # biases on q, k, v, o, the MLP and the head (track 3; needs --no-merged-qkvo)
    norm_gains: bool = False  # learned RMSNorm gains after the embedding, before attention / MLP and the head
    hidden_init: str = "uniform"  # hidden weights: uniform, std 0.5/sqrt(fan_in) | normal, std sqrt(0.33/fan_in)

    # optimization
    num_iterations: int = 5960
    cooldown_frac: float = 0.7  # lr multiplier 1.0, then linear decay to final_lr_frac over this share of steps
    final_lr_frac: float = 0.0
    optimizer: str = "muon"  # matrix optimizer for hidden weights: see optimizers.OPTIMIZERS
    optimizer_args: str = ""  # extra keyword args for it: "key=value,key=value"
    lr: float = 0.025  # matrix optimizer lr (Muon: spectral-norm units per update)
    momentum: float = 0.95
    momentum_warmup_start: float = 0.85  # momentum ramps from this to `momentum`
    momentum_warmup_steps: int = 300
    weight_decay: float = 0.0  # decoupled, x lr x per-group multiplier (the record's value is not in our notes: 0 until tuned)
    mlp_weight_decay_mul: float = 2.0
    head_lr: float = 1 / 320
    embed_lr: float = 0.3
    scalar_lr: float = 0.015
    adam_beta1: float = 0.8
    adam_beta2: float = 0.95
    adam_eps: float = 1e-10
    adam_weight_decay: float = 0.0  # decoupled, x lr, on embeddings, head and scalars

    # loop
    warmup_steps: int = 10  # untimed steps on random tokens to compile; model and optimizers restored after
    val_loss_every: int = 125  # 0: only at the end
    val_loss_every_late: int = 0  # from step val_late_start * num_iterations on, validate this often instead (0: off)
    val_late_start: float = 0.9
    val_loss_target: float = 0.0  # the log ends with the first validation at or below it (0: no target)
    off_benchmark: bool = False  # allow flags that leave a benchmark preset's fixed setup (the log says so)
    print_every: int = 1  # console progress every N steps (the log gets every step)
    checkpoint_every: int = 0  # 0: no periodic checkpoints
    checkpoint_dir: str = "checkpoints"
    resume: str = ""  # path of a checkpoint directory to continue from
    report_unigram: bool = False  # print the val loss of a unigram model of the same data at the end
    debug_crash_at_step: int = -1  # raise at this step (tests of crash handling); -1: off


PRESETS: dict[str, dict] = {
    # The 22.98-min medium record recipe with Polar Express coefficients in Muon (the defaults above).
    "medium": {},
    # A few million parameters that train on 2 CPU cores in under 3 minutes (demo data of data/prepare_demo_data.py).
    "cpu-tiny": dict(
        device="cpu", compile=False,
        train_files="data/demo/demo_train_*.bin", val_files="data/demo/demo_val_*.bin",
        val_tokens=32768, seq_len=256, micro_batch_tokens=1024, batch_tokens=2048, val_seq_len=4096,
        align_to_bos=False,  # the demo corpus is 49 whole books: BOS-aligned rows would only ever see their openings
        num_layers=4, model_dim=128, num_heads=4, head_dim=32,
        num_value_embeds=1, skip_connections="1:2,0:3", mlp_only_layers="", long_window_layers="0,3",
        max_window_tokens=256, window_block=32,
        num_iterations=150, lr=0.02, embed_lr=0.1, head_lr=0.01, scalar_lr=0.01,
        momentum_warmup_steps=30, warmup_steps=0, val_loss_every=25, print_every=10, report_unigram=True,
    ),
    # The optimizer benchmark (modded-nanogpt track 3), baseline #36 (tuned Muon + aux AdamW, 3250 steps, val loss
    # 3.2787 over 10 runs): records/track_3_optimization/train_gpt_simple.py. GPT-2 small with biases and norm
    # gains, plain causal attention over 1024-token rows, 524,288 tokens/step. Architecture, data and batch are
    # the benchmark's and fixed (track3.py refuses flags that change them); --optimizer and its settings are free.
    #   torchrun --standalone --nproc_per_node=8 train_gpt.py --preset track3 --optimizer spectral_ord
    "track3": dict(
        val_tokens=20 * 524_288, seq_len=1024, micro_batch_tokens=64 * 1024, batch_tokens=8 * 64 * 1024,
        val_seq_len=1024, val_batch_rows=64, align_to_bos=False,
        num_layers=12, model_dim=768, num_heads=6, head_dim=128, mlp_ratio=4, merged_qkvo=False,
        qk_norm=True, v_norm=False, rotary="half", rotary_base=1024.0, attn_scale=0.12, num_value_embeds=0,
        x0_mix=False, skip_connections="", mlp_only_layers="", relu_squared=True, zero_init_proj=True,
        logit_softcap=15.0, doc_mask=False, sliding_window=False, long_window_layers="",
        linear_bias=True, norm_gains=True, hidden_init="normal",
        num_iterations=3250, cooldown_frac=0.7, final_lr_frac=0.0,
        optimizer="muon", lr=0.025, momentum=0.95, momentum_warmup_steps=0, weight_decay=0.05,
        mlp_weight_decay_mul=1.0, embed_lr=0.7, head_lr=0.004, scalar_lr=0.015, adam_beta1=0.8, adam_beta2=0.95,
        # The benchmark sums the loss over the step's tokens, we average it: the gradient is 524,288x smaller
        # here, and Adam with eps / 524,288 takes exactly the benchmark's steps (Muon is scale-free).
        adam_eps=1e-10 / (8 * 64 * 1024), adam_weight_decay=0.001,
        val_loss_every=125, val_loss_every_late=25, val_late_start=0.9, val_loss_target=3.28,
    ),
}


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected a boolean (true/false), got {text!r}")


def parse_config(argv: list[str] | None = None, cuda_available: bool | None = None) -> Hyperparameters:
    """Defaults < preset < explicit flags. Unknown flags are errors."""
    parser = argparse.ArgumentParser(
        description="Train GPT on token shards. Every Hyperparameters field is a flag; see README.md.",
        argument_default=argparse.SUPPRESS,
    )
    for f in dataclasses.fields(Hyperparameters):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction)
        else:
            kind = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
            parser.add_argument(flag, type=kind, metavar=f.type.upper() if isinstance(f.type, str) else None)
    given = vars(parser.parse_args(argv))
    if "preset" not in given:
        if cuda_available is None:
            cuda_available = torch.cuda.is_available()
        given["preset"] = "medium" if cuda_available else "cpu-tiny"
    if given["preset"] not in PRESETS:
        parser.error(f"unknown preset {given['preset']!r}; choose one of {', '.join(PRESETS)}")
    values = dict(PRESETS[given["preset"]])
    values.update(given)
    return Hyperparameters(**values)


def parse_int_list(text: str) -> list[int]:
    return [int(x) for x in text.replace(" ", "").split(",") if x]


def parse_skips(text: str) -> list[tuple[int, int]]:
    pairs = []
    for item in text.replace(" ", "").split(","):
        if item:
            src, dst = item.split(":")
            pairs.append((int(src), int(dst)))
    return pairs


def parse_optimizer_args(text: str) -> dict:
    """'a=1,b=0.5,c=true,d=name' -> {'a': 1, 'b': 0.5, 'c': True, 'd': 'name'}."""
    out = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        if "=" not in item:
            raise ValueError(f"--optimizer-args item {item!r} is not key=value (example: spectral_lr_mul=0.5,decompose=true)")
        key, raw = (s.strip() for s in item.split("=", 1))
        for convert in (int, float, _parse_bool):
            try:
                out[key] = convert(raw)
                break
            except ValueError:
                continue
        else:
            out[key] = raw
    return out


class ConfigError(ValueError):
    """A configuration that cannot work; raised before any training work starts."""


def validate_config(cfg: Hyperparameters, world_size: int) -> int:
    """Checks everything that can be checked before work starts. Returns gradient-accumulation steps."""
    import track3
    from optimizers import get_optimizer_class

    problems = []
    if cfg.micro_batch_tokens % cfg.seq_len:
        problems.append(f"micro_batch_tokens ({cfg.micro_batch_tokens}) must be a multiple of seq_len ({cfg.seq_len})")
    per_step = world_size * cfg.micro_batch_tokens
    if cfg.batch_tokens % per_step:
        valid = max(1, round(cfg.batch_tokens / per_step)) * per_step
        problems.append(
            f"batch_tokens ({cfg.batch_tokens}) is not divisible by world_size x micro_batch_tokens "
            f"({world_size} x {cfg.micro_batch_tokens} = {per_step}); use --batch-tokens {valid}, or a world size / "
            f"--micro-batch-tokens that divides it")
    val_per_step = world_size * cfg.val_seq_len * max(cfg.val_batch_rows, 1)
    if cfg.val_tokens % val_per_step:
        valid = max(1, cfg.val_tokens // val_per_step) * val_per_step
        problems.append(f"val_tokens ({cfg.val_tokens}) is not a multiple of world_size x val_seq_len x val_batch_rows "
                        f"({val_per_step}); use --val-tokens {valid}")
    masked = cfg.doc_mask or cfg.sliding_window  # attention needs a mask (else plain causal over each row)
    uses_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if cfg.val_batch_rows < 1:
        problems.append(f"val_batch_rows must be >= 1, got {cfg.val_batch_rows}")
    elif cfg.val_batch_rows > 1 and masked and uses_cuda:
        problems.append("val_batch_rows > 1 needs plain causal attention on CUDA (--no-doc-mask --no-sliding-window); "
                        "use --val-batch-rows 1")
    if cfg.linear_bias and cfg.merged_qkvo:
        problems.append("linear_bias needs separate q, k, v, o weights: add --no-merged-qkvo")
    if cfg.hidden_init not in ("uniform", "normal"):
        problems.append(f"hidden_init must be uniform or normal, got {cfg.hidden_init!r}")
    if cfg.val_loss_every_late < 0 or not 0 <= cfg.val_late_start <= 1:
        problems.append("val_loss_every_late must be >= 0 and val_late_start in [0, 1]")
    if cfg.model_dim != cfg.num_heads * cfg.head_dim:
        problems.append(f"model_dim ({cfg.model_dim}) must equal num_heads x head_dim ({cfg.num_heads} x {cfg.head_dim})")
    if cfg.rotary not in ("half", "full", "none"):
        problems.append(f"rotary must be half, full or none, got {cfg.rotary!r}")
    if cfg.num_value_embeds * 2 > cfg.num_layers:
        problems.append(f"num_value_embeds ({cfg.num_value_embeds}) x 2 exceeds num_layers ({cfg.num_layers})")
    for src, dst in parse_skips(cfg.skip_connections):
        if not 0 <= src < dst < cfg.num_layers:
            problems.append(f"skip connection {src}:{dst} needs 0 <= src < dst < num_layers ({cfg.num_layers})")
    for name in ("mlp_only_layers", "long_window_layers"):
        bad = [i for i in parse_int_list(getattr(cfg, name)) if not 0 <= i < cfg.num_layers]
        if bad:
            problems.append(f"{name} has layers {bad} outside 0..{cfg.num_layers - 1}")
    if cfg.num_iterations < 1:
        problems.append("num_iterations must be >= 1")
    if cfg.device not in ("auto", "cuda", "cpu"):
        problems.append(f"device must be auto, cuda or cpu, got {cfg.device!r}")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        problems.append("device cuda was asked for but torch sees no CUDA device; use --device cpu (or a CPU preset)")
    try:
        get_optimizer_class(cfg.optimizer)
        parse_optimizer_args(cfg.optimizer_args)
    except ValueError as exc:
        problems.append(str(exc))
    if not cfg.resume:
        for name, pattern in (("train_files", cfg.train_files), ("val_files", cfg.val_files)):
            if not glob.glob(pattern):
                hint = ("python data/prepare_demo_data.py" if "demo" in pattern
                        else "python data/cached_fineweb10B.py 24")
                problems.append(f"{name}: no file matches {pattern!r}; make the data first ({hint}) or pass --{name.replace('_', '-')}")
    elif not os.path.isdir(cfg.resume):
        problems.append(f"--resume {cfg.resume!r} is not a checkpoint directory")
    problems += track3.preset_problems(cfg)  # flags that would leave the optimizer benchmark
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
    return cfg.batch_tokens // per_step
