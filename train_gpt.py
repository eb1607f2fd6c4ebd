"""GPT-2 Medium speedrun training with pluggable matrix optimizers.

    torchrun --standalone --nproc_per_node=8 train_gpt.py              # medium track, 8x H100
    python train_gpt.py --preset cpu-tiny                              # small, on a CPU

Model, training loop and the one config (Hyperparameters, with presets) live here. Optimizers are in
optimizers/, orthogonalisation kernels in kernels/, the data format and loaders in data/shards.py.
Nothing runs at import time: main() sets up the process group, so tests can import this file.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import glob
import inspect
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
import uuid
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

REPO_ROOT = os.path.dirname(os.path.realpath(__file__))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)


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

    # loop
    warmup_steps: int = 10  # untimed steps on random tokens to compile; model and optimizers restored after
    val_loss_every: int = 125  # 0: only at the end
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
    val_per_step = world_size * cfg.val_seq_len
    if cfg.val_tokens % val_per_step:
        valid = max(1, cfg.val_tokens // val_per_step) * val_per_step
        problems.append(f"val_tokens ({cfg.val_tokens}) is not a multiple of world_size x val_seq_len ({val_per_step}); "
                        f"use --val-tokens {valid}")
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
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
    return cfg.batch_tokens // per_step


# -----------------------------------------------------------------------------------------------
# Model


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


class Rotary(nn.Module):
    """Rotary embedding on pairs (x[..., :d/2], x[..., d/2:]). "half": head_dim/4 frequencies from 1 down to
    1/base, the other head_dim/4 pairs at zero frequency (left unrotated)."""

    def __init__(self, head_dim: int, mode: str, base: float):
        super().__init__()
        pairs = head_dim // 2
        if mode == "half":
            freqs = (1 / base) ** torch.linspace(0, 1, steps=head_dim // 4)
            freqs = torch.cat([freqs, freqs.new_zeros(pairs - head_dim // 4)])
        else:
            freqs = (1 / base) ** (torch.arange(pairs) / pairs)
        self.register_buffer("freqs", freqs.float(), persistent=False)
        self.enabled = mode != "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, H, D)
        if not self.enabled:
            return x
        T = x.size(1)
        theta = torch.outer(torch.arange(T, device=x.device, dtype=torch.float32), self.freqs)  # (T, D/2)
        cos, sin = theta.cos()[None, :, None, :], theta.sin()[None, :, None, :]
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1).type_as(x)


_FLEX_ATTENTION = None


def compiled_flex_attention():
    """torch.compile(flex_attention), built on first use (nothing compiles at import time)."""
    global _FLEX_ATTENTION
    if _FLEX_ATTENTION is None:
        from torch.nn.attention.flex_attention import flex_attention
        _FLEX_ATTENTION = torch.compile(flex_attention, dynamic=False)
    return _FLEX_ATTENTION


def attention_mask_mod(doc_ids: torch.Tensor, window_tokens: torch.Tensor | None):
    """The one definition of who attends to whom: causal, same document, within the sliding window.
    doc_ids: (T,) document index of every position; window_tokens: 0-D tensor (None: no window)."""

    def mask_mod(b, h, q_idx, kv_idx):
        keep = (q_idx >= kv_idx) & (doc_ids[q_idx] == doc_ids[kv_idx])
        if window_tokens is not None:
            keep = keep & (q_idx - kv_idx < window_tokens)
        return keep

    return mask_mod


def dense_attention_mask(doc_ids: torch.Tensor, window_tokens: torch.Tensor | None) -> torch.Tensor:
    """(T, T) boolean mask from attention_mask_mod, for the scaled_dot_product_attention path."""
    T = doc_ids.numel()
    q = torch.arange(T, device=doc_ids.device)[:, None]
    kv = torch.arange(T, device=doc_ids.device)[None, :]
    return attention_mask_mod(doc_ids, window_tokens)(None, None, q, kv)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: Hyperparameters):
        super().__init__()
        d, self.num_heads, self.head_dim = cfg.model_dim, cfg.num_heads, cfg.head_dim
        bound = math.sqrt(3) * 0.5 / math.sqrt(d)  # uniform init with std 0.5 / sqrt(fan_in)
        if cfg.merged_qkvo:
            self.qkvo_w = nn.Parameter(torch.empty(4, d, d).uniform_(-bound, bound))
            if cfg.zero_init_proj:
                self.qkvo_w.data[3].zero_()
        else:
            self.q_w, self.k_w, self.v_w, self.o_w = (
                nn.Parameter(torch.empty(d, d).uniform_(-bound, bound)) for _ in range(4))
            if cfg.zero_init_proj:
                self.o_w.data.zero_()
        self.value_mix = nn.Parameter(torch.tensor([0.5, 0.5]))  # v = l0 * v + l1 * value_embed
        self.rotary = Rotary(cfg.head_dim, cfg.rotary, cfg.rotary_base)
        self.qk_norm, self.v_norm = cfg.qk_norm, cfg.v_norm
        self.scale = cfg.attn_scale or 1 / math.sqrt(cfg.head_dim)

    def weights(self):
        if hasattr(self, "qkvo_w"):
            return self.qkvo_w.unbind(0)
        return self.q_w, self.k_w, self.v_w, self.o_w

    def forward(self, x, value_embed, attn_mask):  # x: (B, T, d)
        B, T, _ = x.shape
        wq, wk, wv, wo = self.weights()
        q, k, v = (F.linear(x, w.type_as(x)).view(B, T, self.num_heads, self.head_dim) for w in (wq, wk, wv))
        if self.qk_norm:
            q, k = rms_norm(q), rms_norm(k)
        if self.v_norm:
            v = rms_norm(v)
        q, k = self.rotary(q), self.rotary(k)
        if value_embed is not None:
            v = self.value_mix[0] * v + self.value_mix[1] * value_embed.view_as(v)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        if isinstance(attn_mask, torch.Tensor):  # CPU path: dense boolean mask
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=self.scale)
        else:  # CUDA path: FlexAttention BlockMask, through a compiled kernel (eager would materialise T x T scores)
            if q.is_cuda:
                flex = compiled_flex_attention()
            else:  # CPU: forward only (tests compare it with the SDPA path)
                from torch.nn.attention.flex_attention import flex_attention as flex
            y = flex(q, k, v, block_mask=attn_mask, scale=self.scale)
        y = y.transpose(1, 2).reshape(B, T, -1)
        return F.linear(y, wo.type_as(y))


class MLP(nn.Module):
    def __init__(self, cfg: Hyperparameters):
        super().__init__()
        d, hidden = cfg.model_dim, cfg.mlp_ratio * cfg.model_dim
        self.fc_w = nn.Parameter(torch.empty(hidden, d).uniform_(-1, 1) * (math.sqrt(3) * 0.5 / math.sqrt(d)))
        self.proj_w = nn.Parameter(torch.empty(d, hidden).uniform_(-1, 1) * (math.sqrt(3) * 0.5 / math.sqrt(hidden)))
        if cfg.zero_init_proj:
            self.proj_w.data.zero_()
        self.relu_squared = cfg.relu_squared

    def forward(self, x):
        h = F.linear(x, self.fc_w.type_as(x))
        h = F.relu(h).square() if self.relu_squared else F.gelu(h)
        return F.linear(h, self.proj_w.type_as(h))


class Block(nn.Module):
    def __init__(self, cfg: Hyperparameters, has_attention: bool):
        super().__init__()
        self.attn = CausalSelfAttention(cfg) if has_attention else None
        self.mlp = MLP(cfg)
        self.residual_mix = nn.Parameter(torch.tensor([1.0, 0.0])) if cfg.x0_mix else None  # x = l0 x + l1 x0

    def forward(self, x, x0, value_embed, attn_mask):
        if self.residual_mix is not None:
            x = self.residual_mix[0] * x + self.residual_mix[1] * x0
        if self.attn is not None:
            x = x + self.attn(rms_norm(x), value_embed, attn_mask)
        return x + self.mlp(rms_norm(x))


class GPT(nn.Module):
    def __init__(self, cfg: Hyperparameters):
        super().__init__()
        self.cfg = cfg
        mlp_only = set(parse_int_list(cfg.mlp_only_layers))
        self.embed = nn.Embedding(cfg.vocab_size, cfg.model_dim)
        self.value_embeds = nn.ModuleList(nn.Embedding(cfg.vocab_size, cfg.model_dim) for _ in range(cfg.num_value_embeds))
        self.blocks = nn.ModuleList(Block(cfg, i not in mlp_only) for i in range(cfg.num_layers))
        self.skips = parse_skips(cfg.skip_connections)
        self.skip_weights = nn.Parameter(torch.ones(len(self.skips)))
        self.head = nn.Linear(cfg.model_dim, cfg.vocab_size, bias=False)
        if cfg.zero_init_proj:
            self.head.weight.data.zero_()
        self.long_layers = set(parse_int_list(cfg.long_window_layers))

    def value_embed_for_layer(self, idx: torch.Tensor) -> list:
        """Table i feeds layer i and layer L - k + i (pattern 012 ... 012); other layers get None."""
        k, L = len(self.value_embeds), len(self.blocks)
        out = [None] * L
        for i, table in enumerate(self.value_embeds):
            ve = table(idx)
            out[i] = out[L - k + i] = ve
        return out

    def attention_masks(self, idx: torch.Tensor, window_tokens: int, use_flex: bool):
        """Masks for long-window and short-window layers. idx: (B, T); documents split at bos_id.
        Returns {"long": mask, "short": mask}: dense (B, 1, T, T) booleans, or FlexAttention BlockMasks."""
        cfg = self.cfg
        B, T = idx.shape
        if cfg.doc_mask:
            doc_ids = (idx == cfg.bos_id).cumsum(dim=1)  # (B, T)
        else:
            doc_ids = torch.zeros_like(idx)
        masks = {}
        for name, tokens in (("long", window_tokens), ("short", window_tokens // 2)):
            window = torch.tensor(max(tokens, 1), device=idx.device) if cfg.sliding_window else None
            if use_flex:
                from torch.nn.attention.flex_attention import create_block_mask
                assert B == 1, "the FlexAttention path packs each rank's tokens into one row"
                masks[name] = create_block_mask(attention_mask_mod(doc_ids[0], window), None, None, T, T,
                                                device=idx.device, BLOCK_SIZE=cfg.window_block,
                                                _compile=idx.is_cuda)
            else:
                masks[name] = torch.stack([dense_attention_mask(doc_ids[b], window) for b in range(B)])[:, None]
        return masks

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None, masks: dict) -> torch.Tensor:
        """idx, targets: (B, T) int64. Returns the mean cross-entropy (nats) or, without targets, logits."""
        x = x0 = rms_norm(self.embed(idx))
        value_embeds = self.value_embed_for_layer(idx)
        skip_in = {dst: (src, j) for j, (src, dst) in enumerate(self.skips)}
        outputs = {}
        for i, block in enumerate(self.blocks):
            if i in skip_in:
                src, j = skip_in[i]
                x = x + self.skip_weights[j] * outputs[src]
            mask = masks["long"] if i in self.long_layers else masks["short"]
            x = block(x, x0, value_embeds[i], mask)
            outputs[i] = x
        logits = self.head(rms_norm(x)).float()
        if self.cfg.logit_softcap > 0:
            c = self.cfg.logit_softcap
            logits = c * logits * torch.rsqrt(logits.square() + c * c)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))


def window_tokens_at(cfg: Hyperparameters, step: int) -> int:
    """Sliding window for the long layers at this step: max_window * (4x^3 - 6x^2 + 3x), rounded up to blocks."""
    x = step / cfg.num_iterations
    tokens = cfg.max_window_tokens * (4 * x**3 - 6 * x**2 + 3 * x)
    blocks = max(1, math.ceil(tokens / cfg.window_block))
    return blocks * cfg.window_block


def lr_multiplier(cfg: Hyperparameters, step: int) -> float:
    """1.0, then linear decay to final_lr_frac over the last cooldown_frac of the run."""
    x = step / cfg.num_iterations
    if x < 1 - cfg.cooldown_frac:
        return 1.0
    w = (1 - x) / cfg.cooldown_frac
    return w * 1.0 + (1 - w) * cfg.final_lr_frac


def momentum_at(cfg: Hyperparameters, step: int) -> float:
    frac = min(step / cfg.momentum_warmup_steps, 1) if cfg.momentum_warmup_steps > 0 else 1.0
    return (1 - frac) * cfg.momentum_warmup_start + frac * cfg.momentum


def build_optimizers(model: GPT, cfg: Hyperparameters, diagnostics_path: str | None = None
                     ) -> list[torch.optim.Optimizer]:
    """Hidden matrices -> the chosen matrix optimizer; embeddings, head and scalars -> DistAdam.
    Every parameter lands in exactly one group (asserted). Optimizers that take `param_names` get the hidden
    matrices' names; those that write diagnostics get `diagnostics_path` unless --optimizer-args sets one."""
    from optimizers import DistAdam, get_optimizer_class

    attn_mats, mlp_mats, scalars = [], [], []
    attn_names, mlp_names = [], []
    for i, block in enumerate(model.blocks):
        for name, p in block.named_parameters():
            if p.ndim < 2:
                scalars.append(p)
            elif name.startswith("mlp."):
                mlp_mats.append(p)
                mlp_names.append(f"blocks.{i}.{name}")
            else:
                attn_mats.append(p)
                attn_names.append(f"blocks.{i}.{name}")
    embeds = [model.embed.weight] + [t.weight for t in model.value_embeds]
    scalars.append(model.skip_weights)
    head = [model.head.weight]
    grouped = attn_mats + mlp_mats + scalars + embeds + head
    assert len({id(p) for p in grouped}) == len(grouped) == len(list(model.parameters())), \
        "every parameter must land in exactly one optimizer group"

    betas = (cfg.adam_beta1, cfg.adam_beta2)
    adam = DistAdam([dict(params=embeds, lr=cfg.embed_lr), dict(params=head, lr=cfg.head_lr),
                     dict(params=scalars, lr=cfg.scalar_lr)], lr=cfg.scalar_lr, betas=betas, eps=cfg.adam_eps)
    matrix_cls = get_optimizer_class(cfg.optimizer)
    kwargs = parse_optimizer_args(cfg.optimizer_args)
    accepted = inspect.signature(matrix_cls.__init__).parameters
    if "param_names" in accepted:
        kwargs.setdefault("param_names", attn_names + mlp_names)
    if "diagnostics_path" in accepted and kwargs.get("diagnostics_every", 0) and diagnostics_path:
        kwargs.setdefault("diagnostics_path", diagnostics_path)
    try:
        matrix = matrix_cls([dict(params=attn_mats, weight_decay_mul=1.0),
                             dict(params=mlp_mats, weight_decay_mul=cfg.mlp_weight_decay_mul)],
                            lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"--optimizer-args {cfg.optimizer_args!r} do not fit {matrix_cls.__name__}: {exc}") from exc
    for opt in (adam, matrix):
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return [adam, matrix]


