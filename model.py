"""The GPT model: blocks of attention (attention.py) and ReLU^2 MLP on a residual stream mixed with the input
embeddings, value embeddings, U-net skips, backout and the soft-capped head with its losses. Every feature is a
switch of `Hyperparameters`; `medium` (record 18) turns them all on.

Per-step state set by the loop from schedules.py (`GPT.apply_schedule`): the YaRN-rescaled rotary frequencies,
the attention scale, and whether the input embedding is still tied to the head.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from attention import (CausalSelfAttention, build_masks, head_gate, linear, normal_init, optional_bias,
                       optional_gain, rms_norm, rotary_base_freqs, rotary_cos_sin, yarn_freqs)
from config import Hyperparameters, parse_int_list, parse_skips

SKIP_LAMBDA_INIT = -1.5  # gated skips start at sigmoid(-1.5) * 2 sigmoid(0) ~ 0.18
BACKOUT_LAMBDA_INIT = 0.5
EVAL_CHUNK_TOKENS = 64 * 1024  # validation scores the head in chunks of this many tokens (memory)


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
    def __init__(self, cfg: Hyperparameters, has_attention: bool, has_value_embed: bool, long_window: bool):
        super().__init__()
        self.attn = (CausalSelfAttention(cfg, has_value_embed, key_offset=cfg.key_offset and long_window)
                     if has_attention else None)
        self.mlp = MLP(cfg)
        self.resid_lambda = self.x0_lambdas = None
        if cfg.x0_mix:  # x = r x + a x0 (+ b x02)
            self.resid_lambda = nn.Parameter(torch.tensor(cfg.resid_lambda_init))
            self.x0_lambdas = nn.Parameter(torch.zeros(2 if cfg.second_embed else 1))
        self.attn_gain = optional_gain(cfg.model_dim, cfg.norm_gains and has_attention)  # --norm-gains
        self.mlp_gain = optional_gain(cfg.model_dim, cfg.norm_gains)

    def forward(self, x, x0, x02, value_embed, attn_mask, cos, sin, scale):
        if self.resid_lambda is not None:
            x = self.resid_lambda * x + self.x0_lambdas[0] * x0
            if x02 is not None:
                x = x + self.x0_lambdas[1] * x02
        if self.attn is not None:
            x = x + self.attn(rms_norm(x, self.attn_gain), value_embed, attn_mask, cos, sin, scale)
        return x + self.mlp(rms_norm(x, self.mlp_gain))


class GPT(nn.Module):
    def __init__(self, cfg: Hyperparameters):
        super().__init__()
        self.cfg = cfg
        L, d, k = cfg.num_layers, cfg.model_dim, cfg.num_value_embeds
        mlp_only, long_layers = set(parse_int_list(cfg.mlp_only_layers)), set(parse_int_list(cfg.long_window_layers))
        self.long_layers = long_layers
        self.embed = nn.Embedding(cfg.vocab_size, d)
        self.value_embeds = nn.ModuleList(nn.Embedding(cfg.vocab_size, d) for _ in range(k))
        if cfg.zero_init_value_embeds:
            for table in self.value_embeds:
                nn.init.zeros_(table.weight)
        # table i feeds layer i and layer L - k + i (pattern 012 ... 012)
        self.value_embed_layers = {i: i for i in range(k)} | {L - k + i: i for i in range(k)}
        self.blocks = nn.ModuleList(Block(cfg, i not in mlp_only, i in self.value_embed_layers, i in long_layers)
                                    for i in range(L))
        self.skips = parse_skips(cfg.skip_connections)
        if cfg.gated_skips:  # skip j scaled by sigmoid(s_j) * 2 sigmoid(W_j x0[:gate_dims])
            self.skip_lambdas = nn.Parameter(torch.full((len(self.skips),), SKIP_LAMBDA_INIT))
            self.skip_gates = nn.Parameter(torch.zeros(len(self.skips), cfg.gate_dims))
        else:
            self.skip_weights = nn.Parameter(torch.ones(len(self.skips)))
        self.head = nn.Linear(d, cfg.vocab_size, bias=cfg.linear_bias)
        if cfg.head_init_std > 0:
            nn.init.normal_(self.head.weight, mean=0.0, std=cfg.head_init_std)
        elif cfg.zero_init_proj:
            self.head.weight.data.zero_()
        if cfg.linear_bias:
            self.head.bias.data.zero_()
        self.embed_gain = optional_gain(d, cfg.norm_gains)  # RMSNorm after the embedding (--norm-gains)
        self.final_gain = optional_gain(d, cfg.norm_gains)  # RMSNorm before the head
        self.embed2 = nn.Embedding(cfg.vocab_size, d) if cfg.second_embed else None
        if cfg.smear:  # x_t += smear_lambda * sigmoid(W x_t[:gate_dims]) * x_{t-1}
            self.smear_gate = nn.Parameter(torch.zeros(1, cfg.gate_dims))
            self.smear_lambda = nn.Parameter(torch.zeros(()))
        if cfg.backout_layer >= 0:
            self.backout_lambda = nn.Parameter(torch.tensor(BACKOUT_LAMBDA_INIT))
        # per-step state (apply_schedule): rotary frequencies after YaRN, attention scale, tie state
        self.register_buffer("base_freqs", rotary_base_freqs(cfg.head_dim, cfg.rotary, cfg.rotary_base),
                             persistent=False)
        self.register_buffer("rotary_freqs", self.base_freqs.clone(), persistent=False)
        self.yarn_changes: tuple = ()
        self.register_buffer("attn_scale", torch.tensor(cfg.attn_scale or 1 / math.sqrt(cfg.head_dim)), persistent=False)
        self.tied = False
        self.set_tied(cfg.tied_head_frac > 0)

    # ---- per-step state ---------------------------------------------------------------------------------
    def set_tied(self, tied: bool) -> None:
        """Tied: the input embedding is the head's weight (self.embed is left out of training)."""
        self.tied = tied
        self.embed.weight.requires_grad_(not tied)

    def apply_schedule(self, schedule) -> None:
        """Per-step state from a schedules.StepSchedule: YaRN frequencies, attention scale, tie state."""
        if schedule.yarn_changes != self.yarn_changes:
            self.rotary_freqs.copy_(yarn_freqs(self.base_freqs, schedule.yarn_changes))
            self.yarn_changes = schedule.yarn_changes
        self.attn_scale.fill_(schedule.attn_scale)
        if self.cfg.tied_head_frac > 0 and schedule.tied != self.tied:
            self.set_tied(schedule.tied)

    @torch.no_grad()
    def untie(self) -> None:
        """Split the input embedding from the head: it starts as a copy of the head's weight."""
        self.embed.weight.copy_(self.head.weight)
        self.set_tied(False)

    def parameter_roles(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Every parameter under exactly one role (asserted). Matrix optimizer: attn, mlp_in, mlp_out, gate (per-head
        gates); Adam: embed, value_embed, second_embed, head, vector_gate (one-output gates), x0_lambda, scalar."""
        roles: dict[str, list] = {}
        top = {"embed.weight": "embed", "embed2.weight": "second_embed", "head.weight": "head",
               "smear_gate": "vector_gate", "skip_gates": "vector_gate"}
        leaf = {"qkvo_w": "attn", "q_w": "attn", "k_w": "attn", "v_w": "attn", "o_w": "attn", "fc_w": "mlp_in",
                "proj_w": "mlp_out", "value_gate": "gate", "output_gate": "gate", "x0_lambdas": "x0_lambda"}
        for name, p in self.named_parameters():
            if name in top:
                role = top[name]
            elif name.startswith("value_embeds."):
                role = "value_embed"
            else:
                role = leaf.get(name.rsplit(".", 1)[-1], "scalar" if p.ndim < 2 else None)
            assert role is not None, f"parameter {name} has no optimizer role"
            roles.setdefault(role, []).append((name, p))
        return roles

    # ---- forward ----------------------------------------------------------------------------------------
    def attention_masks(self, idx: torch.Tensor, long_window: int, short_window: int, use_flex: bool) -> dict:
        """Masks for the long-window and short-window layers: {"long": mask, "short": mask}."""
        return build_masks(self.cfg, idx, {"long": long_window, "short": short_window}, use_flex)

    def input_embedding(self, idx: torch.Tensor) -> torch.Tensor:
        x = F.embedding(idx, self.head.weight) if self.tied else self.embed(idx)  # (B, T, d)
        if self.cfg.smear:  # each token's embedding gets a gated share of the previous token's
            gate = self.smear_lambda * torch.sigmoid(F.linear(x[:, 1:, :self.cfg.gate_dims], self.smear_gate.type_as(x)))
            x = torch.cat([x[:, :1], x[:, 1:] + gate * x[:, :-1]], dim=1)
        return x

    def skip_scale(self, j: int, x0: torch.Tensor) -> torch.Tensor:
        if self.cfg.gated_skips:
            gate = torch.sigmoid(head_gate(x0, self.skip_gates[j:j + 1]).squeeze(-1))  # (B, T, 1)
            return torch.sigmoid(self.skip_lambdas[j]) * 2 * gate
        return self.skip_weights[j]

    def hidden_states(self, idx: torch.Tensor, masks: dict) -> torch.Tensor:
        """idx (B, T) -> the normed final hidden states (B, T, d) that feed the head."""
        x = x0 = rms_norm(self.input_embedding(idx), self.embed_gain)
        x02 = rms_norm(self.embed2(idx)) if self.embed2 is not None else None
        value_embeds = [table(idx) for table in self.value_embeds]
        cos, sin = rotary_cos_sin(self.rotary_freqs, idx.size(1))
        skip_in = {dst: (src, j) for j, (src, dst) in enumerate(self.skips)}
        outputs = {}
        for i, block in enumerate(self.blocks):
            if i in skip_in:
                src, j = skip_in[i]
                x = x + self.skip_scale(j, x0) * outputs[src]
            ve = value_embeds[self.value_embed_layers[i]] if i in self.value_embed_layers else None
            mask = masks["long"] if i in self.long_layers else masks["short"]
            x = block(x, x0, x02, ve, mask, cos, sin, self.attn_scale)
            outputs[i] = x
        if self.cfg.backout_layer >= 0:  # remove what an early-middle layer wrote for context, not prediction
            x = x - self.backout_lambda * outputs[self.cfg.backout_layer]
        return rms_norm(x, self.final_gain)

    def softcap(self, logits: torch.Tensor) -> torch.Tensor:
        c = self.cfg.logit_softcap
        if c <= 0:
            return logits
        if self.cfg.logit_softcap_kind == "sigmoid":
            return c * torch.sigmoid((logits + self.cfg.logit_sigmoid_shift) / self.cfg.logit_sigmoid_temperature)
        return c * logits * torch.rsqrt(logits.square() + c * c)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None, masks: dict,
                mtp_weights: torch.Tensor | None = None) -> torch.Tensor:
        """idx, targets: (B, T) int64. Without targets: soft-capped fp32 logits (B, T, V). In training mode: the
        training loss (mean per target, or the sum with sum_train_loss; with mtp_weights (n,) the weighted loss of
        the next n tokens). In eval mode: the mean next-token cross-entropy (nats) on fp32 logits."""
        x = self.hidden_states(idx, masks)
        if targets is None:
            return self.softcap(self.head(x).float())
        if not self.training:
            return self.eval_loss(x, targets)
        logits = self.head(x)
        if not self.cfg.bf16_cross_entropy:
            return self.train_loss(self.softcap(logits.float()), targets, mtp_weights)
        with torch.autocast(logits.device.type, enabled=False):  # autocast would take cross-entropy to fp32
            return self.train_loss(self.softcap(logits), targets, mtp_weights)

    def train_loss(self, logits: torch.Tensor, targets: torch.Tensor, mtp_weights: torch.Tensor | None):
        """Loss of soft-capped logits (B, T, V) in their dtype; per-token losses are summed in fp32 at least."""
        if mtp_weights is not None and mtp_weights.numel() > 1:
            loss = multi_token_loss(logits, targets, mtp_weights)
        elif logits.dtype == torch.bfloat16:
            losses = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), reduction="none")
            loss = losses.float().sum()
        else:
            flat_logits, flat_targets = logits.view(-1, logits.size(-1)), targets.reshape(-1)
            return F.cross_entropy(flat_logits, flat_targets, reduction="sum" if self.cfg.sum_train_loss else "mean")
        return loss if self.cfg.sum_train_loss else loss / targets.numel()

    def eval_loss(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x, targets = x.flatten(0, 1), targets.reshape(-1)
        if x.size(0) <= EVAL_CHUNK_TOKENS:
            return F.cross_entropy(self.softcap(self.head(x).float()), targets)
        total = x.new_zeros((), dtype=torch.float32)
        for xs, ts in zip(x.split(EVAL_CHUNK_TOKENS), targets.split(EVAL_CHUNK_TOKENS)):
            total = total + F.cross_entropy(self.softcap(self.head(xs).float()), ts, reduction="sum")
        return total / targets.numel()


def multi_token_loss(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Sum over positions t and k < n of weights[k] * CE(logits[t], targets[t + k]) within each row (targets past
    the row's end are left out). logits (B, T, V), targets (B, T), weights (n,). Returns the sum (fp32)."""
    T, dtype = targets.size(1), torch.promote_types(logits.dtype, torch.float32)  # sums at least in fp32
    log_normalizer = torch.logsumexp(logits, dim=-1)  # (B, T)
    total = logits.new_zeros((), dtype=dtype)
    for k in range(weights.numel()):
        picked = logits[:, :T - k].gather(-1, targets[:, k:].unsqueeze(-1)).squeeze(-1)  # (B, T - k)
        total = total + weights[k] * (log_normalizer[:, :T - k] - picked).to(dtype).sum()
    return total
