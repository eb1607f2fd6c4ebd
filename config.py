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

    preset: str = "medium"  # one of PRESETS; without CUDA and no --preset given, CPU_DEFAULT_PRESET
    run_id: str = ""  # log goes to <log_dir>/<run_id>.txt; default: a fresh uuid4
    log_dir: str = "logs"
    seed: int = 0
    device: str = "auto"  # auto | cuda | cpu
    compile: bool = True  # torch.compile the model (slow to compile on CPU)
    cpu_threads: int = 0  # torch threads when the device is the CPU (0: torch's default, one per core)

    # data: shards in the format of data/shards.py
    train_files: str = "data/fineweb10B/fineweb_train_*.bin"
    val_files: str = "data/fineweb10B/fineweb_val_*.bin"
    val_tokens: int = 10_485_760  # tokens of the val shard scored at every validation
    seq_len: int = 64 * 1024  # tokens per training row (documents packed, masked per document)
    micro_batch_tokens: int = 64 * 1024  # tokens per rank per forward/backward
    batch_tokens: int = 8 * 64 * 1024  # tokens per optimizer step, all ranks; accumulation fills the gap
    val_seq_len: int = 64 * 1024  # tokens per rank per val forward (the record used 4x; memory-bound); CPU: rows of seq_len
    align_to_bos: bool = True  # every training row starts at a document start (row loader only)
    sample_rows: bool = False  # draw every training row at random (from --seed); off: read the shards in order
    pack_documents: bool = False  # each forward packs whole documents into one row of this step's micro-batch tokens
    max_doc_tokens: int = 4096  # packed documents are cut to this many tokens (record 18: 4096)

    # model (GPT-2 Medium; the defaults are the record-8 architecture, `medium` switches on record 18's features)
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
    attn_scale: float = 0.12  # softmax scale (with yarn: the starting scale); 0 means 1/sqrt(head_dim)
    qkv_init_gain: float = 0.5  # Q, K, V weights start uniform with std qkv_init_gain / sqrt(model_dim)
    qkvo_scales: bool = False  # learned scalars on the QKV weights (init 0.5) and the O weight (init 1.0)
    key_offset: bool = False  # long-window layers: keys' zero-frequency rotary dims come from the previous position
    yarn: bool = False  # at each long-window change, YaRN rescales rotary and attention scale *= 1 + 0.2 ln(new/old)
    attn_output_gate: bool = False  # each head's output *= sigmoid(W x[:gate_dims]), W zero-init
    gate_dims: int = 16  # every gate reads the first gate_dims channels of its input
    num_value_embeds: int = 3  # value-embedding tables, added to v in the first and last k layers
    value_embed_gates: bool = False  # v += 2 sigmoid(W x[:gate_dims]) * ve per head (else v = l0 v + l1 ve)
    zero_init_value_embeds: bool = False
    x0_mix: bool = True  # x = r x + a x0 (+ b x02) before every block, learned per block
    resid_lambda_init: float = 1.0  # r at init (record 18: 1.05)
    second_embed: bool = False  # a second input embedding x02 joins the x0 mix
    smear: bool = False  # x_t += lambda sigmoid(W x_t[:gate_dims]) x_{t-1} on the input embedding (lambda init 0)
    skip_connections: str = "6:9,4:10,2:11"  # U-net skips "src:dst": output of block src added before block dst
    gated_skips: bool = False  # skip j scaled by sigmoid(s_j) * 2 sigmoid(W_j x0[:gate_dims]) (s init -1.5)
    backout_layer: int = -1  # x -= lambda * (output of this block) before the head (lambda init 0.5); -1: off
    mlp_only_layers: str = "7"  # layers without attention
    relu_squared: bool = True  # MLP activation ReLU^2 (else GELU)
    zero_init_proj: bool = True  # attention output, MLP output and head start at zero
    head_init_std: float = 0.0  # > 0: head weights start N(0, head_init_std^2) instead
    logit_softcap: float = 15.0  # cap c of the logits; 0 turns it off
    logit_softcap_kind: str = "isru"  # isru: c z / sqrt(z^2 + c^2); sigmoid: c sigmoid((z + shift) / temperature)
    logit_sigmoid_shift: float = 5.0
    logit_sigmoid_temperature: float = 7.5
    bf16_cross_entropy: bool = False  # training loss on the bf16 logits of autocast (CUDA) instead of fp32
    sum_train_loss: bool = False  # training loss summed over tokens (logs still show the mean per token)
    tied_head_frac: float = 0.0  # > 0: input embedding is the head's weight until this share of scheduled steps
    doc_mask: bool = True  # attention stays within documents (split at bos_id)
    bos_id: int = 50256
    sliding_window: bool = True  # a query sees itself and the window's tokens before it, nothing older
    long_window_layers: str = "0,4,11,15"  # these layers see the long window, others the short one
    max_window_tokens: int = 3456  # without window_schedule: max_window * (4x^3 - 6x^2 + 3x), x = progress
    window_block: int = 128  # windows are whole blocks of this many tokens
    linear_bias: bool = False  # biases on q, k, v, o, the MLP and the head (track 3; needs --no-merged-qkvo)
    norm_gains: bool = False  # learned RMSNorm gains after the embedding, before attention / MLP and the head
    hidden_init: str = "uniform"  # hidden weights: uniform (std qkv_init_gain or 0.5 / sqrt(fan_in)) | normal
    #   (std sqrt(0.33 / fan_in), track 3)

    # schedules (see schedules.py): stages split the scheduled steps num_iterations - extension_steps evenly
    num_iterations: int = 5960  # optimizer steps of the run, extension included
    extension_steps: int = 0  # steps after the schedules end, at the final lr, full batch and extension window
    batch_schedule: str = ""  # tokens/step per stage, comma-separated ("" = batch_tokens throughout)
    lr_stages: str = ""  # peak lr multiplier per stage, stage k from x > k/n ("" = 1.0)
    cooldown_frac: float = 0.7  # then linear decay to final_lr_frac over this share of the scheduled steps
    final_lr_frac: float = 0.0
    window_schedule: str = ""  # long window in blocks per stage ("" = the cubic schedule of max_window_tokens)
    short_window_max_blocks: int = 0  # short window = long // 2, at most this many blocks (0: no cap)
    extension_window_blocks: int = 0  # long window during the extension steps (0: the last stage's)
    final_window_blocks: int = 0  # long window of the final validation (0: the last step's)
    yarn_max_window_blocks: int = 0  # YaRN rescales only when the new long window is at most this (0: always)
    mtp_weights: str = ""  # loss weights of the next 1, 2, ... tokens at step 0 ("" = next token only)
    mtp_frac: float = 0.25  # extra targets are dropped one by one over the first 2/3 of this share of steps
    optimizer: str = "muon"  # matrix optimizer for hidden weights: see optimizers.OPTIMIZERS
    optimizer_args: str = ""  # extra keyword args for it: "key=value,key=value"
    lr: float = 0.025  # matrix optimizer lr (Muon: spectral-norm units per update)
    momentum: float = 0.95
    momentum_warmup_start: float = 0.85  # momentum ramps from this to `momentum`
    momentum_warmup_steps: int = 300
    momentum_cooldown_steps: int = 0  # momentum falls back to momentum_warmup_start over the run's last steps
    weight_decay: float = 0.0  # matrix optimizer: decoupled, x lr x per-group multiplier (cautious: x lr^2 x lr_mul)
    mlp_weight_decay_mul: float = 2.0
    cautious_weight_decay: bool = False  # matrices and Adam decay only where update and weight agree in sign
    matrix_lr_muls: str = ""  # per-role lr multipliers of the matrix optimizer: "attn=2,mlp_in=2,mlp_out=4,gate=0.1"
    matrix_shape_scale: str = "muon"  # muon: lr x max(1, rows/cols)^0.5 x lr_mul; none: lr x lr_mul (record 18)
    head_lr: float = 1 / 320
    embed_lr: float = 0.3
    value_embed_lr: float = 0.0  # 0: embed_lr
    second_embed_lr: float = 0.3
    gate_lr: float = 4e-5  # Adam lr of the one-output gates (smear, skips)
    x0_lambda_lr: float = 0.0  # 0: scalar_lr
    scalar_lr: float = 0.015
    adam_beta1: float = 0.8
    adam_beta2: float = 0.95
    scalar_beta1: float = 0.8  # Adam betas of the scalar group
    scalar_beta2: float = 0.95
    adam_eps: float = 1e-10
    adam_weight_decay: float = 0.0  # on embeddings and head only (x the multipliers below)
    embed_head_weight_decay_mul: float = 1.0  # input embedding and head
    value_embed_weight_decay_mul: float = 1.0  # value embeddings and the second embedding
    scalar_weight_decay_mul: float = 0.0  # the scalar group: biases, norm gains, lambdas (track 3's AdamW: 1.0)
    adam_step_every: int = 1  # Adam steps on every k-th step, on the summed gradients (record 18: 2, odd steps)
    bf16_storage: bool = False  # embeddings, head and gates stored in bf16, Adam moments in bf16 (record 18; CUDA only)

    # speed
    overlap_comm: bool = True  # Adam reduces inside backward, the matrix optimizer's reductions start before Adam's
    #                            update (bit-identical results; off: every reduction starts in its optimizer's step)
    log_flush_every: int = 50  # per-step losses stay on the device; the log's step lines are written every N steps

    # loop
    warmup_steps: int = 10  # untimed compile warm-up on random tokens (0: none): steps 0..N-1, every schedule
    #                         transition and the steps on either side (schedules.warmup_plan); state restored after
    val_loss_every: int = 125  # 0: only at the end
    val_loss_every_late: int = 0  # from step val_late_start * num_iterations on, validate this often instead (0: off)
    val_late_start: float = 0.9
    val_loss_target: float = 0.0  # the log ends with the first validation at or below it (0: no target)
    off_benchmark: bool = False  # allow flags that leave a benchmark preset's fixed setup (the log says so)
    print_every: int = 1  # console progress every N steps (the log gets every step)
    checkpoint_every: int = 0  # 0: no periodic checkpoints
    checkpoint_dir: str = "checkpoints"
    resume: str = ""  # path of a checkpoint directory to continue from
    report_baselines: bool = False  # print the val losses of unigram and bigram models of the same data at the end
    debug_crash_at_step: int = -1  # raise at this step (tests of crash handling); -1: off
    dry_run: bool = False  # print the resolved config and the schedule table, then exit (no data, no GPU)