# -----------------------------------------------------------------------------------------------
# Logging and checkpoints


SEPARATOR = "=" * 100


class RunLog:
    """Console progress on rank 0 plus the record-format log file logs/<run_id>.txt."""

    def __init__(self, path: str | None, master: bool):
        self.path, self.master = path, master

    def write(self, line: str, console: bool = True):
        if not self.master:
            return
        if console:
            print(line, flush=True)
        if self.path:
            with open(self.path, "a") as f:
                f.write(line + "\n")


def project_sources() -> list[str]:
    """Relative paths of the project's own source files that this process imported (plus this file)."""
    paths = {os.path.realpath(__file__)}
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if not (path and os.path.isabs(path) and path.endswith(".py") and os.path.isfile(path)):
            continue  # builtins and frozen or oddly-registered modules
        path = os.path.realpath(path)
        if path.startswith(REPO_ROOT + os.sep) and f"{os.sep}tests{os.sep}" not in path:
            paths.add(path)
    return sorted(os.path.relpath(p, REPO_ROOT) for p in paths)


def environment_lines(device: torch.device) -> list[str]:
    lines = [f"Running Python {sys.version.split()[0]}", f"Running PyTorch {torch.__version__}"]
    try:
        import triton
        lines.append(f"Running Triton {triton.__version__}")
    except ImportError:
        lines.append("Running Triton (not installed)")
    if device.type == "cuda":
        try:
            lines.append(subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout.rstrip())
        except (OSError, subprocess.SubprocessError):
            lines.append(f"GPU: {torch.cuda.get_device_name(device)}")
    else:
        lines.append(f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                     f"torch threads {torch.get_num_threads()}")
    return lines


