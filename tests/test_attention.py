"""ldm_course.attention: naive == SDPA, padding masks, bad input, and parameter-for-parameter equality with diffusers."""
import math

import pytest
import torch

from ldm_course.attention import (FeedForward, MultiHeadAttention, SpatialTransformer, TransformerBlock, attention,
                                  attention_weights, bench_attention, bench_table, from_diffusers_state_dict,
                                  naive_attention, peak_memory)


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _use_sdpa(module, flag):
    for m in module.modules():
        if isinstance(m, MultiHeadAttention): m.use_sdpa = flag


# -- functional attention ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("M", [13, 6])  # self-attention length and a shorter "context"
def test_naive_equals_sdpa(M):
    q, k, v = _randn(3, 2, 13, 8, seed=1), _randn(3, 2, M, 8, seed=2), _randn(3, 2, M, 8, seed=3)
    mask = torch.rand(3, M, generator=torch.Generator().manual_seed(4)) > 0.4
    mask[0] = True; mask[1, 0] = True; mask[2] = False
    torch.testing.assert_close(attention(q, k, v), naive_attention(q, k, v), atol=1e-5, rtol=0)
    torch.testing.assert_close(attention(q, k, v, mask), naive_attention(q, k, v, mask), atol=1e-5, rtol=0)
    assert attention(q, k, v, mask)[2].abs().max() == 0  # no key left → zeros, not NaN
    assert naive_attention(q, k, v, mask)[2].abs().max() == 0


def test_naive_matches_formula_and_padding_is_invisible():
    q, k, v = _randn(1, 1, 4, 8, seed=1), _randn(1, 1, 5, 8, seed=2), _randn(1, 1, 5, 8, seed=3)
    want = torch.softmax(q[0, 0] @ k[0, 0].T / math.sqrt(8), -1) @ v[0, 0]
    torch.testing.assert_close(naive_attention(q, k, v)[0, 0], want)
    k_pad, v_pad = torch.cat([k, 50 * _randn(1, 1, 3, 8)], 2), torch.cat([v, 50 * _randn(1, 1, 3, 8, seed=5)], 2)
    mask = torch.tensor([[True] * 5 + [False] * 3])
    for f in (naive_attention, attention):
        torch.testing.assert_close(f(q, k_pad, v_pad, mask), f(q, k, v), atol=1e-5, rtol=0)
    w = attention_weights(q, k_pad, mask)
    torch.testing.assert_close(w.sum(-1), torch.ones(1, 1, 4))
    assert w[..., 5:].abs().max() == 0


def test_integer_mask_accepted_float_mask_rejected():
    q = _randn(2, 2, 4, 8)
    int_mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    torch.testing.assert_close(attention(q, q, q, int_mask), attention(q, q, q, int_mask.bool()))
    with pytest.raises(ValueError, match="expected a bool key padding mask"):
        attention(q, q, q, int_mask.float())
    with pytest.raises(ValueError, match=r"expected \(B, M\) = \(2, 4\)"):
        naive_attention(q, q, q, torch.ones(2, 3, dtype=torch.bool))


# -- modules ----------------------------------------------------------------------------------------------------
def test_multihead_shapes_naive_vs_sdpa_and_any_context_length():
    torch.manual_seed(0)
    mha = MultiHeadAttention(32, num_heads=4, context_dim=20).eval()
    x, ctx = _randn(2, 10, 32), _randn(2, 7, 20, seed=1)
    mask = torch.tensor([[True] * 7, [True] * 3 + [False] * 4])
    with torch.no_grad():
        y = mha(x, ctx, mask)
        assert y.shape == (2, 10, 32)
        assert mha(x, ctx[:, :2]).shape == (2, 10, 32)
        torch.testing.assert_close(mha(x[1:], ctx[1:, :3]), y[1:], atol=1e-5, rtol=0)
        mha.use_sdpa = False
        torch.testing.assert_close(mha(x, ctx, mask), y, atol=1e-5, rtol=0)
    assert MultiHeadAttention(32, num_heads=2, head_dim=8).to_q.out_features == 16
    assert MultiHeadAttention(32).to_out.bias is not None and MultiHeadAttention(32).to_q.bias is None


def test_multihead_bad_input():
    mha = MultiHeadAttention(32, num_heads=4, context_dim=20)
    with pytest.raises(ValueError, match="context_dim=20"):
        mha(_randn(2, 10, 32), _randn(2, 7, 16))
    with pytest.raises(ValueError, match="needs a context"):
        mha(_randn(2, 10, 32))
    with pytest.raises(ValueError, match=r"expected \(B, L, dim=32\)"):
        mha(_randn(2, 10, 31), _randn(2, 7, 20))
    with pytest.raises(ValueError, match="not divisible by num_heads=4"):
        MultiHeadAttention(30, num_heads=4)


def test_feedforward_geglu():
    ff = FeedForward(16, mult=4)
    assert ff.net[0].proj.out_features == 2 * 64 and ff.net[2].in_features == 64
    assert ff(_randn(3, 5, 16)).shape == (3, 5, 16)


def test_spatial_transformer_shapes_mask_and_naive():
    torch.manual_seed(0)
    st = SpatialTransformer(64, num_heads=4, context_dim=24, depth=2).eval()
    x, ctx = _randn(2, 64, 6, 5), _randn(2, 7, 24, seed=1)
    mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    with torch.no_grad():
        y = st(x, ctx, mask)
        assert y.shape == x.shape
        torch.testing.assert_close(st(x[1:], ctx[1:, :4]), y[1:], atol=1e-5, rtol=0)
        assert not torch.allclose(st(x, ctx), st(x, 2 * ctx))
        assert st(x).shape == x.shape  # no context: cross-attention skipped
        _use_sdpa(st, False)
        torch.testing.assert_close(st(x, ctx, mask), y, atol=1e-5, rtol=0)