# Record 18 of the medium track (17.35 min, 4740 steps, 2025-12-31): train_gpt_medium.py at commit
# d701163974e3e98d41b22aaece1cd2aa1ab41cd7 of KellerJordan/modded-nanogpt. Values are the record's (README.md,
# "Presets", lists what differs).
MEDIUM_RECORD_18 = dict(
    # data: documents packed per rank from their BOS, each cut at 4096 tokens; validation 262,144 tokens per
    # rank per forward (the record's 2,097,152 over 8 ranks)
    pack_documents=True, max_doc_tokens=4096, val_seq_len=4 * 64 * 1024,
    # model
    qkv_init_gain=1.0, qkvo_scales=True, v_norm=False, key_offset=True, yarn=True, attn_scale=0.1,
    attn_output_gate=True, num_value_embeds=5, value_embed_gates=True, zero_init_value_embeds=True,
    resid_lambda_init=1.05, second_embed=True, smear=True, gated_skips=True, backout_layer=11, mlp_only_layers="",
    head_init_std=0.005, logit_softcap=23.0, logit_softcap_kind="sigmoid", bf16_cross_entropy=True,
    sum_train_loss=True, tied_head_frac=1 / 6,
    # schedules: 4700 scheduled + 40 extension steps; stages are twelfths of the 4700
    num_iterations=4740, extension_steps=40,
    batch_schedule="131072,262144,393216" + ",524288" * 9, batch_tokens=8 * 64 * 1024, micro_batch_tokens=64 * 1024,
    lr_stages="1.0,1.52,1.73" + ",2.0" * 9, cooldown_frac=0.7, final_lr_frac=0.1,
    window_schedule="3,7,11,13,15,17,19,21,23,23,23,23", window_block=128, short_window_max_blocks=11,
    extension_window_blocks=23, final_window_blocks=27, yarn_max_window_blocks=13,
    mtp_weights="1,0.5,0.25", mtp_frac=0.25,
    momentum=0.95, momentum_warmup_start=0.85, momentum_warmup_steps=300, momentum_cooldown_steps=50,
    # optimizers: NorMuon on the matrices, lr 0.015 x the record's products of shape factor and lr_mul (attention 2,
    # MLP in 2, MLP out 4, per-head gates 0.1, stated whole: shape_scale none), cautious decay 1.2; Adam 0.004
    # (value embeddings and the second embedding 0.3, one-output gates 4e-5, x0 lambdas 0.02), scalars 0.04 with
    # betas 0.9/0.99, cautious decay 0.005 (x150 embedding and head, x5 value embeddings), stepping on odd steps
    optimizer="normuon", lr=0.015, weight_decay=1.2, mlp_weight_decay_mul=1.0, cautious_weight_decay=True,
    matrix_lr_muls="attn=2,mlp_in=2,mlp_out=4,gate=0.1", matrix_shape_scale="none",
    embed_lr=0.004, head_lr=0.004, value_embed_lr=0.3, second_embed_lr=0.3, gate_lr=4e-5, x0_lambda_lr=0.02,
    scalar_lr=0.04, adam_beta1=0.8, adam_beta2=0.95, scalar_beta1=0.9, scalar_beta2=0.99, adam_eps=1e-8,
    adam_weight_decay=0.005, embed_head_weight_decay_mul=150.0, value_embed_weight_decay_mul=5.0, adam_step_every=2,
    val_loss_every=250,
)

