"""ldm_course.schedules: betas, alphas_cumprod, add_noise, velocity and zero-SNR equal diffusers; bad input is named."""
import json

import pytest
import torch

from ldm_course.schedules import SCHEDULE_KINDS, NoiseSchedule, make_betas, rescale_zero_terminal_snr


@pytest.mark.parametrize("kind", SCHEDULE_KINDS)
@pytest.mark.parametrize("T", [1000, 500, 37, 1])
@pytest.mark.parametrize("beta_range", [(1e-4, 0.02), (0.00085, 0.012), (3e-4, 0.05)])
@pytest.mark.parametrize("zero_snr", [False, True])
def test_equals_diffusers_ddpm(kind, T, beta_range, zero_snr):
    from diffusers import DDPMScheduler
    if T == 1 and zero_snr:
        with pytest.raises(ValueError, match="needs num_train_timesteps >= 2 .*; got num_train_timesteps=1"):
            NoiseSchedule(kind, T, *beta_range, rescale_zero_terminal_snr=True)
        return  # diffusers divides 0 by 0 there
    ours = NoiseSchedule(kind, T, *beta_range, rescale_zero_terminal_snr=zero_snr)
    ref = DDPMScheduler(**ours.to_diffusers_kwargs())
    for name in ("betas", "alphas", "alphas_cumprod"):
        assert getattr(ours, name).dtype == torch.float32 and getattr(ours, name).shape == (T,)
        torch.testing.assert_close(getattr(ours, name), getattr(ref, name), atol=1e-6, rtol=0)
    g = torch.Generator().manual_seed(T)
    x0 = torch.rand((8, 3, 4, 4), generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, T, (8,), generator=g)
    torch.testing.assert_close(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t), atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.velocity(x0, noise, t), ref.get_velocity(x0, noise, t), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", SCHEDULE_KINDS)
@pytest.mark.parametrize("T", [1000, 250])
def test_zero_snr_equals_diffusers(kind, T):
    from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr as ref
    betas = make_betas(kind, T, 0.00085, 0.012)
    torch.testing.assert_close(rescale_zero_terminal_snr(betas), ref(betas), atol=1e-6, rtol=0)
    s = NoiseSchedule(kind, T, 0.00085, 0.012, rescale_zero_terminal_snr=True)
    assert s.alphas_cumprod[-1] == 0 and s.snr(T - 1) == 0
    torch.testing.assert_close(s.alphas_cumprod[0], NoiseSchedule(kind, T, 0.00085, 0.012).alphas_cumprod[0])


def test_snr_and_v_inversion():
    s = NoiseSchedule("cosine")
    t = torch.tensor([0, 5, 500, 999])
    abar = s.alphas_cumprod[t]
    torch.testing.assert_close(s.snr(t), abar / (1 - abar))
    assert s.snr(torch.arange(1000)).diff().le(0).all()                  # SNR decreases with t
    assert s.snr(7).shape == () and s.snr(torch.tensor([[1, 2]])).shape == (1, 2)
    x0, eps = torch.randn(4, 2, 3, 3, dtype=torch.float64), torch.randn(4, 2, 3, 3, dtype=torch.float64)
    xt, v = s.add_noise(x0, eps, t), s.velocity(x0, eps, t)
    assert xt.dtype == torch.float64
    a, sg = abar.double().sqrt().view(-1, 1, 1, 1), (1 - abar.double()).sqrt().view(-1, 1, 1, 1)
    torch.testing.assert_close(a * xt - sg * v, x0)
    torch.testing.assert_close(sg * xt + a * v, eps)


def test_add_noise_any_rank():
    s = NoiseSchedule()
    x = torch.randn(3, 5)
    t = torch.tensor([0, 1, 2])
    out = s.add_noise(x, torch.zeros_like(x), t)
    torch.testing.assert_close(out, s.alphas_cumprod[t].sqrt()[:, None] * x)


def test_config_roundtrip_and_diffusers_kwargs():
    s = NoiseSchedule("scaled_linear", 700, 0.00085, 0.012, rescale_zero_terminal_snr=True)
    cfg = json.loads(json.dumps(s.config))
    assert NoiseSchedule(**cfg).config == s.config
    torch.testing.assert_close(NoiseSchedule(**cfg).betas, s.betas, atol=0, rtol=0)
    kw = s.to_diffusers_kwargs()
    assert kw["beta_schedule"] == "scaled_linear" and kw["rescale_betas_zero_snr"] is True
    assert NoiseSchedule("cosine").to_diffusers_kwargs()["beta_schedule"] == "squaredcos_cap_v2"
    assert len(s) == 700 and "scaled_linear" in repr(s)


def test_sample_timesteps():
    s = NoiseSchedule(num_train_timesteps=50)
    a = s.sample_timesteps(100, torch.Generator().manual_seed(1))
    b = s.sample_timesteps(100, torch.Generator().manual_seed(1))
    assert a.dtype == torch.int64 and a.shape == (100,) and torch.equal(a, b)
    assert 0 <= a.min() and a.max() < 50


@pytest.mark.parametrize("kwargs,match", [
    (dict(kind="sigmoid"), "unknown schedule kind 'sigmoid'; expected one of linear, scaled_linear, cosine"),
    (dict(num_train_timesteps=0), "num_train_timesteps must be an int >= 1; got 0"),
    (dict(num_train_timesteps=10.0), "got 10.0"),
    (dict(beta_start=0.02, beta_end=0.02), "got beta_start=0.02, beta_end=0.02"),
    (dict(beta_start=0.03, beta_end=0.02), "0 <= beta_start < beta_end <= 1"),
    (dict(beta_start=-1e-4), "got beta_start=-0.0001"),
])
def test_bad_constructor_args(kwargs, match):
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(")", r"\)")):
        NoiseSchedule(**kwargs)


def test_bad_add_noise_inputs():
    s, x = NoiseSchedule(), torch.zeros(2, 1, 4, 4)
    with pytest.raises(ValueError, match="integer tensor .* got dtype torch.float32"):
        s.add_noise(x, x, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="got dtype torch.bool"):
        s.add_noise(x, x, torch.tensor([True, False]))
    with pytest.raises(ValueError, match=r"shape \(B,\) = \(2,\); got shape \(3,\)"):
        s.add_noise(x, x, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r"shape \(B,\) = \(2,\); got shape \(2, 1\)"):
        s.velocity(x, x, torch.tensor([[1], [2]]))
    with pytest.raises(ValueError, match=r"\[0, 999\] \(num_train_timesteps=1000\); got values in \[0, 1000\]"):
        s.add_noise(x, x, torch.tensor([0, 1000]))
    with pytest.raises(ValueError, match=r"got values in \[-1, 3\]"):
        s.add_noise(x, x, torch.tensor([-1, 3]))
    with pytest.raises(ValueError, match=r"noise must have the samples' shape \(2, 1, 4, 4\); got \(2, 1, 4, 5\)"):
        s.add_noise(x, torch.zeros(2, 1, 4, 5), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="got int"):
        s.add_noise(x, x, 3)
    with pytest.raises(ValueError, match=r"\[0, 999\]"):
        s.snr(1000)
