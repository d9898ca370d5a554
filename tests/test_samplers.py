"""ldm_course.samplers: every sampling loop equals its diffusers scheduler; single steps; bad input; the toy."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from ldm_course.samplers import (SAMPLERS, GaussianMixture, ddim_step, ddpm_step, diffusers_sample, dpm_solver_timesteps,
                                 karras_sigmas, sample, spaced_timesteps)
from ldm_course.schedules import NoiseSchedule

SCHEDULES = {
    "linear": lambda: NoiseSchedule("linear"),
    "cosine": lambda: NoiseSchedule("cosine"),
    "scaled_linear": lambda: NoiseSchedule("scaled_linear", 1000, 0.00085, 0.012),
}
PIXELS = GaussianMixture([[-0.6], [0.6]], std=0.25)      # every pixel an independent draw: a realistic exact denoiser
SHAPE = (2, 1, 6, 6)


def _both(schedule, sampler, steps, eta=0.0, prediction_type="epsilon", spacing=None, seed=0, model=None):
    model = model or PIXELS.denoiser(schedule, prediction_type)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))
    ours = sample(model, schedule, SHAPE, sampler, steps, eta=eta, x_T=x_T, generator=torch.Generator().manual_seed(1),
                  progress=False, prediction_type=prediction_type, timestep_spacing=spacing)
    ref = diffusers_sample(model, schedule, x_T, sampler, steps, eta=eta, generator=torch.Generator().manual_seed(1),
                           prediction_type=prediction_type, timestep_spacing=spacing)
    return ours, ref


@pytest.mark.parametrize("schedule", ["linear", "cosine", "scaled_linear"])
@pytest.mark.parametrize("steps", [1, 3, 10, 30])
@pytest.mark.parametrize("sampler,eta", [("ddim", 0.0), ("euler", 0.0), ("dpmpp_2m", 0.0), ("ddpm", 0.0), ("ddim", 0.7)])
def test_loop_equals_diffusers(schedule, steps, sampler, eta):
    ours, ref = _both(SCHEDULES[schedule](), sampler, steps, eta)
    assert ours.shape == SHAPE and ours.dtype == torch.float32 and torch.isfinite(ours).all()
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
def test_spacings_and_v_prediction_equal_diffusers(sampler, spacing):
    ours, ref = _both(NoiseSchedule("linear"), sampler, 8, prediction_type="v_prediction", spacing=spacing)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_zero_terminal_snr_equals_diffusers(sampler):
    s = NoiseSchedule("scaled_linear", 1000, 0.00085, 0.012, rescale_zero_terminal_snr=True)
    ours, ref = _both(s, sampler, 10, prediction_type="v_prediction", spacing="trailing")
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


def test_short_schedule_equals_diffusers():
    s = NoiseSchedule("linear", 100, 1e-3, 0.05)
    for sampler in SAMPLERS:
        ours, ref = _both(s, sampler, 17)
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("t,prev_t", [(999, None), (500, None), (1, None), (0, None), (600, 400), (20, -1)])
def test_ddpm_step_equals_diffusers(prediction_type, clip, t, prev_t):
    from diffusers import DDPMScheduler
    s = NoiseSchedule("linear")
    g = torch.Generator().manual_seed(t)
    x, out = torch.randn(3, 2, 5, 5, generator=g), torch.randn(3, 2, 5, 5, generator=g)
    ref = DDPMScheduler(**s.to_diffusers_kwargs(), clip_sample=clip, prediction_type=prediction_type)
    if prev_t is not None:  # a shortened chain: diffusers takes prev_t from its timestep list
        ref.set_timesteps(timesteps=[t, prev_t] if prev_t >= 0 else [t])
    ours = ddpm_step(s, out, t, x, prev_t, generator=torch.Generator().manual_seed(5), prediction_type=prediction_type,
                     clip_sample=clip)
    theirs = ref.step(out, t, x, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(ours[0], theirs.prev_sample, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours[1], theirs.pred_original_sample, atol=1e-5, rtol=0)


def test_ddpm_step_noise_argument():
    s = NoiseSchedule()
    x, out = torch.randn(2, 3), torch.randn(2, 3)
    z = torch.randn(2, 3, generator=torch.Generator().manual_seed(3))
    a = ddpm_step(s, out, 10, x, noise=z)[0]
    b = ddpm_step(s, out, 10, x, generator=torch.Generator().manual_seed(3))[0]
    assert torch.equal(a, b)
    assert torch.equal(ddpm_step(s, out, 0, x, noise=z)[0], ddpm_step(s, out, 0, x)[0])   # no noise at t = 0


def test_ddim_step_equals_diffusers_with_variance_noise():
    from diffusers import DDIMScheduler
    s = NoiseSchedule("cosine")
    ref = DDIMScheduler(**s.to_diffusers_kwargs(), clip_sample=False)
    ref.set_timesteps(20)
    x, out, z = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4)
    for t in (950, 500, 0):
        ours = ddim_step(s, out, t, x, max(t - 50, -1), eta=0.5, noise=z)
        theirs = ref.step(out, t, x, eta=0.5, variance_noise=z)
        torch.testing.assert_close(ours[0], theirs.prev_sample, atol=1e-5, rtol=0)


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("steps", [1, 7, 50, 999])
def test_schedules_equal_diffusers(spacing, steps):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler
    s = NoiseSchedule("scaled_linear", 1000, 0.00085, 0.012)
    ref = DDIMScheduler(**s.to_diffusers_kwargs(), timestep_spacing=spacing)
    ref.set_timesteps(steps)
    np.testing.assert_array_equal(spaced_timesteps(1000, steps, spacing), ref.timesteps.numpy())
    ref = EulerDiscreteScheduler(**s.to_diffusers_kwargs(), use_karras_sigmas=True, timestep_spacing=spacing)
    ref.set_timesteps(steps)
    sig, ts = karras_sigmas(s, steps, spacing)
    torch.testing.assert_close(sig, ref.sigmas, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(ts, ref.timesteps, atol=1e-3, rtol=0)
    if steps < 999:  # diffusers' DPM-Solver needs distinct timesteps
        ref = DPMSolverMultistepScheduler(**s.to_diffusers_kwargs(), timestep_spacing=spacing)
        ref.set_timesteps(steps)
        ts, sig = dpm_solver_timesteps(s, steps, spacing)
        np.testing.assert_array_equal(ts.numpy(), ref.timesteps.numpy())
        torch.testing.assert_close(sig, ref.sigmas, atol=1e-5, rtol=1e-5)


class _Net(nn.Module):
    "A model with parameters, dropout (to see eval mode) and a conditioning keyword."
    def __init__(self):
        super().__init__()
        self.conv, self.drop = nn.Conv2d(1, 1, 3, padding=1), nn.Dropout(0.5)

    def forward(self, x, t, scale=1.0):
        assert t.shape == (x.shape[0],)
        return scale * self.drop(self.conv(x)) * 0.1


def test_sample_module_cond_seed_and_intermediates():
    torch.manual_seed(0)
    net, s = _Net().train(), NoiseSchedule()
    g = lambda: torch.Generator().manual_seed(0)
    a = sample(net, s, SHAPE, "ddim", 5, generator=g(), progress=False, scale=2.0)
    b = sample(net, s, SHAPE, "ddim", 5, generator=g(), progress=False, scale=2.0)
    c = sample(net, s, SHAPE, "ddim", 5, generator=g(), progress=False)
    assert torch.equal(a, b) and not torch.equal(a, c)     # same seed repeats (dropout off), cond reaches the model
    assert net.training                                     # train mode restored
    for sampler in SAMPLERS:
        x, inter = sample(net, s, SHAPE, sampler, 4, generator=g(), progress=False, return_intermediates=True)
        assert inter["x_t"].shape == (5, *SHAPE) and inter["pred_x0"].shape == (4, *SHAPE)
        assert inter["timesteps"].shape == (4,) and torch.equal(inter["x_t"][-1], x)


def test_timestep_dtypes_passed_to_model():
    seen = {}

    def model(x, t):
        seen.setdefault(t.dtype, []).append(t)
        assert t.shape == (x.shape[0],)
        return torch.zeros_like(x)

    s = NoiseSchedule()
    for sampler in SAMPLERS:
        seen.clear()
        sample(model, s, SHAPE, sampler, 3, generator=torch.Generator().manual_seed(0), progress=False)
        assert set(seen) == {torch.float32 if sampler == "euler" else torch.int64}, sampler


def test_progress_bar_runs():
    s = NoiseSchedule()
    x = sample(PIXELS.denoiser(s), s, SHAPE, "dpmpp_2m", 3, generator=torch.Generator().manual_seed(0), progress=True)
    assert x.shape == SHAPE


def test_bad_input():
    s, m = NoiseSchedule(), PIXELS.denoiser(NoiseSchedule())
    with pytest.raises(ValueError, match="unknown sampler 'heun'; expected one of ddpm, ddim, euler, dpmpp_2m"):
        sample(m, s, SHAPE, "heun")
    with pytest.raises(ValueError, match=r"steps must be an int in \[1, num_train_timesteps=1000\]; got 0"):
        sample(m, s, SHAPE, "ddim", 0)
    with pytest.raises(ValueError, match="got 1001"):
        sample(m, s, SHAPE, "ddim", 1001)
    with pytest.raises(ValueError, match="got 2.5"):
        sample(m, s, SHAPE, "ddim", 2.5)
    with pytest.raises(ValueError, match=r"x_T has shape \(2, 1, 6, 7\); expected shape \(2, 1, 6, 6\)"):
        sample(m, s, SHAPE, "ddim", 3, x_T=torch.zeros(2, 1, 6, 7))
    with pytest.raises(ValueError, match="shape .* or the start noise x_T"):
        sample(m, s, None, "ddim", 3)
    with pytest.raises(ValueError, match="only used by sampler='ddim'"):
        sample(m, s, SHAPE, "dpmpp_2m", 3, eta=1.0)
    with pytest.raises(ValueError, match=r"eta must lie in \[0, 1\]"):
        sample(m, s, SHAPE, "ddim", 3, eta=-1.0)
    with pytest.raises(ValueError, match="unknown prediction_type 'sample'"):
        sample(m, s, SHAPE, "ddim", 3, prediction_type="sample")
    with pytest.raises(ValueError, match="unknown timestep_spacing 'even'"):
        sample(m, s, SHAPE, "euler", 3, timestep_spacing="even")
    with pytest.raises(ValueError, match=r"the model returned shape \(2, 2, 6, 6\)"):
        sample(lambda x, t: torch.cat([x, x], 1), s, SHAPE, "ddim", 3, progress=False)
    with pytest.raises(ValueError, match=r"got prev_t=5"):
        ddpm_step(s, torch.zeros(2), 5, torch.zeros(2), prev_t=5)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 999\]; got t=-1"):
        ddim_step(s, torch.zeros(2), -1, torch.zeros(2), prev_t=-1)
    with pytest.raises(ValueError, match=r"noise has shape \(3,\)"):
        ddpm_step(s, torch.zeros(2), 5, torch.zeros(2), noise=torch.zeros(3))
    with pytest.raises(ValueError, match="dpmpp_2m with steps=1000 and timestep_spacing='linspace' repeats timesteps"):
        sample(m, s, SHAPE, "dpmpp_2m", 1000, progress=False)
    with pytest.raises(ValueError, match="means must have shape"):
        GaussianMixture([0.0, 1.0], std=0.1)


def test_toy_distribution_is_reproduced():
    "Exact denoiser for an 8-mode mixture: samplers reproduce the mode weights (not a diffusers test: the maths)."
    ang = torch.arange(8) * 2 * math.pi / 8
    gm = GaussianMixture(torch.stack([0.8 * ang.cos(), 0.8 * ang.sin()], 1), std=0.1, weights=[4, 1, 2, 1, 4, 1, 2, 1])
    s = NoiseSchedule("linear")
    for sampler, steps in (("ddpm", 200), ("ddim", 50), ("euler", 50), ("dpmpp_2m", 25)):
        x = sample(gm.denoiser(s), s, (1500, 2), sampler, steps, generator=torch.Generator().manual_seed(0), progress=False)
        frac = torch.bincount(torch.cdist(x.double(), gm.means).argmin(1), minlength=8).double() / len(x)
        torch.testing.assert_close(frac, gm.weights, atol=0.04, rtol=0)


def test_compare_samplers_rows_nfe_and_determinism():
    from ldm_course.samplers import compare_samplers, plot_quality, quality_table
    gm = GaussianMixture([[-0.6], [0.6]], std=0.25)
    model, sch = gm.denoiser(NoiseSchedule("linear")), NoiseSchedule("linear")
    score = lambda x: {"fid": float(x.abs().mean()), "sum": float(x.sum())}
    runs = [("ddpm", 7), ("ddim", 5), ("euler", 4), ("dpmpp_2m", 3)]
    rows = compare_samplers(model, sch, runs, 10, score, image_shape=(1, 4, 4), batch_size=4, progress=False)
    assert [(r["sampler"], r["steps"], r["nfe"], r["n"]) for r in rows] == [(s, k, k, 10) for s, k in runs]
    again = compare_samplers(model, sch, runs, 10, score, image_shape=(1, 4, 4), batch_size=4, progress=False)
    assert [r["sum"] for r in rows] == [r["sum"] for r in again]
    # the same start noise as `sample` with x_T drawn from the seed (one batch = one call)
    x_T = torch.randn((10, 1, 4, 4), generator=torch.Generator().manual_seed(0))
    ddim = sample(model, sch, None, "ddim", 5, x_T=x_T, progress=False).clamp(-1, 1)
    one = compare_samplers(model, sch, [("ddim", 5)], 10, lambda x: {"x": x}, image_shape=(1, 4, 4), progress=False)
    torch.testing.assert_close(one[0]["x"], ddim)
    table = quality_table(rows, {"fid": 0.1, "n": 10})
    assert table.count("\n") == 2 + len(runs) and "real vs real" in table
    import matplotlib.pyplot as plt
    plt.close(plot_quality(rows, {"fid": 0.1}))


@pytest.mark.parametrize("runs, n, msg", [([("heun", 5)], 8, "expected one of"), ([("ddim", 0)], 8, "got 0"),
                                          ([("ddim", 1001)], 8, "got 1001"), ([], 8, "runs is empty"),
                                          ([("ddim", 5)], 1, "n must be an int ≥ 2")])
def test_compare_samplers_bad_input(runs, n, msg):
    from ldm_course.samplers import compare_samplers
    calls = []
    with pytest.raises(ValueError, match=msg.replace("(", r"\(")):
        compare_samplers(lambda x, t: calls.append(1) or x, NoiseSchedule("linear"), runs, n, lambda x: {}, progress=False)
    assert not calls  # checked before any sampling


# clipping x̂0 to [-1, 1]: a mixture at ±0.95 with wide components, whose exact x̂0 often leaves [-1, 1]
WIDE = GaussianMixture([[-0.95], [0.95]], std=0.4)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [1, 5, 20])
@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 1.0), ("dpmpp_2m", 0.0)])
def test_clip_sample_equals_diffusers(sampler, eta, steps, prediction_type):
    "clip_sample=True equals DDPM/DDIM's clip_sample=True and DPM-Solver's thresholding (sample_max_value=1)."
    schedule = NoiseSchedule("linear")
    model = WIDE.denoiser(schedule, prediction_type)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    kw = dict(eta=eta, generator=torch.Generator().manual_seed(1), prediction_type=prediction_type)
    ours = sample(model, schedule, SHAPE, sampler, steps, x_T=x_T, progress=False, clip_sample=True, **kw)
    kw["generator"] = torch.Generator().manual_seed(1)
    ref = diffusers_sample(model, schedule, x_T, sampler, steps, clip_sample=True, **kw)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
    kw["generator"] = torch.Generator().manual_seed(1)
    unclipped = sample(model, schedule, SHAPE, sampler, steps, x_T=x_T, progress=False, **kw)
    if steps > 1:  # (one step from pure noise guesses the mean, which is in range)
        assert (unclipped - ours).abs().max() > 1e-3   # the test data does exercise the clamp


def test_clip_sample_keeps_every_guess_in_range():
    schedule = NoiseSchedule("linear")
    for sampler in SAMPLERS:
        _, inter = sample(WIDE.denoiser(schedule), schedule, SHAPE, sampler, 10, generator=torch.Generator().manual_seed(0),
                          progress=False, clip_sample=True, return_intermediates=True)
        assert inter["pred_x0"].abs().max() <= 1.0, sampler
        _, raw = sample(WIDE.denoiser(schedule), schedule, SHAPE, sampler, 10, generator=torch.Generator().manual_seed(0),
                        progress=False, return_intermediates=True)
        assert raw["pred_x0"].abs().max() > 1.0, sampler


def test_diffusers_euler_has_no_clip():
    with pytest.raises(ValueError, match="EulerDiscreteScheduler has no"):
        diffusers_sample(PIXELS.denoiser(NoiseSchedule("linear")), NoiseSchedule("linear"), torch.zeros(SHAPE), "euler", 5,
                         clip_sample=True)


@pytest.mark.parametrize("eta", [1.5, float("nan"), float("inf"), -0.1])
def test_eta_out_of_range_raises(eta):
    with pytest.raises(ValueError, match=r"eta must lie in \[0, 1\]"):
        sample(PIXELS.denoiser(NoiseSchedule("linear")), NoiseSchedule("linear"), SHAPE, "ddim", 5, eta=eta, progress=False)


def test_non_finite_start_noise_raises():
    x_T = torch.zeros(SHAPE); x_T[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="x_T contains NaN"):
        sample(PIXELS.denoiser(NoiseSchedule("linear")), NoiseSchedule("linear"), None, "ddim", 5, x_T=x_T, progress=False)