# The CPU presets' model and optimizer settings (cpu-bytes and cpu-tiny differ only in tokens, rows and steps).
CPU_SMALL_MODEL = dict(
    device="cpu", compile=False,
    cpu_threads=1,  # 128-wide matrices gain little from a 2nd thread; on a busy machine it was 4x slower
    val_tokens=32768, val_seq_len=4096,
    num_layers=4, model_dim=128, num_heads=4, head_dim=32,
    num_value_embeds=1, skip_connections="1:2,0:3", mlp_only_layers="", long_window_layers="0,3", window_block=32,
    lr=0.02, embed_lr=0.1, head_lr=0.01, scalar_lr=0.01, warmup_steps=0, report_baselines=True,
)

PRESETS: dict[str, dict] = {
    "medium": MEDIUM_RECORD_18,
    # Record 8 of the medium track (24.50 min, 5960 steps, 04/22/25): the recipe of
    # records/track_2_medium/2025-11-12_BlockMaskRedundantOp/train_gpt_medium.py of KellerJordan/modded-nanogpt
    # (file version at commit 152abbcbeef7f714a5b1181668dace4d97fa4a52: record 8 plus a one-line mask change),
    # the previous `medium`: the defaults above with the record's Muon weight decay 0.01 (x2 on the MLP). Known
    # differences from record 8: BOS-aligned rows (the record had none), validation 65,536 tokens per rank per
    # forward (the record: 262,144), token-level windows (the record: whole 128-token blocks).
    "medium-r8": dict(weight_decay=0.01),
    # `medium` with every record-18 feature on at CPU size (demo data, 16 layers of d=64, no compile). Every stage
    # is a share of the scheduled steps, so a 40-step run crosses each batch, window, MTP and untie transition:
    # 38 scheduled + 2 extension steps, windows in 16-token blocks (the record's block counts), tokens/step 256 ->
    # 1024 in the record's ratios over 2 forwards per step. The step counts that are not shares stay fixed when
    # --num-iterations changes: 2 extension steps, momentum warm-up 3 and cool-down 2.
    "medium-tiny": {
        **MEDIUM_RECORD_18,
        **dict(
            device="cpu", compile=False,
            train_files="data/demo/demo_train_*.bin", val_files="data/demo/demo_val_*.bin",
            val_tokens=4096, val_seq_len=1024,
            num_layers=16, model_dim=64, num_heads=2, head_dim=32,
            num_iterations=40, extension_steps=2, momentum_warmup_steps=3, momentum_cooldown_steps=2,
            batch_schedule="256,512,768" + ",1024" * 9, batch_tokens=1024, micro_batch_tokens=512,
            window_block=16, warmup_steps=0, val_loss_every=10, print_every=5,
        ),
    },
    # The CPU research loop and demo (`python train_gpt.py` without CUDA): byte-level tokens of the shuffled demo
    # corpus (`data/prepare_demo_data.py`, data/demo/bytes_*), so the hidden matrices (0.8M parameters) dominate
    # the compute and the loss, not a 50,304-way head. 300 steps x 1,024 bytes: 1.5 minutes on one thread of an
    # idle machine.
    "cpu-bytes": dict(
        **CPU_SMALL_MODEL,
        train_files="data/demo/bytes_train_*.bin", val_files="data/demo/bytes_val_*.bin",
        vocab_size=256, bos_id=0,  # UTF-8 bytes 1..255; 0 marks a document start
        seq_len=128, micro_batch_tokens=1024, batch_tokens=1024,
        align_to_bos=False,  # documents (1,000-5,000 bytes) are longer than a row: aligned rows would skip most text
        sample_rows=True,  # independent rows: each 1,024-byte step (and micro-batch) mixes 8 documents
        max_window_tokens=128, num_iterations=300, momentum_warmup_steps=60, val_loss_every=50, print_every=25,
    ),
    # The same architecture on GPT-2 tokens of the demo corpus (data/demo/demo_*): 20M parameters, 19M of them in
    # the three vocab tables, so the 50,304-way head takes most of the compute. Checks the GPT-2 path on a CPU.
    "cpu-tiny": dict(
        **CPU_SMALL_MODEL,
        train_files="data/demo/demo_train_*.bin", val_files="data/demo/demo_val_*.bin",
        seq_len=256, micro_batch_tokens=1024, batch_tokens=2048,
        align_to_bos=False,  # documents (300-1,500 tokens) are longer than a row: aligned rows would skip most text
        sample_rows=True,  # independent rows: each step mixes 8 documents
        max_window_tokens=256, num_iterations=150, momentum_warmup_steps=30, val_loss_every=25, print_every=10,
    ),
    # The optimizer benchmark (modded-nanogpt track 3), baseline #36 (tuned Muon + aux AdamW, 3250 steps, val loss
    # 3.2787 over 10 runs): records/track_3_optimization/train_gpt_simple.py. GPT-2 small with biases and norm
    # gains, plain causal attention over 1024-token rows, 524,288 tokens/step. Architecture, data and batch are
    # the benchmark's and fixed (track3.py refuses flags that change them); --optimizer and its settings are free.
    #   torchrun --standalone --nproc_per_node=8 train_gpt.py --preset track3 --optimizer spectral_ord
    "track3": dict(
        # validation: 64 rows of 1024 tokens per forward (val_seq_len is the forward's tokens, in rows of seq_len)
        val_tokens=20 * 524_288, seq_len=1024, micro_batch_tokens=64 * 1024, batch_tokens=8 * 64 * 1024,
        val_seq_len=64 * 1024, align_to_bos=False,
        num_layers=12, model_dim=768, num_heads=6, head_dim=128, mlp_ratio=4, merged_qkvo=False,
        qk_norm=True, v_norm=False, rotary="half", rotary_base=1024.0, attn_scale=0.12, num_value_embeds=0,
        x0_mix=False, skip_connections="", mlp_only_layers="", relu_squared=True, zero_init_proj=True,
        logit_softcap=15.0, doc_mask=False, sliding_window=False, long_window_layers="",
        linear_bias=True, norm_gains=True, hidden_init="normal",
        num_iterations=3250, cooldown_frac=0.7, final_lr_frac=0.0,
        optimizer="muon", lr=0.025, momentum=0.95, momentum_warmup_steps=0, weight_decay=0.05,
        mlp_weight_decay_mul=1.0, embed_lr=0.7, head_lr=0.004, scalar_lr=0.015, adam_beta1=0.8, adam_beta2=0.95,
        scalar_beta1=0.8, scalar_beta2=0.95,
        # The benchmark sums the loss over the step's tokens, we average it: the gradient is 524,288x smaller
        # here, and Adam with eps / 524,288 takes exactly the benchmark's steps (Muon is scale-free).
        # AdamW's weight decay 0.001 covers every Adam parameter, the 1-D ones included.
        adam_eps=1e-10 / (8 * 64 * 1024), adam_weight_decay=0.001, scalar_weight_decay_mul=1.0,
        val_loss_every=125, val_loss_every_late=25, val_late_start=0.9, val_loss_target=3.28,
    ),
}
CPU_DEFAULT_PRESET = "cpu-bytes"  # the preset of `python train_gpt.py` on a machine without CUDA


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
        given["preset"] = "medium" if cuda_available else CPU_DEFAULT_PRESET
    if given["preset"] not in PRESETS:
        parser.error(f"unknown preset {given['preset']!r}; choose one of {', '.join(PRESETS)}")
    values = dict(PRESETS[given["preset"]])
    values.update(given)
    return Hyperparameters(**values)