def test_spatial_transformer_errors():
    st = SpatialTransformer(64, num_heads=4, context_dim=24)
    x = _randn(2, 64, 4, 4)
    with pytest.raises(ValueError, match="context has last dim 16, SpatialTransformer expects context_dim=24"):
        st(x, _randn(2, 7, 16))
    with pytest.raises(ValueError, match=r"expected \(B, C=64, H, W\)"):
        st(_randn(2, 32, 4, 4))
    with pytest.raises(ValueError, match=r"shape \(64, 4, 4\), expected \(B, C=64, H, W\)"):
        st(x[0])
    with pytest.raises(ValueError, match="without a context"):
        st(x, context_mask=torch.ones(2, 3, dtype=torch.bool))
    no_ctx = SpatialTransformer(64, num_heads=4)
    assert no_ctx.transformer_blocks[0].attn2 is None and no_ctx.transformer_blocks[0].norm2 is None
    with pytest.raises(ValueError, match="context_dim=None"):
        no_ctx(x, _randn(2, 7, 24))
    with pytest.raises(ValueError, match="not divisible by norm_groups=32"):
        SpatialTransformer(48)


# -- equality with diffusers ------------------------------------------------------------------------------------
def test_multihead_equals_diffusers_attention():
    from diffusers.models.attention_processor import Attention
    torch.manual_seed(0)
    ref = Attention(query_dim=32, cross_attention_dim=20, heads=4, dim_head=8).eval()
    ours = MultiHeadAttention(32, num_heads=4, head_dim=8, context_dim=20).eval()
    ours.load_state_dict(from_diffusers_state_dict(ref.state_dict()), strict=True)
    x, ctx = _randn(2, 10, 32), _randn(2, 7, 20, seed=1)
    mask = torch.tensor([[True] * 7, [True] * 3 + [False] * 4])
    with torch.no_grad():
        torch.testing.assert_close(ours(x, ctx), ref(x, encoder_hidden_states=ctx), atol=1e-5, rtol=0)
        bias = (1 - mask.float())[:, None, :] * -10000.0
        torch.testing.assert_close(ours(x, ctx, mask), ref(x, encoder_hidden_states=ctx, attention_mask=bias), atol=1e-5, rtol=0)
        self_ref = Attention(query_dim=32, heads=4, dim_head=8).eval()
        self_ours = MultiHeadAttention(32, num_heads=4, head_dim=8).eval()
        self_ours.load_state_dict(from_diffusers_state_dict(self_ref.state_dict()), strict=True)
        torch.testing.assert_close(self_ours(x), self_ref(x), atol=1e-5, rtol=0)


def test_block_equals_diffusers_basic_transformer_block():
    from diffusers.models.attention import BasicTransformerBlock
    torch.manual_seed(0)
    ref = BasicTransformerBlock(32, 4, 8, cross_attention_dim=20, activation_fn="geglu").eval()
    ours = TransformerBlock(32, 4, 8, context_dim=20).eval()
    ours.load_state_dict(from_diffusers_state_dict(ref.state_dict()), strict=True)
    x, ctx = _randn(2, 10, 32), _randn(2, 7, 20, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, ctx), ref(x, encoder_hidden_states=ctx), atol=1e-5, rtol=0)


@pytest.mark.parametrize("context_dim,depth,use_mask", [(24, 2, False), (24, 2, True), (None, 1, False)])
def test_spatial_transformer_equals_diffusers_transformer2d(context_dim, depth, use_mask):
    from diffusers import Transformer2DModel
    torch.manual_seed(0)
    ref = Transformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=32, num_layers=depth,
                             cross_attention_dim=context_dim, norm_num_groups=8).eval()
    ours = SpatialTransformer(32, num_heads=2, head_dim=16, context_dim=context_dim, depth=depth, norm_groups=8).eval()
    ours.load_state_dict(from_diffusers_state_dict(ref.state_dict()), strict=True)
    x = _randn(2, 32, 5, 6)
    ctx = None if context_dim is None else _randn(2, 7, context_dim, seed=1)
    mask = torch.tensor([[True] * 7, [True] * 2 + [False] * 5]) if use_mask else None
    with torch.no_grad():
        want = ref(x, encoder_hidden_states=ctx, encoder_attention_mask=None if mask is None else mask.float(),
                   return_dict=False)[0]
        torch.testing.assert_close(ours(x, ctx, mask), want, atol=1e-5, rtol=0)


# -- benchmark and memory meter ---------------------------------------------------------------------------------
def test_peak_memory_cpu():
    def alloc():
        a, b = torch.empty(4 * 2**18), torch.empty(4 * 2**18)  # 4 MiB each, alive together
        del a, b
        return torch.empty(2**18)
    assert peak_memory(alloc, "cpu") == 8 * 2**20


def test_bench_attention_rows():
    rows = bench_attention(seq_lens=(32, 128), dim=16, heads=2, device="cpu", repeats=1)
    assert [r["seq_len"] for r in rows] == [32, 128]
    for r in rows:
        assert {"seq_len", "device", "threads", "naive_ms", "sdpa_ms", "naive_mb", "sdpa_mb", "weights_mb"} <= set(r)
        assert r["device"] == "cpu" and r["naive_ms"] > 0 and r["sdpa_ms"] > 0
        assert r["naive_mb"] >= r["weights_mb"] == 2 * r["seq_len"] ** 2 * 4 / 2**20  # naive holds the L×L weights
    assert bench_table(rows).count("\n") == 3
    with pytest.raises(ValueError, match="not divisible by heads=3"):
        bench_attention((8,), dim=16, heads=3)