def write_log_header(log: RunLog, cfg: Hyperparameters, device: torch.device, world_size: int):
    if not (log.master and log.path):
        return
    with open(log.path, "a") as f:
        for rel in project_sources():
            with open(os.path.join(REPO_ROOT, rel)) as src:
                f.write(f"# file: {rel}\n{src.read()}\n")
        f.write(SEPARATOR + "\n")
        f.write("\n".join(environment_lines(device)) + "\n")
        f.write(f"world_size: {world_size}\n")
        f.write("config: " + json.dumps(dataclasses.asdict(cfg)) + "\n")
        f.write(SEPARATOR + "\n")


def save_checkpoint(path: str, model, optimizers, loader, step: int, train_time_ms: float, cfg, rank: int,
                    world_size: int):
    """Writes <path>/ atomically: every rank writes into <path>.tmp, then rank 0 renames it.
    model.pt (rank 0), rank<r>.pt: optimizer shards, loader position and RNG state of that rank."""
    tmp = path + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    if world_size > 1:
        dist.barrier()
    if rank == 0:
        torch.save(model.state_dict(), os.path.join(tmp, "model.pt"))
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(dict(step=step, train_time_ms=train_time_ms, world_size=world_size,
                           config=dataclasses.asdict(cfg)), f, indent=1)
    torch.save(dict(optimizers=[o.state_dict() for o in optimizers], loader=loader.state_dict(),
                    rng_cpu=torch.get_rng_state(),
                    rng_cuda=torch.cuda.get_rng_state() if torch.cuda.is_available() else None),
               os.path.join(tmp, f"rank{rank}.pt"))
    if world_size > 1:
        dist.barrier()
    if rank == 0:
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    if world_size > 1:
        dist.barrier()