def parse_int_list(text: str) -> list[int]:
    return [int(x) for x in text.replace(" ", "").split(",") if x]


def parse_float_list(text: str) -> list[float]:
    return [float(x) for x in text.replace(" ", "").split(",") if x]


MATRIX_ROLES = ("attn", "mlp_in", "mlp_out", "gate")  # the matrix optimizer's parameter groups (model.py)


def parse_matrix_lr_muls(text: str) -> dict[str, float]:
    """'attn=2,mlp_out=4' -> {'attn': 2.0, 'mlp_in': 1.0, 'mlp_out': 4.0, 'gate': 1.0}."""
    muls = dict.fromkeys(MATRIX_ROLES, 1.0)
    for item in text.replace(" ", "").split(","):
        if not item:
            continue
        role, _, value = item.partition("=")
        if role not in muls or not value:
            raise ValueError(f"--matrix-lr-muls item {item!r} is not role=number with role one of {', '.join(MATRIX_ROLES)}")
        muls[role] = float(value)
    return muls


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


DATA_CHECK_TOKENS = 1 << 20  # tokens of the first shard compared with vocab_size before a run (2 MB read)


def data_vocab_problems(name: str, path: str, vocab_size: int) -> list[str]:
    """A problem if the first DATA_CHECK_TOKENS tokens of the shard at `path` hold an id >= vocab_size (data of
    another tokenizer than the model's vocabulary); none for a file that is not a readable shard (the loader
    reports those with their own messages)."""
    from data.shards import ShardFormatError, read_shard

    try:
        head = read_shard(path)[:DATA_CHECK_TOKENS]
    except (OSError, ShardFormatError):
        return []
    if head.size and int(head.max()) >= vocab_size:
        return [f"{name}: {path} holds token id {int(head.max())}, but vocab_size is {vocab_size}; the data comes from "
                f"another tokenizer than the model's (GPT-2 data needs vocab_size >= 50257: preset cpu-tiny or medium; "
                f"byte data, bytes_*.bin: preset cpu-bytes)"]
    return []


