"""ldm_course.ddpm: ε / v targets replay the RNG, the callback, overfitting, exact resume, save/load, sampling, bad input."""
import types

import pytest
import torch
import torch.nn.functional as F

from ldm_course.ddpm import (DDPMCallback, ddpm_targets, denoising_path_figure, image_grid, load_ddpm,
                             save_denoising_gif, train_ddpm)
from ldm_course.learner import Learner
from ldm_course.samplers import sample
from ldm_course.schedules import NoiseSchedule
from ldm_course.unet import UNet, unet_config

SCHED = NoiseSchedule("linear")


def _images(n=4, seed=0):
    "Smooth synthetic images (B, 1, 32, 32) in [-1, 1]: blurred random blobs."
    g = torch.Generator().manual_seed(seed)
    x = F.avg_pool2d(torch.randn(n, 1, 32, 32, generator=g), 5, 1, 2) * 3
    return x.clamp(-1, 1)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_targets_replay_the_generator(prediction_type):
    x0 = _images()
    x_t, t, target = ddpm_targets(SCHED, x0, prediction_type, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    t_ref = torch.randint(0, 1000, (4,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    assert t.dtype == torch.int64 and torch.equal(t, t_ref)
    assert x_t.shape == target.shape == x0.shape
    torch.testing.assert_close(x_t, SCHED.add_noise(x0, noise, t_ref))
    ref = noise if prediction_type == "epsilon" else SCHED.velocity(x0, noise, t_ref)
    torch.testing.assert_close(target, ref)


@pytest.mark.parametrize("class_cond", [False, True])
def test_callback_uses_global_rng_in_training(class_cond):
    x0, y = _images(), torch.tensor([0, 1, 2, 3])
    cb = DDPMCallback(SCHED, "v_prediction", class_cond=class_cond)
    cb.learn = types.SimpleNamespace(batch=(x0, y), training=True)
    torch.manual_seed(7)
    cb.before_batch()
    inputs, target = cb.learn.batch
    torch.manual_seed(7)
    t_ref = torch.randint(0, 1000, (4,))
    noise = torch.randn_like(x0)
    assert len(inputs) == (3 if class_cond else 2)
    assert torch.equal(inputs[1], t_ref)
    torch.testing.assert_close(inputs[0], SCHED.add_noise(x0, noise, t_ref))
    torch.testing.assert_close(target, SCHED.velocity(x0, noise, t_ref))
    if class_cond: assert torch.equal(inputs[2], y)


def test_callback_validation_noise_is_fixed_per_epoch():
    x0 = _images()
    cb = DDPMCallback(SCHED)
    cb.learn = types.SimpleNamespace(batch=(x0, None), training=False)
    out = []
    for _ in range(2):
        cb.learn.batch = (x0, None)
        cb.before_epoch(); cb.before_batch()
        out.append(cb.learn.batch)
    assert torch.equal(out[0][1], out[1][1]) and torch.equal(out[0][0][1], out[1][0][1])


def _tiny(seed=0):
    torch.manual_seed(seed)
    return UNet(**unet_config("tiny"))


def test_overfit_a_fixed_batch():
    xb = _images(8)
    model = _tiny()

    def fixed_loss():
        x_t, t, target = ddpm_targets(SCHED, xb, generator=torch.Generator().manual_seed(123))
        with torch.no_grad(): return F.mse_loss(model.eval()(x_t, t), target).item()

    before = fixed_loss()
    torch.manual_seed(0)
    Learner(model, ([(xb, torch.zeros(8))] * 12,), F.mse_loss, lr=3e-3, cbs=[DDPMCallback(SCHED)], cpu=True).fit(1)
    assert fixed_loss() < 0.7 * before


def test_resume_from_checkpoint_is_exact(tmp_path):
    batches = [(_images(4, seed=i), torch.zeros(4)) for i in range(4)]

    def learner():
        return Learner(_tiny(), (batches,), F.mse_loss, lr=1e-3, cbs=[DDPMCallback(SCHED)], cpu=True)

    torch.manual_seed(0)
    full = learner().fit(1)
    torch.manual_seed(0)
    half = learner().fit(1, max_steps=2)
    half.save_checkpoint(tmp_path / "ckpt")
    torch.manual_seed(99)  # a different global RNG state: the checkpoint must restore it
    resumed = learner().fit(1, resume_from=tmp_path / "ckpt")
    for a, b in zip(full.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(a, b)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddpm") / "tiny.safetensors"
    ema, learn, info = train_ddpm("bundled_mnist", "tiny", epochs=1, n_train=64, batch_size=32, max_steps=2,
                                  prediction_type="v_prediction", progress=False, out=out)
    return ema, learn, info, out


def test_train_save_load_round_trip(trained):
    ema, learn, info, out = trained
    assert info["steps"] == learn.step == 2 and info["prediction_type"] == "v_prediction"
    assert {"dataset", "epochs", "seconds", "hardware", "schedule", "command"} <= set(info)
    model, schedule, saved = load_ddpm(out)
    assert schedule.config == SCHED.config
    assert saved["prediction_type"] == "v_prediction" and saved["training"]["steps"] == 2
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([3, 800])
    with torch.no_grad():
        assert torch.equal(model(x, t), ema(x, t))


def test_same_seed_same_samples(trained, tmp_path):
    model = trained[0]
    a = sample(model, SCHED, (2, 1, 32, 32), "ddpm", 5, generator=torch.Generator().manual_seed(0), progress=False)
    b = sample(model, SCHED, (2, 1, 32, 32), "ddpm", 5, generator=torch.Generator().manual_seed(0), progress=False)
    assert torch.equal(a, b)
    g1 = save_denoising_gif(model, SCHED, tmp_path / "a.gif", n=4, steps=4, seed=1, prediction_type="v_prediction")
    g2 = save_denoising_gif(model, SCHED, tmp_path / "b.gif", n=4, steps=4, seed=1, prediction_type="v_prediction")
    assert g1.read_bytes() == g2.read_bytes()
    from PIL import Image
    assert Image.open(g1).n_frames == 5


def test_denoising_path_figure_shape(trained):
    import matplotlib.pyplot as plt
    fig = denoising_path_figure(trained[0], SCHED, n=3, steps=6, n_cols=4, prediction_type="v_prediction")
    assert len(fig.axes) == 3 * 4
    plt.close(fig)


def test_image_grid():
    assert image_grid(torch.zeros(5, 3, 8, 8), nrow=2, pad=1).shape == (3 * 9 + 1, 2 * 9 + 1, 3)


def test_bad_input(tmp_path, trained):
    with pytest.raises(ValueError, match="expected one of epsilon, v_prediction"):
        DDPMCallback(SCHED, "eps")
    with pytest.raises(ValueError, match="expected one of"):
        train_ddpm(prediction_type="x0")
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        ddpm_targets(SCHED, torch.zeros(1, 32, 32))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_ddpm(tmp_path / "missing.safetensors")
    (tmp_path / "w.pt").write_bytes(b"pickle")
    with pytest.raises(ValueError, match="only safetensors"):
        load_ddpm(tmp_path / "w.pt")
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a valid safetensors"):
        load_ddpm(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="must end with .gif"):
        save_denoising_gif(trained[0], SCHED, tmp_path / "x.png")
    cb = DDPMCallback(SCHED, class_cond=True)
    cb.learn = types.SimpleNamespace(batch=(_images(), None), training=True)
    with pytest.raises(ValueError, match="class_cond=True needs integer labels"):
        cb.before_batch()


def test_shipped_model_loads_by_name():
    "The shipped DDPM: found by name, small, a mini UNet with its recipe, FID and sampler table in its JSON."
    from ldm_course.ddpm import SHIPPED_DDPM, weights_dir
    model, schedule, info = load_ddpm()
    assert load_ddpm(SHIPPED_DDPM)[2] == info
    assert schedule.config == SCHED.config and info["prediction_type"] == "epsilon"
    tr = info["training"]
    assert tr["dataset"] == "fashion_mnist" and tr["unet"] == "mini" and tr["n_train"] == 60_000
    total = sum(f.stat().st_size for f in weights_dir().iterdir())
    assert total <= 15 * 2**20, f"shipped weights are {total / 2**20:.1f} MB; the budget is 15 MB"
    assert info["fid"]["sampler"] == "dpmpp_2m" and info["fid"]["n"] >= 500 and info["fid"]["fid"] > 0
    runs = {(r["sampler"], r["steps"]) for r in info["sampler_fid"]["rows"]}
    assert {("ddpm", 1000), ("ddim", 10), ("ddim", 20), ("ddim", 50), ("ddim", 100), ("euler", 10), ("euler", 20),
            ("euler", 50), ("dpmpp_2m", 10), ("dpmpp_2m", 20)} <= runs


def test_unknown_shipped_name():
    with pytest.raises(FileNotFoundError, match="shipped models: .*fmnist_ddpm"):
        load_ddpm("fmnist_dpm")


def test_train_checkpoint_and_resume(tmp_path):
    "`checkpoint` writes a resumable file; `resume=True` continues the same run to the same weights."
    kw = dict(dataset="bundled_mnist", config="tiny", epochs=2, n_train=64, batch_size=32, progress=False)
    ref, _, _ = train_ddpm(**kw)
    ckpt = tmp_path / "ck.safetensors"
    train_ddpm(**kw, max_steps=3, checkpoint=ckpt)
    assert ckpt.exists()
    resumed, learn, info = train_ddpm(**kw, checkpoint=ckpt, resume=True, command="my command")
    assert learn.step == 4 and info["command"] == "my command"
    for a, b in zip(ref.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b)