def load_checkpoint_meta(path: str) -> dict:
    meta_path = os.path.join(path, "meta.json")
    if not os.path.exists(meta_path):
        raise ConfigError(f"{path} is not a complete checkpoint (no meta.json); pick another step directory")
    with open(meta_path) as f:
        return json.load(f)


# -----------------------------------------------------------------------------------------------
# Training


def setup_distributed(cfg: Hyperparameters) -> tuple[int, int, torch.device]:
    """Process group from torchrun's environment (NCCL on CUDA, gloo on CPU); world size 1 without it."""
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    return rank, world_size, device


def mean_over_ranks(value: torch.Tensor, world_size: int) -> torch.Tensor:
    if world_size > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= world_size
    return value


def evaluate(model, cfg: Hyperparameters, step: int, rank: int, world_size: int, device, use_flex: bool) -> float:
    from data.shards import iter_val_batches

    model.eval()
    total, count = torch.zeros((), device=device), 0
    window = window_tokens_at(cfg, step)
    with torch.no_grad(), autocast(device):
        for inputs, targets in iter_val_batches(cfg.val_files, 1, cfg.val_seq_len, cfg.val_tokens, rank=rank,
                                                world_size=world_size, device=device):
            masks = model_masks(model, inputs, window, use_flex)
            total += model(inputs, targets, masks).float()
            count += 1
    model.train()
    return mean_over_ranks(total / max(count, 1), world_size).item()


def autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def model_masks(model, inputs, window, use_flex):
    raw = model._orig_mod if hasattr(model, "_orig_mod") else model
    return raw.attention_masks(inputs, window, use_flex)


def optimizer_summary(opt) -> list[str]:
    """Log lines summarising a matrix optimizer's own measurements (ORD diagnostics, echo curves), if any."""
    lines = []
    diagnostics = getattr(opt, "diagnostics", None)
    if diagnostics:
        last = diagnostics[-1]
        mats = last["matrices"]
        for key in ("rho", "spectral_frac", "term_ratio", "cos_polar_w"):
            values = [m[key] for m in mats if m.get(key) is not None]
            if values:
                lines.append(f"diagnostics step {last['step']}: {key} mean {sum(values) / len(values):.4g} "
                             f"min {min(values):.4g} max {max(values):.4g} over {len(values)} matrices")
    report = getattr(opt, "echo_report", None)
    if report is not None:
        for entry in report():
            lines.append("echo curve: " + json.dumps(entry, default=float))
    return lines


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def train(cfg: Hyperparameters, status: dict | None = None) -> dict:
    """Runs the whole job. Returns {"val_losses": {step: loss}, "train_losses": {step: loss}, "log_path": ...}.
    status (optional) receives "log_path" as soon as it is known, so a caller can report a failure into the log."""
    status = {} if status is None else status
    from data.shards import DistributedTokenLoader

    rank, world_size, device = setup_distributed(cfg)
    master = rank == 0
    resume_meta = None
    if cfg.resume:
        resume_meta = load_checkpoint_meta(cfg.resume)
        saved = Hyperparameters(**resume_meta["config"])
        # a resumed run keeps its identity and recipe; only loop-control fields may change
        keep = {"resume", "num_iterations", "checkpoint_every", "checkpoint_dir", "print_every",
                "debug_crash_at_step", "log_dir"}
        cfg = dataclasses.replace(saved, **{k: getattr(cfg, k) for k in keep})
        if resume_meta["world_size"] != world_size:
            raise ConfigError(f"checkpoint {cfg.resume} was written with world size {resume_meta['world_size']}, "
                              f"this launch has {world_size}; relaunch with --nproc_per_node={resume_meta['world_size']}")
    accum_steps = validate_config(cfg, world_size)
    if not cfg.run_id:
        cfg.run_id = str(uuid.uuid4())
    if world_size > 1:  # every rank uses rank 0's run id
        holder = [cfg.run_id]
        dist.broadcast_object_list(holder, src=0)
        cfg.run_id = holder[0]

    log_path = None
    if master:
        os.makedirs(cfg.log_dir, exist_ok=True)
        log_path = os.path.join(cfg.log_dir, f"{cfg.run_id}.txt")
        status["log_path"] = log_path
    log = RunLog(log_path, master)
    if resume_meta is None:
        write_log_header(log, cfg, device, world_size)
    else:
        log.write(f"resumed from {cfg.resume} at step {resume_meta['step']}")
    log.write(f"run {cfg.run_id}: preset {cfg.preset}, optimizer {cfg.optimizer}, world size {world_size}, "
              f"{accum_steps} accumulation step(s), {cfg.batch_tokens} tokens/step, device {device}; log {log_path}")

    torch.manual_seed(cfg.seed)
    model = GPT(cfg).to(device)
    num_params = sum(p.numel() for p in model.parameters())
    log.write(f"model: {num_params / 1e6:.2f}M parameters, {cfg.num_layers} layers, d={cfg.model_dim}")
    diagnostics_path = os.path.join(cfg.log_dir, f"{cfg.run_id}.{cfg.optimizer}.jsonl")
    optimizers = build_optimizers(model, cfg, diagnostics_path)
    if getattr(optimizers[1], "diagnostics_path", None):
        log.write(f"optimizer diagnostics: {optimizers[1].diagnostics_path}")
    # optimizers that estimate gradient noise (spectral_echo) take each micro-batch's gradient as a replicate
    record_replicate = getattr(optimizers[1], "add_replicate_gradients", None)
    use_flex = device.type == "cuda"
    rows = cfg.micro_batch_tokens // cfg.seq_len
    if use_flex and rows != 1:
        raise ConfigError(f"on CUDA each rank packs one row per micro-batch: set --seq-len {cfg.micro_batch_tokens}")
    loader = DistributedTokenLoader(cfg.train_files, rows, cfg.seq_len, rank=rank, world_size=world_size,
                                    align_to_bos=cfg.align_to_bos, bos_id=cfg.bos_id, device=device)
    step_model = torch.compile(model, dynamic=False) if cfg.compile else model

    def train_step(step: int, inputs_fn) -> torch.Tensor:
        """One optimizer step at `step` (0-based count of steps done). Returns the rank-mean train loss."""
        window = window_tokens_at(cfg, step)
        loss_sum = torch.zeros((), device=device)
        for _ in range(accum_steps):
            inputs, targets = inputs_fn()
            with autocast(device):
                loss = step_model(inputs, targets, model_masks(step_model, inputs, window, use_flex))
            (loss / accum_steps).backward()
            if record_replicate is not None:
                record_replicate()
            loss_sum += loss.detach().float()
        mult, mom = lr_multiplier(cfg, step), momentum_at(cfg, step)
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * mult
        for group in optimizers[1].param_groups:
            group["momentum"] = mom
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        return mean_over_ranks(loss_sum / accum_steps, world_size)

    if cfg.warmup_steps > 0 and resume_meta is None:
        # untimed: compile and autotune on random tokens, then put everything back as it was
        saved_model = copy.deepcopy(model.state_dict())
        saved_opts = [copy.deepcopy(o.state_dict()) for o in optimizers]
        gen = torch.Generator().manual_seed(cfg.seed + 1)

        def random_batch():
            x = torch.randint(0, cfg.vocab_size, (rows, cfg.seq_len + 1), generator=gen).to(device)
            return x[:, :-1], x[:, 1:]

        t0 = time.perf_counter()
        for i in range(cfg.warmup_steps):
            train_step(i % max(cfg.num_iterations, 1), random_batch)
        model.load_state_dict(saved_model)
        for opt, state in zip(optimizers, saved_opts):
            opt.load_state_dict(state)
        log.write(f"warm-up: {cfg.warmup_steps} untimed steps in {time.perf_counter() - t0:.1f}s (state restored)")

    start_step, train_time_ms = 0, 0.0
    if resume_meta is not None:
        model.load_state_dict(torch.load(os.path.join(cfg.resume, "model.pt"), map_location=device))
        shard = torch.load(os.path.join(cfg.resume, f"rank{rank}.pt"), map_location="cpu", weights_only=False)
        for opt, state in zip(optimizers, shard["optimizers"]):
            opt.load_state_dict(state)
        loader.load_state_dict(shard["loader"])
        torch.set_rng_state(shard["rng_cpu"])
        if shard["rng_cuda"] is not None and device.type == "cuda":
            torch.cuda.set_rng_state(shard["rng_cuda"])
        start_step, train_time_ms = resume_meta["step"], resume_meta["train_time_ms"]

    def checkpoint(step: int, tag: str | None = None):
        path = os.path.join(cfg.checkpoint_dir, cfg.run_id, tag or f"step_{step:06d}")
        save_checkpoint(path, model, optimizers, loader, step, train_time_ms, cfg, rank, world_size)
        log.write(f"checkpoint saved to {path}")
        return path

    val_losses, train_losses = {}, {}
    total = cfg.num_iterations
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for step in range(start_step, total + 1):
        last = step == total
        validate_now = last or (cfg.val_loss_every > 0 and step % cfg.val_loss_every == 0)
        if validate_now and not (resume_meta is not None and step == start_step):
            if device.type == "cuda":
                torch.cuda.synchronize()
            train_time_ms += 1000 * (time.perf_counter() - t0)  # the clock stops during validation
            val_loss = evaluate(step_model, cfg, step, rank, world_size, device, use_flex)
            val_losses[step] = val_loss
            avg = f"{train_time_ms / step:.2f}" if step > 0 else "nan"
            log.write(f"step:{step}/{total} val_loss:{val_loss:.4f} train_time:{train_time_ms:.0f}ms step_avg:{avg}ms")
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        if last:
            break
        if cfg.checkpoint_every > 0 and step > start_step and step % cfg.checkpoint_every == 0:
            train_time_ms += 1000 * (time.perf_counter() - t0)
            checkpoint(step)
            t0 = time.perf_counter()
        if step == cfg.debug_crash_at_step:
            raise RuntimeError(f"debug crash at step {step} (--debug-crash-at-step)")

        train_loss = train_step(step, loader.next_batch).item()
        if not math.isfinite(train_loss):
            msg = f"non-finite train loss ({train_loss}) at step {step + 1}; stopping"
            if cfg.checkpoint_every > 0:
                msg += f"; state kept in {checkpoint(step + 1, tag=f'step_{step + 1:06d}_nonfinite')}"
            log.write(f"error: {msg}")
            raise FloatingPointError(msg + " (lower --lr or check the data)")
        train_losses[step + 1] = train_loss
        now_ms = train_time_ms + 1000 * (time.perf_counter() - t0)
        step_avg = now_ms / (step + 1)
        line = f"step:{step + 1}/{total} train_loss:{train_loss:.4f} train_time:{now_ms:.0f}ms step_avg:{step_avg:.2f}ms"
        log.write(line, console=False)
        if master and ((step + 1) % cfg.print_every == 0 or step + 1 == total or step == start_step):
            eta = format_duration(step_avg * (total - step - 1) / 1000)
            print(f"{line} eta:{eta}", flush=True)

    if device.type == "cuda":
        log.write(f"peak memory allocated: {torch.cuda.max_memory_allocated() // 2**20} MiB "
                  f"reserved: {torch.cuda.max_memory_reserved() // 2**20} MiB")
    for line in optimizer_summary(optimizers[1]):
        log.write(line)
    if cfg.report_unigram and master:
        from data.shards import unigram_cross_entropy
        unigram = unigram_cross_entropy(cfg.train_files, cfg.val_files, vocab_size=50257)
        log.write(f"final val_loss {val_losses[total]:.4f} vs unigram model of the same data {unigram:.4f} "
                  f"({unigram - val_losses[total]:.2f} nats lower)")
    return dict(val_losses=val_losses, train_losses=train_losses, log_path=log_path, run_id=cfg.run_id)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(argv)
    status: dict = {}
    try:
        train(cfg, status)
        return 0
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    except BaseException:
        if status.get("log_path") and os.path.exists(status["log_path"]):  # rank 0 only has a log path
            with open(status["log_path"], "a") as f:
                f.write(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
