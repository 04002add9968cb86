"""AMP scores equal a direct computation (no hooks), and padding does not change them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from conftest import random_batches
from tiny import tiny_model
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from amp_prune.arch import get_spec
from amp_prune.calib.data import to_batches
from amp_prune.width.criteria import ScoreContext, amp_scores, magnitude_scores, random_scores
from amp_prune.width.criteria.amp import head_contributions

CPU = torch.device("cpu")
CTX = ScoreContext(CPU, progress=False)


@torch.no_grad()
def direct_scores(model, sequences):
    """Recompute every block by hand from ``output_hidden_states``: I_h and I_j of DESIGN.md."""
    cfg = model.config
    nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    heads = torch.zeros(cfg.num_hidden_layers, nh, dtype=torch.float64)
    chans = torch.zeros(cfg.num_hidden_layers, cfg.intermediate_size, dtype=torch.float64)
    n_tok = 0
    for seq in sequences:
        ids = torch.tensor([seq])
        T = ids.shape[1]
        n_tok += T
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
        pos = torch.arange(T)[None]
        for i, layer in enumerate(model.model.layers):
            x = hs[i]
            a = layer.self_attn
            h = layer.input_layernorm(x)
            q = a.q_proj(h).view(1, T, nh, hd).transpose(1, 2)
            k = a.k_proj(h).view(1, T, nkv, hd).transpose(1, 2)
            v = a.v_proj(h).view(1, T, nkv, hd).transpose(1, 2)
            cos, sin = model.model.rotary_emb(x, pos)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            k = k.repeat_interleave(nh // nkv, dim=1)
            v = v.repeat_interleave(nh // nkv, dim=1)
            att = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [1, nh, T, hd]
            wo = a.o_proj.weight
            for head in range(nh):
                contrib = att[0, head] @ wo[:, head * hd:(head + 1) * hd].T  # [T, hidden]
                heads[i, head] += contrib.abs().sum().double()
            x2 = x + a.o_proj(att.transpose(1, 2).reshape(1, T, nh * hd))
            m = layer.mlp
            z = F.silu(m.gate_proj(layer.post_attention_layernorm(x2))) * m.up_proj(layer.post_attention_layernorm(x2))
            chans[i] += z[0].abs().sum(0).double()
    return heads / n_tok, chans / n_tok


def sequences(lengths=(12, 30, 7, 21), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 100, (n,), generator=g).tolist() for n in lengths]


def test_amp_equals_direct_computation():
    model = tiny_model("llama_gqa")
    spec = get_spec("llama")
    seqs = sequences()
    got = amp_scores(model, spec, to_batches(seqs, 4, pad_id=3), CTX)
    want_heads, want_chans = direct_scores(model, seqs)
    for i, s in enumerate(got):
        torch.testing.assert_close(s.heads.double(), want_heads[i], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(s.channels.double(), want_chans[i], rtol=1e-4, atol=1e-6)


def test_padding_does_not_change_scores():
    model = tiny_model("qwen2")
    spec = get_spec("qwen2")
    seqs = sequences((5, 40, 18, 33, 9))
    padded = amp_scores(model, spec, to_batches(seqs, 5, pad_id=3), CTX)  # heavy padding in one batch
    alone = amp_scores(model, spec, to_batches(seqs, 1, pad_id=3), CTX)  # no padding at all
    other_pad = amp_scores(model, spec, to_batches(seqs, 5, pad_id=42), CTX)  # pad id must not matter either
    for p, a, o in zip(padded, alone, other_pad):
        torch.testing.assert_close(p.heads, a.heads, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(p.channels, a.channels, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(p.heads, o.heads, rtol=1e-5, atol=1e-6)


def test_head_contributions_chunking_matches_dense():
    import amp_prune.width.criteria.amp as amp
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(50, 4 * 8, generator=g), torch.randn(16, 4 * 8, generator=g)
    dense = torch.stack([(x[:, h * 8:(h + 1) * 8] @ w[:, h * 8:(h + 1) * 8].T).abs().sum() for h in range(4)])
    old = amp._CHUNK_ELEMS
    try:
        amp._CHUNK_ELEMS = 64 * 7  # forces 7-token chunks
        torch.testing.assert_close(head_contributions(x, w, 4), dense, rtol=1e-5, atol=1e-4)
    finally:
        amp._CHUNK_ELEMS = old


def test_magnitude_and_random_baselines():
    model = tiny_model("phi3")
    spec = get_spec("phi3")
    mag = magnitude_scores(model, spec, [], CTX)
    d = spec.dims(model.config)
    w = model.model.layers[0].self_attn.o_proj.weight
    q = model.model.layers[0].self_attn.qkv_proj.weight[: d["n_heads"] * d["head_dim"]]
    hd = d["head_dim"]
    want = (q[hd:2 * hd].pow(2).sum() + w[:, hd:2 * hd].pow(2).sum()).sqrt()
    torch.testing.assert_close(mag[0].heads[1], want)
    assert mag[0].channels.shape == (d["intermediate"],)
    r1 = random_scores(model, spec, [], ScoreContext(CPU, seed=7))
    r2 = random_scores(model, spec, [], ScoreContext(CPU, seed=7))
    r3 = random_scores(model, spec, [], ScoreContext(CPU, seed=8))
    assert torch.equal(r1[1].channels, r2[1].channels) and not torch.equal(r1[1].channels, r3[1].channels)


def test_amp_ranks_a_dead_head_and_channel_lowest():
    model = tiny_model("mistral")
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight[:, 16:32] = 0  # head 1 contributes nothing
        model.model.layers[1].mlp.up_proj.weight[5] = 0  # channel 5 is always 0
    s = amp_scores(model, get_spec("mistral"), random_batches(), CTX)[1]
    assert s.heads[1] == 0 and s.heads.argmin() == 1
    assert s.channels[5] == 0 and s.channels.argmin() == 5


@torch.no_grad()
def test_wanda_sp_equals_direct_computation():
    """|W| * ||X||, summed per head (o_proj columns) and channel (down_proj column), from a plain forward."""
    from amp_prune.width.criteria import wanda_sp_scores

    model = tiny_model("llama_gqa")
    spec = get_spec("llama")
    cfg = model.config
    seqs = sequences()
    feats = {}

    def hook(name):
        def fn(_m, args):
            x = args[0][0].double()
            feats[name] = feats.get(name, 0) + x.pow(2).sum(0)
        return fn

    handles = []
    for i, layer in enumerate(model.model.layers):
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(hook(("o", i))))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(hook(("d", i))))
    for seq in seqs:  # one unpadded sequence at a time
        model(input_ids=torch.tensor([seq]))
    for h in handles:
        h.remove()
    got = wanda_sp_scores(model, spec, to_batches(seqs, 3, pad_id=3), CTX)
    for i, layer in enumerate(model.model.layers):
        wo = layer.self_attn.o_proj.weight.double().abs()
        wd = layer.mlp.down_proj.weight.double().abs()
        heads = torch.stack([(wo[:, h * cfg.head_dim:(h + 1) * cfg.head_dim]
                              * feats[("o", i)][h * cfg.head_dim:(h + 1) * cfg.head_dim].sqrt()).sum()
                             for h in range(cfg.num_attention_heads)])
        chans = torch.stack([(wd[:, j] * feats[("d", i)][j].sqrt()).sum() for j in range(cfg.intermediate_size)])
        torch.testing.assert_close(got[i].heads.double(), heads, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(got[i].channels.double(), chans, rtol=1e-4, atol=1e-6)