class ConfigError(ValueError):
    """A configuration that cannot work; raised before any training work starts."""


POSITIVE_INTS = ("seq_len", "micro_batch_tokens", "batch_tokens", "val_seq_len", "val_tokens", "vocab_size",
                 "num_layers", "model_dim", "num_heads", "head_dim", "mlp_ratio", "window_block", "max_doc_tokens",
                 "gate_dims", "num_iterations", "print_every", "max_window_tokens", "log_flush_every")
NON_NEGATIVE_INTS = ("cpu_threads", "extension_steps", "val_loss_every", "val_loss_every_late", "checkpoint_every",
                     "warmup_steps", "momentum_warmup_steps", "momentum_cooldown_steps", "num_value_embeds",
                     "short_window_max_blocks", "extension_window_blocks", "final_window_blocks",
                     "yarn_max_window_blocks")
LEARNING_RATES = ("lr", "head_lr", "embed_lr", "value_embed_lr", "second_embed_lr", "gate_lr", "x0_lambda_lr",
                  "scalar_lr")
UNIT_INTERVAL = ("momentum", "momentum_warmup_start", "adam_beta1", "adam_beta2", "scalar_beta1", "scalar_beta2")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def preset_hint(cfg: Hyperparameters, name: str) -> str:
    """'; preset P uses --name V' (the value to go back to), from the preset or the dataclass default."""
    default = PRESETS.get(cfg.preset, {}).get(name, Hyperparameters.__dataclass_fields__[name].default)
    return f"; preset {cfg.preset} uses {flag(name)} {default}"


