"""ldm_course.layers: timestep embedding and ResBlock equal diffusers, gradients flow, bad input is named."""
import pytest
import torch

from ldm_course.layers import (Downsample, ResBlock, TimestepMLP, Upsample, diffusers_resblock_state,
                               timestep_embedding)


@pytest.mark.parametrize("dim", [3, 4, 7, 32, 33, 320])
@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("shift", [0.0, 1.0])
@pytest.mark.parametrize("scale,max_period", [(1.0, 10000), (1000.0, 10000), (0.5, 100)])
def test_timestep_embedding_equals_diffusers(dim, flip, shift, scale, max_period):
    from diffusers.models.embeddings import get_timestep_embedding
    if dim // 2 == shift:
        pytest.skip("diffusers divides by zero here (NaN); ours raises, tested below")
    t = torch.tensor([0, 1, 2.5, 17, 500, 999])
    ours = timestep_embedding(t, dim, max_period, flip, shift, scale)
    ref = get_timestep_embedding(t, dim, flip, shift, scale, max_period)
    assert ours.shape == (6, dim) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)


def test_timestep_embedding_inputs():
    assert timestep_embedding(torch.tensor(5), 8).shape == (1, 8)
    assert torch.equal(timestep_embedding(torch.tensor([3]), 8), timestep_embedding(torch.tensor([3.0]), 8))
    with pytest.raises(ValueError, match=r"shape \(B,\).*got shape \(2, 1\)"):
        timestep_embedding(torch.zeros(2, 1), 8)
    with pytest.raises(ValueError, match="dtype torch.bool"):
        timestep_embedding(torch.tensor([True]), 8)
    with pytest.raises(ValueError, match="divides by zero"):
        timestep_embedding(torch.tensor([1]), 2)


def test_timestep_mlp_equals_diffusers():
    from diffusers.models.embeddings import TimestepEmbedding
    ours, ref = TimestepMLP(16, 64), TimestepEmbedding(16, 64)
    ref.load_state_dict(ours.state_dict())
    e = torch.randn(3, 16)
    torch.testing.assert_close(ours(e), ref(e))
    with pytest.raises(ValueError, match=r"expects \(B, 16\); got shape \(3, 8\)"):
        ours(torch.randn(3, 8))


@pytest.mark.parametrize("cin,cout,groups", [(32, 64, 32), (64, 64, 32), (16, 48, 8)])
def test_resblock_equals_diffusers(cin, cout, groups):
    from diffusers.models.resnet import ResnetBlock2D
    ours = ResBlock(cin, cout, emb_dim=40, norm_groups=groups).double().eval()
    ref = ResnetBlock2D(in_channels=cin, out_channels=cout, temb_channels=40, groups=groups, eps=1e-5,
                        time_embedding_norm="scale_shift").double().eval()
    ref.load_state_dict(diffusers_resblock_state(ours.state_dict()))
    x, e = torch.randn(2, cin, 8, 8, dtype=torch.float64), torch.randn(2, 40, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, e), ref(x, e), atol=1e-12, rtol=0)


def test_down_up_equal_diffusers():
    from diffusers.models.downsampling import Downsample2D
    from diffusers.models.upsampling import Upsample2D
    d, u = Downsample(8), Upsample(8)
    rd, ru = Downsample2D(8, use_conv=True, padding=1, name="op"), Upsample2D(8, use_conv=True)
    rd.load_state_dict(d.state_dict()); ru.load_state_dict(u.state_dict())
    x = torch.randn(2, 8, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(d(x), rd(x)); torch.testing.assert_close(u(x), ru(x))
    assert d(x).shape == (2, 8, 6, 6) and u(x).shape == (2, 8, 24, 24)


@pytest.mark.parametrize("cin,cout", [(32, 64), (32, 32)])
def test_resblock_shapes_and_gradients(cin, cout):
    block = ResBlock(cin, cout, emb_dim=24, dropout=0.1)
    x, e = torch.randn(2, cin, 8, 8, requires_grad=True), torch.randn(2, 24, requires_grad=True)
    y = block(x, e)
    assert y.shape == (2, cout, 8, 8)
    y.square().mean().backward()
    for name, p in block.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0 and e.grad.abs().sum() > 0


def test_resblock_without_embedding():
    block = ResBlock(16, 32, norm_groups=8)
    assert block.emb_proj is None and block(torch.randn(1, 16, 4, 4)).shape == (1, 32, 4, 4)
    with pytest.raises(ValueError, match="built with emb_dim=None"):
        block(torch.randn(1, 16, 4, 4), torch.randn(1, 8))


def test_resblock_bad_input():
    with pytest.raises(ValueError, match="in_channels=48 is not divisible by norm_groups=32"):
        ResBlock(48, 64)
    with pytest.raises(ValueError, match="out_channels=20 is not divisible by norm_groups=8"):
        ResBlock(16, 20, norm_groups=8)
    block = ResBlock(32, 64, emb_dim=24)
    with pytest.raises(ValueError, match=r"expects x of shape \(B, 32, H, W\); got shape \(2, 16, 8, 8\)"):
        block(torch.randn(2, 16, 8, 8), torch.randn(2, 24))
    with pytest.raises(ValueError, match=r"emb_dim=24\); got \(2, 12\)"):
        block(torch.randn(2, 32, 8, 8), torch.randn(2, 12))
    with pytest.raises(ValueError, match=r"\(B=2, emb_dim=24\); got None"):
        block(torch.randn(2, 32, 8, 8))
    with pytest.raises(ValueError, match=r"Upsample expects x of shape \(B, 8, H, W\)"):
        Upsample(8)(torch.randn(1, 4, 8, 8))


@pytest.mark.parametrize("cin,cout,groups", [(32, 64, 32), (16, 48, 8)])
def test_resblock_default_time_embedding_equals_diffusers(cin, cout, groups):
    "`time_embedding_norm='default'` (Stable Diffusion's ResBlock: embedding added before the second GroupNorm)."
    from diffusers.models.resnet import ResnetBlock2D
    ours = ResBlock(cin, cout, emb_dim=40, norm_groups=groups, time_embedding_norm="default").double().eval()
    ref = ResnetBlock2D(in_channels=cin, out_channels=cout, temb_channels=40, groups=groups, eps=1e-5,
                        time_embedding_norm="default").double().eval()
    ref.load_state_dict(diffusers_resblock_state(ours.state_dict()))
    assert ours.emb_proj.out_features == cout
    x, e = torch.randn(2, cin, 8, 8, dtype=torch.float64), torch.randn(2, 40, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, e), ref(x, e), atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="time_embedding_norm='spatial'; expected 'scale_shift' or 'default'"):
        ResBlock(cin, cout, emb_dim=40, norm_groups=groups, time_embedding_norm="spatial")
