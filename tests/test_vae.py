"""ldm_course.vae: the diagonal Gaussian, shapes, bad input, save/load, shipped weights, and equality with
`diffusers.AutoencoderKL` through `VAE.from_diffusers` for several configs of that family."""
import json

import pytest
import torch

from ldm_course.vae import CBAM, VAE, DiagonalGaussian, VAEConfig, diffusers_name, load_vae


def _autoencoder_kl(channels, layers=1, c_in=1, latent=4, groups=32, **kw):
    from diffusers import AutoencoderKL
    torch.manual_seed(len(channels) * 10 + layers + c_in)
    d = AutoencoderKL(in_channels=c_in, out_channels=c_in, block_out_channels=channels, layers_per_block=layers,
                      latent_channels=latent, norm_num_groups=groups, down_block_types=("DownEncoderBlock2D",) * len(channels),
                      up_block_types=("UpDecoderBlock2D",) * len(channels), **kw).eval()
    with torch.no_grad():   # move away from the default init (zeros, ones) so every tensor matters
        for p in d.parameters(): p.add_(torch.randn_like(p) * 0.05)
    return d


@pytest.mark.parametrize("channels,layers,c_in,latent,groups,kw", [
    ((32, 64), 1, 1, 4, 32, {}),
    ((32, 32, 64), 2, 3, 4, 32, {}),
    ((16, 32, 32, 64), 1, 3, 8, 16, {}),
    ((32, 64, 64), 1, 1, 4, 32, {"use_quant_conv": False, "use_post_quant_conv": False}),
    ((32, 64), 1, 3, 4, 32, {"mid_block_add_attention": False}),
])
def test_from_diffusers_equal(channels, layers, c_in, latent, groups, kw):
    ref = _autoencoder_kl(channels, layers, c_in, latent, groups, **kw)
    ours = VAE.from_diffusers(ref)
    x = torch.randn(2, c_in, 32, 32)
    with torch.no_grad():
        z = ref.encode(x).latent_dist.mode()
        assert (ours.encode(x).mode() - z).abs().max() < 1e-4
        assert (ours.decode(z) - ref.decode(z).sample).abs().max() < 1e-4
    assert ours.factor == 2 ** (len(channels) - 1)
    assert set(map(diffusers_name, ours.state_dict())) == set(ref.state_dict())


def test_from_diffusers_refuses_other_families():
    from diffusers import AutoencoderKL
    with pytest.raises(ValueError, match="act_fn='silu'"):
        VAE.from_diffusers(AutoencoderKL(block_out_channels=(32,), norm_num_groups=32, act_fn="relu"))
    with pytest.raises(ValueError, match="expects a diffusers AutoencoderKL"):
        VAE.from_diffusers(torch.nn.Linear(2, 2))


def test_gaussian_kl_and_sampling():
    m = torch.randn(3, 8, 2, 2)
    q = DiagonalGaussian(m)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(q.mean, q.std), torch.distributions.Normal(0., 1.))
    assert torch.allclose(q.kl(), ref.sum(dim=(1, 2, 3)), atol=1e-4)
    assert q.kl().shape == (3,)
    g = lambda: torch.Generator().manual_seed(1)
    assert torch.equal(q.sample(g()), q.sample(g()))
    assert torch.equal(q.mode(), q.mean)
    assert DiagonalGaussian(torch.full((1, 2, 1, 1), 100.)).logvar.max() == 20   # clamped
    with pytest.raises(ValueError, match=r"\(B, 2·c, h, w\)"):
        DiagonalGaussian(torch.randn(1, 3, 2, 2))


def test_shapes_and_bad_input():
    vae = VAE()
    assert vae.encode(torch.randn(2, 1, 32, 32)).mean.shape == (2, 4, 8, 8)
    assert vae.decode(torch.randn(2, 4, 8, 8)).shape == (2, 1, 32, 32)
    with pytest.raises(ValueError, match=r"expects images \(B, 1, H, W\).*factor 4.*\(2, 3, 32, 32\)"):
        vae.encode(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match=r"divisible by the factor 4.*\(2, 1, 30, 30\)"):
        vae.encode(torch.randn(2, 1, 30, 30))
    with pytest.raises(ValueError, match=r"expects latents \(B, 4, h, w\); got shape \(2, 3, 8, 8\)"):
        vae.decode(torch.randn(2, 3, 8, 8))
    rgb = VAE(in_channels=3)
    assert rgb(torch.randn(1, 3, 32, 32))[0].shape == (1, 3, 32, 32)


@pytest.mark.parametrize("kw,match", [
    (dict(channels=(32, 10**6)), "1 to 1024 channels"),
    (dict(channels=(48, 64)), "not divisible by norm_groups"),
    (dict(latent_channels=0), "latent_channels"),
    (dict(in_channels=7), "in_channels"),
    (dict(channels=()), "1 to 6 levels"),
    (dict(num_classes=10), "latent_size"),
])
def test_config_limits(kw, match):
    with pytest.raises(ValueError, match=match):
        VAEConfig(**kw)


def test_save_load_roundtrip_and_hostile_sidecar(tmp_path):
    vae = VAE(channels=(32, 32), cbam=True)
    path = vae.save_pretrained(tmp_path / "v.safetensors")
    back = VAE.from_pretrained(path)
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad(): assert torch.equal(vae.eval().encode(x).mean, back.encode(x).mean)
    assert torch.equal(load_vae(path).decode(torch.zeros(1, 4, 16, 16)), back.decode(torch.zeros(1, 4, 16, 16)))
    info = json.loads(path.with_suffix(".json").read_text())
    info["config"]["channels"] = [4096, 4096]
    path.with_suffix(".json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match="1 to 1024 channels"):
        VAE.from_pretrained(path)


def test_load_vae_names():
    with pytest.raises(FileNotFoundError, match=r"shipped VAEs: \[.*'fmnist_vae'"):
        load_vae("no_such_vae")
    vae = load_vae()
    assert vae.cfg.in_channels == 1 and vae.factor == 4 and not vae.training


def test_class_head_and_cbam():
    vae = VAE(num_classes=10, latent_size=8, cbam=True)
    post = vae.encode(torch.randn(4, 1, 32, 32))
    ce, centre = vae.class_losses(post, torch.tensor([0, 1, 2, 3]))
    assert ce.ndim == 0 and centre.ndim == 0 and centre > 0
    with pytest.raises(ValueError, match="no class head"):
        VAE().class_losses(post, torch.tensor([0, 1, 2, 3]))
    assert CBAM(16)(torch.randn(2, 16, 8, 8)).shape == (2, 16, 8, 8)