def _check_sizes(cfg: Hyperparameters) -> list[str]:
    problems = []
    for name in POSITIVE_INTS:
        if getattr(cfg, name) < 1:
            problems.append(f"{flag(name)} must be a positive integer, got {getattr(cfg, name)}{preset_hint(cfg, name)}")
    for name in NON_NEGATIVE_INTS:
        if getattr(cfg, name) < 0:
            problems.append(f"{flag(name)} must be >= 0, got {getattr(cfg, name)}{preset_hint(cfg, name)}")
    return problems


def _check_optimizers(cfg: Hyperparameters) -> list[str]:
    """Every optimizer hyperparameter in range, checked by the optimizers' own constructors on a stand-in."""
    from optimizers import DistAdam, get_optimizer_class

    problems = []
    for name in LEARNING_RATES:
        if not getattr(cfg, name) >= 0:
            problems.append(f"{flag(name)} must be >= 0 (a step size), got {getattr(cfg, name)}{preset_hint(cfg, name)}")
    for name in UNIT_INTERVAL:
        if not 0 <= getattr(cfg, name) < 1:
            problems.append(f"{flag(name)} must be in [0, 1), got {getattr(cfg, name)}{preset_hint(cfg, name)}")
    for name in ("adam_eps", "weight_decay", "mlp_weight_decay_mul", "final_lr_frac", "adam_weight_decay",
                 "embed_head_weight_decay_mul", "value_embed_weight_decay_mul", "scalar_weight_decay_mul"):
        if not getattr(cfg, name) >= 0:
            problems.append(f"{flag(name)} must be >= 0, got {getattr(cfg, name)}{preset_hint(cfg, name)}")
    if cfg.adam_step_every < 1:
        problems.append(f"--adam-step-every must be >= 1 (1: every step), got {cfg.adam_step_every}")
    if cfg.matrix_shape_scale not in ("muon", "none"):
        problems.append(f"--matrix-shape-scale must be muon or none, got {cfg.matrix_shape_scale!r}")
    if not 0 <= cfg.cooldown_frac <= 1:
        problems.append(f"--cooldown-frac must be in [0, 1], got {cfg.cooldown_frac}")
    try:
        muls = parse_matrix_lr_muls(cfg.matrix_lr_muls)
        problems += [f"--matrix-lr-muls {role}={mul} must be >= 0" for role, mul in muls.items() if not mul >= 0]
    except ValueError as exc:
        problems.append(str(exc))
    if problems:
        return problems
    stand_in = [torch.nn.Parameter(torch.zeros(2, 2))]
    try:
        matrix_cls = get_optimizer_class(cfg.optimizer)
        kwargs = parse_optimizer_args(cfg.optimizer_args)
        matrix_cls(stand_in, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, **kwargs)
        DistAdam(stand_in, lr=cfg.embed_lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)
    except (TypeError, ValueError) as exc:
        problems.append(f"--optimizer {cfg.optimizer} with --optimizer-args {cfg.optimizer_args!r}: {exc}; fix the "
                        "flag it names (see the optimizer's docstring for each argument)")
    return problems


