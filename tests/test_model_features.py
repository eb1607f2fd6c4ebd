"""Record-18 model features against hand-computed float64 references on tiny inputs, and each switch turned off
leaving the rest of the model unchanged."""
import math

import pytest
import torch
import torch.nn.functional as F

import attention
import schedules
import train_gpt
from config import parse_config
from model import GPT, Block, multi_token_loss

# every record-18 feature on, at a size where a forward takes milliseconds (4 layers, vocab 64, BOS = 63)
FEATURE_ARGS = ["--preset", "medium-tiny", "--vocab-size", "64", "--bos-id", "63", "--num-layers", "4",
                "--model-dim", "32", "--num-heads", "2", "--head-dim", "16", "--gate-dims", "8",
                "--num-value-embeds", "1", "--skip-connections", "0:3,1:2", "--backout-layer", "2",
                "--long-window-layers", "0,3", "--window-block", "4"]


def feature_cfg(*extra):
    return parse_config(FEATURE_ARGS + list(extra))


def randomize(model, std=0.3, seed=0):
    """Every parameter random (zero-init gates and projections would hide their paths)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)
    return model


def tokens(T=24, seed=0, vocab=63, bos=63, starts=(0, 9, 17)):
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, vocab, (1, T + 1), generator=gen)
    idx[0, list(starts)] = bos
    return idx[:, :-1], idx[:, 1:]


def rms(x):
    return x / torch.sqrt(x.square().mean(-1, keepdim=True) + torch.finfo(x.dtype).eps)


# ---------------------------------------------------------------------------------------------- attention

def reference_attention(x, layer, freqs, ve, doc_ids, window, scale):
    """One attention layer by hand, float64, position by position. x: (T, d)."""
    T, d = x.shape
    H, D = layer.num_heads, layer.head_dim
    wq, wk, wv, wo = layer.qkvo_w
    s_qkv, s_o = layer.qkvo_scales
    q, k, v = ((s_qkv * x @ w.T).view(T, H, D) for w in (wq, wk, wv))
    q, k = rms(q), rms(k)

    def rotate(t):
        out = t.clone()
        for pos in range(T):
            for i in range(D // 2):
                c, s = math.cos(pos * freqs[i]), math.sin(pos * freqs[i])
                a, b = t[pos, :, i], t[pos, :, D // 2 + i]
                out[pos, :, i], out[pos, :, D // 2 + i] = a * c + b * s, b * c - a * s
        return out

    q, k = rotate(q), rotate(k)
    if layer.key_offset:  # zero-frequency dims of key t from key t - 1
        shifted = k.clone()
        for j in range(D):
            if j % (D // 2) >= D // 4:
                shifted[1:, :, j] = k[:-1, :, j]
        k = shifted
    g = layer.value_gate.size(1)
    v = v + 2 * torch.sigmoid(x[:, :g] @ layer.value_gate.T)[:, :, None] * ve.view(T, H, D)
    y = torch.zeros(T, H, D, dtype=x.dtype)
    for t in range(T):
        allowed = [s for s in range(T) if s <= t and doc_ids[s] == doc_ids[t] and t - s <= window]
        for h in range(H):
            logits = torch.stack([scale * q[t, h] @ k[s, h] for s in allowed])
            p = torch.softmax(logits, 0)
            y[t, h] = sum(p_i * v[s, h] for p_i, s in zip(p, allowed))
    y = y * torch.sigmoid(x[:, :g] @ layer.output_gate.T)[:, :, None]
    return y.reshape(T, d) @ (s_o * wo).T


@pytest.mark.parametrize("key_offset", [True, False])
def test_attention_layer_matches_hand_reference(key_offset):
    """QKVO scales, QK norm, half rotary after YaRN, partial key offset, value-embedding gate, output gate, document
    and window mask, attention scale."""
    cfg = feature_cfg()
    torch.manual_seed(0)
    layer = randomize(attention.CausalSelfAttention(cfg, has_value_embed=True, key_offset=key_offset)).double()
    T, window, scale = 24, 6, 0.13
    x = torch.randn(1, T, cfg.model_dim, dtype=torch.float64)
    ve = torch.randn(1, T, cfg.model_dim, dtype=torch.float64)
    idx, _ = tokens(T)
    doc_ids = (idx[0] == cfg.bos_id).cumsum(0)
    base = attention.rotary_base_freqs(cfg.head_dim, "half", cfg.rotary_base).double()
    freqs = attention.yarn_freqs(base, [(12, 28)])
    cos, sin = attention.rotary_cos_sin(freqs, T)
    mask = attention.dense_attention_mask(doc_ids, torch.tensor(window))[None, None]
    got = layer(x, ve, mask, cos, sin, scale)[0]
    expected = reference_attention(x[0], layer, freqs.tolist(), ve[0], doc_ids.tolist(), window, scale)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_key_offset_shifts_only_the_stationary_dims():
    k = torch.arange(2 * 3 * 1 * 8, dtype=torch.float64).view(2, 3, 1, 8)  # (B, T, H, D=8): stationary 2,3,6,7
    out = attention.shift_stationary_dims(k)
    for pos in range(3):
        for j in range(8):
            src = pos - 1 if pos > 0 and j in (2, 3, 6, 7) else pos
            assert torch.equal(out[:, pos, 0, j], k[:, src, 0, j])


# ---------------------------------------------------------------------------------------------- the model

def test_smear_matches_hand_reference():
    cfg = feature_cfg("--tied-head-frac", "0")
    torch.manual_seed(0)
    model = randomize(GPT(cfg)).double()
    idx, _ = tokens()
    e = model.embed.weight[idx[0]]  # (T, d)
    lam, w, g = model.smear_lambda, model.smear_gate[0], cfg.gate_dims
    expected = e.clone()
    for t in range(1, e.size(0)):
        expected[t] = e[t] + lam * torch.sigmoid(e[t, :g] @ w) * e[t - 1]
    torch.testing.assert_close(model.input_embedding(idx)[0], expected, rtol=1e-12, atol=1e-12)


def test_residual_lambdas_with_second_embedding():
    """An MLP-only block with a zero MLP output: x -> r x + a x0 + b x02 exactly (r init 1.05, a, b init 0)."""
    cfg = feature_cfg()
    block = Block(cfg, has_attention=False, has_value_embed=False, long_window=False)
    assert block.resid_lambda.item() == pytest.approx(1.05) and block.x0_lambdas.tolist() == [0.0, 0.0]
    with torch.no_grad():
        block.resid_lambda.fill_(1.3)
        block.x0_lambdas.copy_(torch.tensor([-0.4, 0.7]))
        block.mlp.proj_w.zero_()
    x, x0, x02 = (torch.randn(1, 5, cfg.model_dim) for _ in range(3))
    out = block(x, x0, x02, None, None, None, None, 1.0)
    torch.testing.assert_close(out, 1.3 * x - 0.4 * x0 + 0.7 * x02)


def test_gated_skips_backout_and_head_wiring():
    """hidden_states against the blocks run by hand: skip j into block dst scaled by
    sigmoid(s_j) * 2 sigmoid(W_j x0[:g]); x -= lambda * (output of backout_layer); final RMS norm."""
    cfg = feature_cfg()
    torch.manual_seed(0)
    model = randomize(GPT(cfg)).double()
    model.apply_schedule(schedules.schedule_at(cfg, 10))
    idx, _ = tokens()
    masks = model.attention_masks(idx, 12, 4, use_flex=False)
    x0 = rms(model.input_embedding(idx))
    x02 = rms(model.embed2(idx))
    cos, sin = attention.rotary_cos_sin(model.rotary_freqs, idx.size(1))
    ve = model.value_embeds[0](idx)
    g, x, outputs = cfg.gate_dims, x0, {}
    for i, block in enumerate(model.blocks):
        for j, (src, dst) in enumerate([(0, 3), (1, 2)]):
            if dst == i:
                gate = torch.sigmoid(model.skip_lambdas[j]) * 2 * torch.sigmoid(x0[..., :g] @ model.skip_gates[j])
                x = x + gate[..., None] * outputs[src]
        x = block(x, x0, x02, ve if i in (0, 3) else None, masks["long" if i in (0, 3) else "short"], cos, sin,
                  model.attn_scale)
        outputs[i] = x
    expected = rms(x - model.backout_lambda * outputs[2])
    torch.testing.assert_close(model.hidden_states(idx, masks), expected, rtol=1e-12, atol=1e-12)


def test_softcaps():
    cfg = feature_cfg()
    model = GPT(cfg)
    z = torch.tensor([-40.0, -5.0, 0.0, 3.0, 100.0], dtype=torch.float64)
    expected = torch.tensor([23 / (1 + math.exp(-(v + 5) / 7.5)) for v in z.tolist()], dtype=torch.float64)
    torch.testing.assert_close(model.softcap(z), expected)
    isru = GPT(feature_cfg("--logit-softcap-kind", "isru", "--logit-softcap", "15"))
    torch.testing.assert_close(isru.softcap(z), torch.tensor([15 * v / math.sqrt(v * v + 225) for v in z.tolist()],
                                                             dtype=torch.float64))


def test_multi_token_loss_matches_a_loop():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 7, 11, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, 11, (2, 7), generator=gen)
    weights = torch.tensor([1.0, 0.5, 0.2], dtype=torch.float64)
    expected = 0.0
    for b in range(2):
        for t in range(7):
            log_p = torch.log_softmax(logits[b, t], 0)
            for k in range(3):
                if t + k < 7:  # the token k positions after the next one, within the row
                    expected += weights[k].item() * -log_p[targets[b, t + k]].item()
    assert multi_token_loss(logits, targets, weights).item() == pytest.approx(expected, rel=1e-12)


def test_training_loss_mtp_sum_and_bf16_cross_entropy():
    cfg = feature_cfg()
    torch.manual_seed(0)
    model = randomize(GPT(cfg), std=0.1)
    idx, targets = tokens()
    masks = model.attention_masks(idx, 12, 4, use_flex=False)
    weights = torch.tensor([1.0, 0.5, 0.25])
    logits = model(idx, None, masks)  # soft-capped fp32 logits
    expected = multi_token_loss(logits, targets, weights)
    assert model(idx, targets, masks, weights).item() == pytest.approx(expected.item(), rel=1e-5)  # summed
    plain = F.cross_entropy(logits[0], targets[0], reduction="sum")
    assert model(idx, targets, masks, weights[:1]).item() == pytest.approx(plain.item(), rel=1e-5)
    model.eval()  # validation: mean next-token loss, no MTP
    assert model(idx, targets, masks).item() == pytest.approx(plain.item() / targets.numel(), rel=1e-5)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 head output: loss on the bf16 soft-capped logits
        head = model.head(model.hidden_states(idx, masks))
        bf16_loss = model(idx, targets, masks)
    assert head.dtype == torch.bfloat16
    capped = model.softcap(head)[0]  # outside autocast: bf16 in, bf16 out
    assert capped.dtype == torch.bfloat16
    reference = F.cross_entropy(capped, targets[0], reduction="none").float().sum()
    assert bf16_loss.item() == pytest.approx(reference.item(), rel=1e-6)
    fp32 = F.cross_entropy(model.softcap(head[0].float()), targets[0], reduction="sum")
    assert bf16_loss.item() != fp32.item()  # not the fp32 loss autocast would have computed
    model.cfg.bf16_cross_entropy = False
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(idx, targets, masks).item() == pytest.approx(fp32.item(), rel=1e-6)


def test_tied_embedding_then_untie_with_adam_state():
    cfg = feature_cfg("--no-smear")
    torch.manual_seed(0)
    model = GPT(cfg)
    assert model.tied and not model.embed.weight.requires_grad
    assert model.head.weight.std().item() == pytest.approx(0.005, rel=0.1)  # head init N(0, 0.005^2)
    idx, targets = tokens()
    torch.testing.assert_close(model.input_embedding(idx)[0], model.head.weight[idx[0]])
    adam, matrix = train_gpt.build_optimizers(model, cfg)
    masks = model.attention_masks(idx, 12, 4, use_flex=False)
    for _ in range(2):  # Adam steps on odd steps (record 18): one skipped call, then one step
        model(idx, targets, masks).backward()
        adam.step()
    assert model.embed.weight not in adam.state  # left out while tied
    train_gpt.untie_embedding(model, adam)
    assert not model.tied and model.embed.weight.requires_grad
    assert torch.equal(model.embed.weight, model.head.weight)
    head_state, embed_state = adam.state[model.head.weight], adam.state[model.embed.weight]
    assert embed_state["step"] == head_state["step"] == 1
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(embed_state[key], head_state[key])
        assert embed_state[key].data_ptr() != head_state[key].data_ptr()


def test_parameter_roles_and_optimizer_groups():
    cfg = feature_cfg()
    model = GPT(cfg)
    adam, matrix = train_gpt.build_optimizers(model, cfg)
    seen = [id(p) for opt in (adam, matrix) for g in opt.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())
    assert type(matrix).__name__ == "NorMuon"
    by_mul = {g["lr_mul"]: g for g in matrix.param_groups}  # the record's whole multipliers: no shape factor
    assert set(by_mul) == {2.0, 4.0, 0.1} and len(matrix.param_groups) == 4  # attn and mlp_in both 2
    assert all(g["lr"] == 0.015 and g["shape_scale"] == "none" and g["cautious_weight_decay"] and
               g["weight_decay"] == 1.2 and g["weight_decay_mul"] == 1.0 for g in matrix.param_groups)
    gates = by_mul[0.1]
    assert gates["neuron_axis"] == "rows" and len(gates["params"]) == 4 + 2  # output gates + value gates
    assert all(p.shape == (cfg.num_heads, cfg.gate_dims) for p in gates["params"])
    decay = {round(g["lr"], 6): g["weight_decay_mul"] for g in adam.param_groups}
    assert decay == {0.004: 150.0, 0.3: 5.0, 4e-5: 0.0, 0.02: 0.0, 0.04: 0.0}  # embed+head, ve+embed2, gates, x0, scalars
    assert all(g["step_every"] == 2 and g["cautious_weight_decay"] and g["weight_decay"] == 0.005 and g["eps"] == 1e-8
               for g in adam.param_groups)
    assert next(g for g in adam.param_groups if g["lr"] == 0.04)["betas"] == (0.9, 0.99)


# ---------------------------------------------------------------------------------------------- switches off

def _neutral_smear(on, off):
    on.smear_lambda.data.zero_()


def _neutral_backout(on, off):
    on.backout_lambda.data.zero_()


def _neutral_second_embed(on, off):
    for block in on.blocks:
        block.x0_lambdas.data[1] = 0.0


def _neutral_qkvo_scales(on, off):
    for block in on.blocks:
        block.attn.qkvo_scales.data.fill_(1.0)


def _neutral_value_gates(on, off):  # 2 sigmoid(0) = 1: v + ve, the ungated mix with l0 = l1 = 1
    for a, b in zip(on.blocks, off.blocks):
        if a.attn.value_gate is not None:
            a.attn.value_gate.data.zero_()
            b.attn.value_mix.data.fill_(1.0)


def _neutral_tie(on, off):
    off.embed.weight.data.copy_(on.head.weight.data)


@pytest.mark.parametrize("flag, neutralize", [
    ("--no-smear", _neutral_smear), ("--backout-layer=-1", _neutral_backout), ("--no-second-embed", _neutral_second_embed),
    ("--no-qkvo-scales", _neutral_qkvo_scales), ("--no-value-embed-gates", _neutral_value_gates),
    ("--tied-head-frac=0", _neutral_tie), ("--no-yarn", None), ("--no-bf16-cross-entropy", None),
])
def test_a_feature_switched_off_leaves_the_rest_unchanged(flag, neutralize):
    """Feature on with its own parameters set to their neutral values == feature off, with every shared parameter
    equal; and the off model has exactly the on model's parameters minus the feature's own."""
    on_cfg, off_cfg = feature_cfg(), feature_cfg(flag)
    torch.manual_seed(0)
    on = randomize(GPT(on_cfg))
    off = GPT(off_cfg)
    on_names, off_names = dict(on.named_parameters()), dict(off.named_parameters())
    for name, p in off_names.items():
        if name in on_names:  # x0_lambdas lose their second-embedding entry without it
            p.data.copy_(on_names[name].data[:p.shape[0]] if p.ndim else on_names[name].data)
    if neutralize is not None:
        neutralize(on, off)
    on.apply_schedule(schedules.schedule_at(on_cfg, 0))
    off.apply_schedule(schedules.schedule_at(off_cfg, 0))
    idx, targets = tokens()
    masks = on.attention_masks(idx, 12, 4, use_flex=False)
    torch.testing.assert_close(off(idx, None, masks), on(idx, None, masks), rtol=0, atol=0)
    torch.testing.assert_close(off(idx, targets, masks), on(idx, targets, masks), rtol=0, atol=0)
    extra_on = set(on_names) - set(off_names)
    extra_off = set(off_names) - set(on_names)
    assert all(any(part in n for part in ("smear", "backout", "embed2", "qkvo_scales", "value_gate"))
               for n in extra_on), extra_on
    assert extra_off <= {f"blocks.{i}.attn.value_mix" for i in range(4)}, extra_off
