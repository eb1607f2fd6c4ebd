"""Attention for model.py: rotary embedding (half-truncated, rescaled by YaRN), the one mask definition
(causal, same document, sliding window) used by both kernels, and the attention layer with its switches.

Kernels: on CUDA, FlexAttention with a block mask built from `attention_mask_mod`; on CPU,
scaled_dot_product_attention with a dense boolean mask built from the same function (a test checks the two agree).
Without a document mask and a window (track 3), plain causal scaled_dot_product_attention within each row, any
number of rows per forward, on both devices.
Record 18 runs FlashAttention-3's varlen kernel instead, which its script downloads at start-up from an online
kernel hub; no machine of this project can reach that hub, so it cannot be installed or tested here. Both compute
causal attention within documents with a window of W tokens behind each query (FlashAttention's window_size=(W, 0));
they differ in speed, not in what each query sees.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from config import Hyperparameters

# YaRN interpolation ramp in full turns of a frequency over the old window: below YARN_ALPHA turns a frequency is
# scaled by old/new (interpolated), above YARN_BETA kept, linear in between (record 18: 1 and 32).
YARN_ALPHA, YARN_BETA = 1.0, 32.0


def rms_norm(x: torch.Tensor, gain: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm over the last dim, times a learned gain (--norm-gains) when given."""
    return F.rms_norm(x, (x.size(-1),), weight=None if gain is None else gain.type_as(x))


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """x @ w.T (+ b): weights in x's dtype (bf16 under autocast)."""
    return F.linear(x, w.type_as(x), None if b is None else b.type_as(x))


def normal_init(shape: tuple[int, ...], fan_in: int) -> torch.Tensor:
    """N(0, 0.33 / fan_in): --hidden-init normal, the track-3 baseline's hidden weights (about torch's Linear init)."""
    return torch.empty(shape).normal_(std=math.sqrt(0.33 / fan_in))


def optional_bias(size: int, enabled: bool) -> nn.Parameter | None:
    """A zero-init bias (--linear-bias), or None."""
    return nn.Parameter(torch.zeros(size)) if enabled else None


def optional_gain(size: int, enabled: bool) -> nn.Parameter | None:
    """A learned RMSNorm gain, init 1 (--norm-gains), or None for the plain norm."""
    return nn.Parameter(torch.ones(size)) if enabled else None


# -----------------------------------------------------------------------------------------------
# Rotary embedding