def _check_model(cfg: Hyperparameters) -> list[str]:
    problems = []
    if cfg.model_dim != cfg.num_heads * cfg.head_dim:
        problems.append(f"model_dim ({cfg.model_dim}) must equal num_heads x head_dim ({cfg.num_heads} x {cfg.head_dim})")
    if cfg.rotary not in ("half", "full", "none"):
        problems.append(f"rotary must be half, full or none, got {cfg.rotary!r}")
    elif cfg.rotary == "half" and cfg.head_dim % 4:
        problems.append(f"--rotary half needs head_dim divisible by 4, got {cfg.head_dim}")
    if cfg.key_offset and cfg.rotary != "half":
        problems.append("--key-offset shifts the zero-frequency rotary dims, which only --rotary half has")
    if cfg.yarn and cfg.rotary == "none":
        problems.append("--yarn rescales rotary frequencies: use --rotary half or full, or --no-yarn")
    if cfg.num_value_embeds * 2 > cfg.num_layers:
        problems.append(f"num_value_embeds ({cfg.num_value_embeds}) x 2 exceeds num_layers ({cfg.num_layers})")
    if not 0 <= cfg.bos_id < cfg.vocab_size:
        problems.append(f"bos_id ({cfg.bos_id}) must be a token id below vocab_size ({cfg.vocab_size})")
    if cfg.gate_dims > cfg.model_dim:
        problems.append(f"--gate-dims ({cfg.gate_dims}) exceeds model_dim ({cfg.model_dim})")
    if not -1 <= cfg.backout_layer < cfg.num_layers:
        problems.append(f"--backout-layer must be -1 (off) or a layer in 0..{cfg.num_layers - 1}, got {cfg.backout_layer}")
    if cfg.logit_softcap_kind not in ("isru", "sigmoid"):
        problems.append(f"--logit-softcap-kind must be isru or sigmoid, got {cfg.logit_softcap_kind!r}")
    if not cfg.logit_softcap >= 0 or not cfg.logit_sigmoid_temperature > 0:
        problems.append("--logit-softcap must be >= 0 and --logit-sigmoid-temperature > 0")
    if not 0 <= cfg.tied_head_frac < 1:
        problems.append(f"--tied-head-frac must be in [0, 1) (0: never tied), got {cfg.tied_head_frac}")
    if cfg.linear_bias and cfg.merged_qkvo:
        problems.append("--linear-bias needs separate q, k, v, o weights: add --no-merged-qkvo")
    if cfg.hidden_init not in ("uniform", "normal"):
        problems.append(f"--hidden-init must be uniform or normal, got {cfg.hidden_init!r}")
    try:
        for src, dst in parse_skips(cfg.skip_connections):
            if not 0 <= src < dst < cfg.num_layers:
                problems.append(f"skip connection {src}:{dst} needs 0 <= src < dst < num_layers ({cfg.num_layers})")
        for name in ("mlp_only_layers", "long_window_layers"):
            bad = [i for i in parse_int_list(getattr(cfg, name)) if not 0 <= i < cfg.num_layers]
            if bad:
                problems.append(f"{name} has layers {bad} outside 0..{cfg.num_layers - 1}")
    except ValueError:
        problems.append("--skip-connections must look like 6:9,4:10 and --mlp-only-layers / --long-window-layers "
                        "like 0,4,11")
    return problems


