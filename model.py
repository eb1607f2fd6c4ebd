"""The GPT model: attention with document and sliding-window masks (FlexAttention on CUDA, SDPA on CPU), MLP,
blocks, value embeddings, U-net skips and the soft-capped head. Every feature is a switch of `Hyperparameters`.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from config import Hyperparameters, parse_int_list, parse_skips

# -----------------------------------------------------------------------------------------------
# Model


def rms_norm(x: torch.Tensor, gain: torch.Tensor | None = None) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),), weight=None if gain is None else gain.type_as(x))


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, w.type_as(x), None if b is None else b.type_as(x))


def normal_init(shape: tuple[int, ...], fan_in: int) -> torch.Tensor:
    """N(0, 0.33 / fan_in): the track-3 baseline's hidden weights (about torch's default Linear init)."""
    return torch.empty(shape).normal_(std=math.sqrt(0.33 / fan_in))


def optional_bias(size: int, enabled: bool) -> nn.Parameter | None:
    return nn.Parameter(torch.zeros(size)) if enabled else None


def optional_gain(size: int, enabled: bool) -> nn.Parameter | None:
    """A learned RMSNorm gain (init 1), or None for the plain norm."""
    return nn.Parameter(torch.ones(size)) if enabled else None


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
        # biases (track 3); linear_bias needs the unmerged weights (config.validate_config)
        self.q_b, self.k_b, self.v_b, self.o_b = (optional_bias(d, cfg.linear_bias) for _ in range(4))
        # v = l0 * v + l1 * value_embed, only in models with value embeddings
        self.value_mix = nn.Parameter(torch.tensor([0.5, 0.5])) if cfg.num_value_embeds > 0 else None
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
        q, k, v = (linear(x, w, b).view(B, T, self.num_heads, self.head_dim)
                   for w, b in ((wq, self.q_b), (wk, self.k_b), (wv, self.v_b)))
        if self.qk_norm:
            q, k = rms_norm(q), rms_norm(k)
        if self.v_norm:
            v = rms_norm(v)
        q, k = self.rotary(q), self.rotary(k)
        if value_embed is not None:
            v = self.value_mix[0] * v + self.value_mix[1] * value_embed.view_as(v)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        if attn_mask is None:  # no document mask, no window: plain causal attention within each row
            # one dtype for all three (v skips the norm, so under autocast it may differ from q and k)
            y = F.scaled_dot_product_attention(q, k.type_as(q), v.type_as(q), is_causal=True, scale=self.scale)
        elif isinstance(attn_mask, torch.Tensor):  # CPU path: dense boolean mask
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=self.scale)
        else:  # CUDA path: FlexAttention BlockMask, through a compiled kernel (eager would materialise T x T scores)
            if q.is_cuda:
                flex = compiled_flex_attention()
            else:  # CPU: forward only (tests compare it with the SDPA path)
                from torch.nn.attention.flex_attention import flex_attention as flex
            y = flex(q, k, v, block_mask=attn_mask, scale=self.scale)
        y = y.transpose(1, 2).reshape(B, T, -1)
        return linear(y, wo, self.o_b)


class MLP(nn.Module):
    def __init__(self, cfg: Hyperparameters):
        super().__init__()
        d, hidden = cfg.model_dim, cfg.mlp_ratio * cfg.model_dim
        if cfg.hidden_init == "normal":
            self.fc_w = nn.Parameter(normal_init((hidden, d), d))
            self.proj_w = nn.Parameter(normal_init((d, hidden), hidden))
        else:  # uniform with std 0.5 / sqrt(fan_in)
            self.fc_w = nn.Parameter(torch.empty(hidden, d).uniform_(-1, 1) * (math.sqrt(3) * 0.5 / math.sqrt(d)))
            self.proj_w = nn.Parameter(
                torch.empty(d, hidden).uniform_(-1, 1) * (math.sqrt(3) * 0.5 / math.sqrt(hidden)))
        if cfg.zero_init_proj:
            self.proj_w.data.zero_()
        self.fc_b, self.proj_b = optional_bias(hidden, cfg.linear_bias), optional_bias(d, cfg.linear_bias)
        self.relu_squared = cfg.relu_squared

    def forward(self, x):
        h = linear(x, self.fc_w, self.fc_b)
        h = F.relu(h).square() if self.relu_squared else F.gelu(h)
        return linear(h, self.proj_w, self.proj_b)


class Block(nn.Module):
    def __init__(self, cfg: Hyperparameters, has_attention: bool):
        super().__init__()
        self.attn = CausalSelfAttention(cfg) if has_attention else None
        self.mlp = MLP(cfg)
        self.residual_mix = nn.Parameter(torch.tensor([1.0, 0.0])) if cfg.x0_mix else None  # x = l0 x + l1 x0
        self.attn_gain = optional_gain(cfg.model_dim, cfg.norm_gains and has_attention)
        self.mlp_gain = optional_gain(cfg.model_dim, cfg.norm_gains)

    def forward(self, x, x0, value_embed, attn_mask):
        if self.residual_mix is not None:
            x = self.residual_mix[0] * x + self.residual_mix[1] * x0
        if self.attn is not None:
            x = x + self.attn(rms_norm(x, self.attn_gain), value_embed, attn_mask)
        return x + self.mlp(rms_norm(x, self.mlp_gain))


class GPT(nn.Module):
    def __init__(self, cfg: Hyperparameters):
        super().__init__()
        self.cfg = cfg
        mlp_only = set(parse_int_list(cfg.mlp_only_layers))
        self.embed = nn.Embedding(cfg.vocab_size, cfg.model_dim)
        self.value_embeds = nn.ModuleList(nn.Embedding(cfg.vocab_size, cfg.model_dim) for _ in range(cfg.num_value_embeds))
        self.blocks = nn.ModuleList(Block(cfg, i not in mlp_only) for i in range(cfg.num_layers))
        self.skips = parse_skips(cfg.skip_connections)
        self.skip_weights = nn.Parameter(torch.ones(len(self.skips))) if self.skips else None
        self.head = nn.Linear(cfg.model_dim, cfg.vocab_size, bias=cfg.linear_bias)
        if cfg.zero_init_proj:
            self.head.weight.data.zero_()
        if cfg.linear_bias:
            self.head.bias.data.zero_()
        self.embed_gain = optional_gain(cfg.model_dim, cfg.norm_gains)  # RMSNorm after the embedding
        self.final_gain = optional_gain(cfg.model_dim, cfg.norm_gains)  # RMSNorm before the head
        self.long_layers = set(parse_int_list(cfg.long_window_layers))

    @property
    def needs_masks(self) -> bool:
        """Attention needs a document or window mask (FlexAttention on CUDA, one row per micro-batch)."""
        return self.cfg.doc_mask or self.cfg.sliding_window

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
        Returns {"long": mask, "short": mask}: dense (B, 1, T, T) booleans, or FlexAttention BlockMasks; None for
        both without a document mask or window (plain causal attention within each row, any B)."""
        cfg = self.cfg
        if not self.needs_masks:
            return {"long": None, "short": None}
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
        x = x0 = rms_norm(self.embed(idx), self.embed_gain)
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
        logits = self.head(rms_norm(x, self.final_gain)).float()
        if self.cfg.logit_softcap > 0:
            c = self.cfg.logit_softcap
            logits = c * logits * torch.rsqrt(logits.square() + c * c)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