def rotary_base_freqs(head_dim: int, mode: str, base: float) -> torch.Tensor:
    """Angular frequencies (head_dim/2,) in radians per position for the pairs (x[..., :d/2], x[..., d/2:]).
    "half": head_dim/4 frequencies from 1 down to 1/base, the other head_dim/4 pairs at zero frequency
    (stationary); "full": head_dim/2 geometric frequencies; "none": all zero (and skipped)."""
    pairs = head_dim // 2
    if mode == "half":
        freqs = (1 / base) ** torch.linspace(0, 1, steps=head_dim // 4)
        return torch.cat([freqs, freqs.new_zeros(pairs - head_dim // 4)]).float()
    if mode == "full":
        return ((1 / base) ** (torch.arange(pairs) / pairs)).float()
    return torch.zeros(pairs)


def yarn_freqs(base_freqs: torch.Tensor, changes) -> torch.Tensor:
    """Frequencies after YaRN for each (old, new) window change (tokens), in order: a frequency turning r times over
    the old window is scaled by s + w (1 - s), s = old / new, w = clamp((r - alpha) / (beta - alpha), 0, 1)."""
    freqs = base_freqs.clone()
    for old, new in changes:
        turns = old * freqs / (2 * torch.pi)
        scaling = old / new
        weight = torch.clamp((turns - YARN_ALPHA) / (YARN_BETA - YARN_ALPHA), 0, 1)
        freqs *= scaling + weight * (1 - scaling)
    return freqs


def rotary_cos_sin(freqs: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (T, D/2) of position x frequency."""
    theta = torch.outer(torch.arange(seq_len, device=freqs.device, dtype=freqs.dtype), freqs)
    return theta.cos(), theta.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, T, H, D); pair i is (x[..., i], x[..., D/2 + i]), rotated by position x freqs[i]."""
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    x1, x2 = x.to(torch.promote_types(x.dtype, torch.float32)).chunk(2, dim=-1)  # bf16 -> fp32, fp64 stays
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1).type_as(x)


def shift_stationary_dims(k: torch.Tensor) -> torch.Tensor:
    """Partial key offset: the zero-frequency pairs of "half" rotary (dims [D/4, D/2) and [3D/4, D)) of the key at
    position t are taken from position t - 1 (position 0 keeps its own), so one layer can match "the token after
    X" (an induction head). k: (B, T, H, D)."""
    D = k.size(-1)
    previous = torch.cat([k[:, :1], k[:, :-1]], dim=1)
    dims = torch.arange(D, device=k.device) % (D // 2) >= D // 4  # the stationary half of each half
    return torch.where(dims, previous, k)


# -----------------------------------------------------------------------------------------------
# Masks


_FLEX_ATTENTION = None


def compiled_flex_attention():
    """torch.compile(flex_attention), built on first use (nothing compiles at import time)."""
    global _FLEX_ATTENTION
    if _FLEX_ATTENTION is None:
        from torch.nn.attention.flex_attention import flex_attention
        _FLEX_ATTENTION = torch.compile(flex_attention, dynamic=False)
    return _FLEX_ATTENTION


def attention_mask_mod(doc_ids: torch.Tensor, window_tokens: torch.Tensor | None):
    """The one definition of who attends to whom: causal, same document, and (with a window W) at most W positions
    back. doc_ids: (T,) document index of every position; window_tokens: 0-D tensor (None: no window)."""

    def mask_mod(b, h, q_idx, kv_idx):
        keep = (q_idx >= kv_idx) & (doc_ids[q_idx] == doc_ids[kv_idx])
        if window_tokens is not None:
            keep = keep & (q_idx - kv_idx <= window_tokens)
        return keep

    return mask_mod


def dense_attention_mask(doc_ids: torch.Tensor, window_tokens: torch.Tensor | None) -> torch.Tensor:
    """(T, T) boolean mask from attention_mask_mod, for the scaled_dot_product_attention path."""
    T = doc_ids.numel()
    q = torch.arange(T, device=doc_ids.device)[:, None]
    kv = torch.arange(T, device=doc_ids.device)[None, :]
    return attention_mask_mod(doc_ids, window_tokens)(None, None, q, kv)


def needs_masks(cfg: Hyperparameters) -> bool:
    """Attention needs a document or window mask; without both it is plain causal attention within each row."""
    return cfg.doc_mask or cfg.sliding_window


def build_masks(cfg: Hyperparameters, idx: torch.Tensor, windows: dict[str, int], use_flex: bool) -> dict:
    """{name: mask} for each window (tokens). idx: (B, T); documents start at bos_id. Dense (B, 1, T, T)
    booleans, or FlexAttention BlockMasks (one packed row per rank); None without a document mask or window
    (plain causal attention, any number of rows)."""
    if not needs_masks(cfg):
        return dict.fromkeys(windows)
    B, T = idx.shape
    doc_ids = (idx == cfg.bos_id).cumsum(dim=1) if cfg.doc_mask else torch.zeros_like(idx)  # (B, T)
    masks = {}
    for name, tokens in windows.items():
        window = torch.tensor(tokens, device=idx.device) if cfg.sliding_window else None
        if use_flex:
            from torch.nn.attention.flex_attention import create_block_mask
            assert B == 1, "the FlexAttention path packs each rank's tokens into one row"
            masks[name] = create_block_mask(attention_mask_mod(doc_ids[0], window), None, None, T, T,
                                            device=idx.device, BLOCK_SIZE=128, _compile=idx.is_cuda)
        else:
            masks[name] = torch.stack([dense_attention_mask(doc_ids[b], window) for b in range(B)])[:, None]
    return masks


# -----------------------------------------------------------------------------------------------
# The attention layer


def head_gate(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per-head gate logits from the first gate_dims channels: x (B, T, d), weight (H, g) -> (B, T, H, 1)."""
    return F.linear(x[..., :weight.size(-1)], weight.type_as(x)).unsqueeze(-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: Hyperparameters, has_value_embed: bool, key_offset: bool):
        super().__init__()
        d, H, self.num_heads, self.head_dim = cfg.model_dim, cfg.num_heads, cfg.num_heads, cfg.head_dim
        bound = math.sqrt(3) * cfg.qkv_init_gain / math.sqrt(d)  # uniform with std qkv_init_gain / sqrt(fan_in)

        def init(*shape):
            return normal_init(shape, d) if cfg.hidden_init == "normal" else torch.empty(shape).uniform_(-bound, bound)

        if cfg.merged_qkvo:
            self.qkvo_w = nn.Parameter(init(4, d, d))
            if cfg.zero_init_proj:
                self.qkvo_w.data[3].zero_()
        else:
            self.q_w, self.k_w, self.v_w, self.o_w = (nn.Parameter(init(d, d)) for _ in range(4))
            if cfg.zero_init_proj:
                self.o_w.data.zero_()
        # biases (track 3); --linear-bias needs the unmerged weights (config._check_model)
        self.q_b, self.k_b, self.v_b, self.o_b = (optional_bias(d, cfg.linear_bias) for _ in range(4))
        self.qkvo_scales = nn.Parameter(torch.tensor([0.5, 1.0])) if cfg.qkvo_scales else None  # on QKV, on O
        self.value_gate = self.value_mix = self.output_gate = None
        if has_value_embed and cfg.value_embed_gates:
            self.value_gate = nn.Parameter(torch.zeros(H, cfg.gate_dims))  # 2 sigmoid(0) = 1 at init
        elif has_value_embed:
            self.value_mix = nn.Parameter(torch.tensor([0.5, 0.5]))  # v = l0 * v + l1 * value_embed
        if cfg.attn_output_gate:
            self.output_gate = nn.Parameter(torch.zeros(H, cfg.gate_dims))  # sigmoid(0) = 1/2 at init
        self.qk_norm, self.v_norm, self.rotary = cfg.qk_norm, cfg.v_norm, cfg.rotary != "none"
        self.key_offset = key_offset

    def weights(self):
        wq, wk, wv, wo = self.qkvo_w.unbind(0) if hasattr(self, "qkvo_w") else (self.q_w, self.k_w, self.v_w, self.o_w)
        if self.qkvo_scales is not None:
            qkv_scale, o_scale = self.qkvo_scales.unbind(0)
            wq, wk, wv, wo = qkv_scale * wq, qkv_scale * wk, qkv_scale * wv, o_scale * wo
        return wq, wk, wv, wo

    def forward(self, x, value_embed, attn_mask, cos, sin, scale):
        """x: (B, T, d), normed. scale: the softmax scale, a float or a 0-D tensor (a scheduled scale: folded into
        q so that a compiled graph does not specialise on its value)."""
        B, T, _ = x.shape
        wq, wk, wv, wo = self.weights()
        q, k, v = (linear(x, w, b).view(B, T, self.num_heads, self.head_dim)
                   for w, b in ((wq, self.q_b), (wk, self.k_b), (wv, self.v_b)))
        if self.qk_norm:
            q, k = rms_norm(q), rms_norm(k)
        if self.v_norm:
            v = rms_norm(v)
        if self.rotary:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if self.key_offset:
            k = shift_stationary_dims(k)
        if self.value_gate is not None:
            v = v + 2 * torch.sigmoid(head_gate(x, self.value_gate)) * value_embed.view_as(v)
        elif self.value_mix is not None:
            v = self.value_mix[0] * v + self.value_mix[1] * value_embed.view_as(v)
        if isinstance(scale, torch.Tensor):
            q, scale = q * scale, 1.0
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        if attn_mask is None:  # no document mask, no window: plain causal attention within each row (any B)
            # one dtype for all three (v skips the norm, so under autocast it may differ from q and k)
            y = F.scaled_dot_product_attention(q, k.type_as(q), v.type_as(q), is_causal=True, scale=scale)
        elif isinstance(attn_mask, torch.Tensor):  # CPU path: dense boolean mask
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
        else:  # CUDA path: FlexAttention BlockMask, through a compiled kernel (eager would materialise T x T scores)
            if q.is_cuda:
                flex = compiled_flex_attention()
            else:  # CPU: forward only (tests compare it with the SDPA path)
                from torch.nn.attention.flex_attention import flex_attention as flex
            y = flex(q, k, v, block_mask=attn_mask, scale=scale)
        y = y.transpose(1, 2)  # (B, T, H, D)
        if self.output_gate is not None:
            y = y * torch.sigmoid(head_gate(x, self.output_gate))
        return linear(y.reshape(B, T, -1), wo, self.o_b)
