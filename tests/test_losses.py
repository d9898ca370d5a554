"""ldm_course.losses: the adaptive weight against a hand computation, hinge losses on known logits, discriminator
shapes, perceptual loss, PSNR/SSIM against scikit-image, training with exact resume, bad input."""
import math

import pytest
import torch

from ldm_course.losses import (ABLATIONS, AutoencoderLoss, LossConfig, PatchDiscriminator, PerceptualLoss, adaptive_weight,
                               hinge_d_loss, hinge_g_loss, load_ablation, psnr, save_ablation, ssim, train_vae, unit_normalize)
from ldm_course.vae import VAE


def test_adaptive_weight_by_hand():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    x = torch.randn(5, 3)
    out = net(x)
    rec, g = (out - 1).abs().sum(), -out[:, 0].mean()
    w = net[2].weight
    gr = torch.autograd.grad(rec, w, retain_graph=True)[0]
    gg = torch.autograd.grad(g, w, retain_graph=True)[0]
    expected = (gr.norm() / (gg.norm() + 1e-4)).clamp(0, 1e4) * 0.5
    got = adaptive_weight(rec, g, w, disc_weight=0.5)
    assert torch.allclose(got, expected) and not got.requires_grad
    # clamp: a vanishing GAN gradient cannot blow the weight up
    assert adaptive_weight(rec, 0 * out.sum(), w, disc_weight=1.0) == 1e4


def test_hinge_losses_known_logits():
    assert hinge_d_loss(torch.tensor([1.5, 2.0]), torch.tensor([-1.0, -4.0])) == 0
    assert math.isclose(hinge_d_loss(torch.tensor([0.0]), torch.tensor([0.0])).item(), 1.0)
    assert math.isclose(hinge_d_loss(torch.tensor([-1.0]), torch.tensor([2.0])).item(), 0.5 * (2 + 3))
    assert math.isclose(hinge_g_loss(torch.tensor([2.0, 0.0])).item(), -1.0)


@pytest.mark.parametrize("n_layers,shape", [(1, (2, 1, 14, 14)), (2, (2, 1, 6, 6)), (3, (2, 1, 2, 2))])
def test_discriminator_shapes_and_init(n_layers, shape):
    d = PatchDiscriminator(3, 16, n_layers)
    assert d(torch.randn(2, 3, 32, 32)).shape == shape
    convs = [m for m in d.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(abs(m.weight.std().item() - 0.02) < 0.01 for m in convs if m.weight.numel() > 500)
    with pytest.raises(ValueError, match=r"expects \(B, 3, H, W\)"):
        d(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match="n_layers=0"):
        PatchDiscriminator(1, 16, 0)


def test_perceptual():
    p = PerceptualLoss("classifier")
    x = torch.rand(3, 1, 32, 32) * 2 - 1
    assert torch.allclose(p(x, x), torch.zeros(3))
    assert (p(x, x.flip(-1)) > 0).all()
    assert not any(q.requires_grad for q in p.parameters())
    p.train()
    assert not p.features.net.training          # the frozen network stays in eval mode
    with pytest.raises(ValueError, match="1-channel images"):
        p(torch.zeros(1, 2, 32, 32), torch.zeros(1, 2, 32, 32))
    rgb = torch.rand(2, 3, 32, 32) * 2 - 1      # RGB: each channel scored as a grey image, then averaged
    per_channel = torch.stack([p(rgb[:, c:c + 1], rgb.flip(-1)[:, c:c + 1]) for c in range(3)], 1).mean(1)
    assert torch.allclose(p(rgb, rgb.flip(-1)), per_channel, atol=1e-6)
    with pytest.raises(ValueError, match="unknown perceptual network"):
        PerceptualLoss("alexnet")
    f = torch.randn(2, 5, 3, 3)
    assert torch.allclose(unit_normalize(f).norm(dim=1), torch.ones(2, 3, 3), atol=1e-5)


def test_psnr_ssim_against_references():
    from skimage.metrics import structural_similarity
    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 2, 32, 32, generator=g) * 2 - 1
    b = (a + 0.2 * torch.randn(a.shape, generator=g)).clamp(-1, 1)
    ref = [structural_similarity(((p + 1) / 2).permute(1, 2, 0).numpy(), ((q + 1) / 2).permute(1, 2, 0).numpy(),
                                 data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, channel_axis=2)
           for p, q in zip(a, b)]
    assert torch.allclose(ssim(a, b), torch.tensor(ref, dtype=torch.float32), atol=1e-4)
    assert torch.allclose(ssim(a, a), torch.ones(3))
    mse = ((a - b) / 2).pow(2).flatten(1).mean(1)
    assert torch.allclose(psnr(a, b), 10 * torch.log10(1 / mse))