def _check_schedules(cfg: Hyperparameters, world_size: int, check_device: bool) -> list[str]:
    problems = []
    per_step = world_size * cfg.micro_batch_tokens
    if cfg.batch_tokens % per_step:
        valid = max(1, round(cfg.batch_tokens / per_step)) * per_step
        problems.append(
            f"batch_tokens ({cfg.batch_tokens}) is not divisible by world_size x micro_batch_tokens "
            f"({world_size} x {cfg.micro_batch_tokens} = {per_step}); use --batch-tokens {valid}, or a world size / "
            f"--micro-batch-tokens that divides it")
    if not cfg.pack_documents and cfg.micro_batch_tokens % cfg.seq_len:
        problems.append(f"micro_batch_tokens ({cfg.micro_batch_tokens}) must be a multiple of seq_len ({cfg.seq_len})")
    uses_cuda = check_device and (cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()))
    if cfg.bf16_storage and (cfg.device == "cpu" or (check_device and not uses_cuda)):
        problems.append("--bf16-storage stores embeddings, head and gates in bf16 for CUDA's bf16 autocast; the CPU "
                        "path is fp32: drop it or add --no-bf16-storage")
    from attention import needs_masks  # without masks: plain causal attention within each row, any rows per forward

    if uses_cuda and needs_masks(cfg) and not cfg.pack_documents and cfg.micro_batch_tokens != cfg.seq_len:
        problems.append(f"on CUDA each rank packs one row per forward (FlexAttention): set --seq-len "
                        f"{cfg.micro_batch_tokens} or --pack-documents")
    val_per_step = world_size * cfg.val_seq_len
    if cfg.val_tokens % val_per_step:
        valid = max(1, cfg.val_tokens // val_per_step) * val_per_step
        problems.append(f"val_tokens ({cfg.val_tokens}) is not a multiple of world_size x val_seq_len ({val_per_step}); "
                        f"use --val-tokens {valid}")
    if cfg.extension_steps >= cfg.num_iterations:
        problems.append(f"--extension-steps ({cfg.extension_steps}) must be below --num-iterations ({cfg.num_iterations})")
    if not 0 < cfg.mtp_frac <= 1:
        problems.append(f"--mtp-frac must be in (0, 1], got {cfg.mtp_frac}")
    if not 0 <= cfg.val_late_start <= 1:
        problems.append(f"--val-late-start must be in [0, 1] (a share of --num-iterations), got {cfg.val_late_start}")
    try:
        batches, windows = parse_int_list(cfg.batch_schedule), parse_int_list(cfg.window_schedule)
        peaks, mtp = parse_float_list(cfg.lr_stages), parse_float_list(cfg.mtp_weights)
    except ValueError:
        return problems + ["--batch-schedule, --window-schedule, --lr-stages and --mtp-weights are comma-separated "
                           "numbers, e.g. --window-schedule 3,7,11"]
    forwards = cfg.batch_tokens // cfg.micro_batch_tokens
    if batches and not cfg.pack_documents:
        problems.append("--batch-schedule changes the tokens per forward, which the row loader cannot: add "
                        "--pack-documents or drop the schedule")
    bad = [b for b in batches if b < 1 or b % forwards]
    if bad:
        problems.append(f"--batch-schedule entries {bad} are not positive multiples of the {forwards} forwards per "
                        f"step (batch_tokens / micro_batch_tokens)")
    if any(w < 1 for w in windows):
        problems.append("--window-schedule entries must be >= 1 block")
    if any(p < 0 for p in peaks) or any(m < 0 for m in mtp) or (mtp and mtp[0] <= 0):
        problems.append("--lr-stages entries must be >= 0 and --mtp-weights must start with a weight > 0")
    if cfg.yarn and not windows:
        problems.append("--yarn follows the stages of --window-schedule; give one (e.g. 3,7,11,13) or --no-yarn")
    return problems


def check_shards(pattern: str, name: str, vocab_size: int, min_tokens: int = 0) -> list[str]:
    """Every file matching the pattern exists with a valid header (read now, before any work), and the first
    holds token ids of the model's vocabulary."""
    from data.shards import ShardFormatError, read_header

    paths = sorted(glob.glob(pattern))
    if not paths:
        hint = "python data/prepare_demo_data.py" if "demo" in pattern else "python data/cached_fineweb10B.py 24"
        return [f"{name}: no file matches {pattern!r}; make the data first ({hint}) or pass {flag(name)}"]
    try:
        total = sum(read_header(p) for p in paths)
    except ShardFormatError as exc:
        return [f"{name}: {exc}"]
    if total < min_tokens:
        return [f"{name}: the files matching {pattern!r} hold {total} tokens, fewer than the {min_tokens} needed "
                f"(--val-tokens + 1); lower --val-tokens"]
    return data_vocab_problems(name, paths[0], vocab_size)


def validate_config(cfg: Hyperparameters, world_size: int, check_data: bool = True, check_device: bool = True) -> int:
    """Checks everything that can be checked before work starts; check_data=False skips the data files,
    check_device=False every question to CUDA (--dry-run). Raises ConfigError listing every problem with its fix.
    Returns gradient-accumulation steps per optimizer step."""
    import track3

    problems = _check_sizes(cfg)
    if not problems:  # the checks below divide by these sizes
        problems += _check_model(cfg) + _check_schedules(cfg, world_size, check_device)
    problems += _check_optimizers(cfg)
    if cfg.device not in ("auto", "cuda", "cpu"):
        problems.append(f"device must be auto, cuda or cpu, got {cfg.device!r}")
    if check_device and cfg.device == "cuda" and not torch.cuda.is_available():
        problems.append("device cuda was asked for but torch sees no CUDA device; use --device cpu (or a CPU preset)")
    if cfg.resume and not os.path.isdir(cfg.resume):
        problems.append(f"--resume {cfg.resume!r} is not a checkpoint directory")
    if check_data:
        problems += check_shards(cfg.train_files, "train_files", cfg.vocab_size)
        problems += check_shards(cfg.val_files, "val_files", cfg.vocab_size, min_tokens=cfg.val_tokens + 1)
    problems += track3.preset_problems(cfg)  # flags that would leave the optimizer benchmark
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
    return cfg.batch_tokens // (world_size * cfg.micro_batch_tokens)