@pytest.mark.parametrize("kw,match", [
    (dict(kl_weight=-1.0), "kl_weight"), (dict(disc_start=float("nan")), "disc_start"),
    (dict(perceptual_net="lpips"), "perceptual_net"),
])
def test_loss_config_checks(kw, match):
    with pytest.raises(ValueError, match=match):
        LossConfig(**kw)


def test_loss_terms_switch_on_at_their_step():
    vae = VAE(channels=(32, 32))
    loss = AutoencoderLoss(LossConfig(disc_start=5, perceptual_start=3))
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    recon, post = vae(x)
    assert set(loss.generator_loss(x, recon, post, 0, vae.last_layer)[1]) == {"l1", "nll", "kl", "logvar", "loss"}
    assert "perceptual" in loss.generator_loss(x, recon, post, 3, vae.last_layer)[1]
    assert {"g_loss", "disc_weight"} <= set(loss.generator_loss(x, recon, post, 5, vae.last_layer)[1])
    assert AutoencoderLoss(LossConfig(**ABLATIONS["L1"])).discriminator is None


def test_train_vae_resume_is_exact_and_checkpoint_is_kept(tmp_path):
    kw = dict(n_train=64, batch_size=16, epochs=2, progress=False, evaluate=False, loss={"disc_start": 3})
    a, _, ia = train_vae(checkpoint=tmp_path / "a.safetensors", **kw)
    train_vae(checkpoint=tmp_path / "b.safetensors", max_steps=4, **kw)
    b, _, ib = train_vae(checkpoint=tmp_path / "b.safetensors", resume=True, **kw)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    assert ia["history"] == ib["history"] and ia["steps"] == ib["steps"] == 8
    with pytest.raises(ValueError, match="holds an earlier run"):
        train_vae(checkpoint=tmp_path / "a.safetensors", **kw)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train_vae(checkpoint=tmp_path / "none.safetensors", resume=True, **kw)
    with pytest.raises(ValueError, match="other settings"):
        train_vae(checkpoint=tmp_path / "b.safetensors", resume=True, **{**kw, "batch_size": 8})


def test_train_vae_saves_and_evaluates(tmp_path):
    vae, learn, info = train_vae(n_train=32, batch_size=16, progress=False, out=tmp_path / "v.safetensors")
    assert set(info["eval"]) >= {"psnr", "ssim", "rfid", "n"} and info["eval"]["rfid"] is not None
    saved = VAE.read_info(tmp_path / "v.safetensors")["training"]
    assert saved["steps"] == 2 and saved["command"].startswith("from ldm_course.losses import train_vae")
    with pytest.raises(ValueError, match="in_channels=3"):
        train_vae(n_train=32, config={"in_channels": 3}, progress=False, evaluate=False)


def test_ablation_record_roundtrip(tmp_path):
    rows = [{"loss": "L1", "psnr": 20.0}]
    recons = torch.rand(1, 2, 1, 32, 32) * 2 - 1
    save_ablation(rows, recons, tmp_path / "abl")
    back_rows, back = load_ablation(tmp_path / "abl")
    assert back_rows == rows and (back - recons).abs().max() <= 1 / 127.5
