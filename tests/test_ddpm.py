"""ldm_course.ddpm: ε / v targets replay the RNG, the callback, overfitting, exact resume, save/load, the ancestral
sampler (equal to `diffusers.DDPMScheduler` and to `samplers.sample(..., 'ddpm')`), GIFs, bad input."""
import re, subprocess, sys, types

import pytest
import torch
import torch.nn.functional as F

from torch import nn

from ldm_course.ddpm import (DDPMCallback, ddpm_recipe, ddpm_sample, ddpm_targets, image_grid, load_ddpm, train_ddpm,
                             write_gif)
from ldm_course.learner import Learner
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
    kw = dict(steps=5, prediction_type="v_prediction", progress=False)
    a = ddpm_sample(model, SCHED, (2, 1, 32, 32), generator=torch.Generator().manual_seed(0), **kw)
    b = ddpm_sample(model, SCHED, (2, 1, 32, 32), generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(a, b)
    gifs = []
    for name in ("a.gif", "b.gif"):
        _, path = ddpm_sample(model, SCHED, (4, 1, 32, 32), generator=torch.Generator().manual_seed(1), return_path=True, **kw)
        gifs.append(write_gif(path["x_t"], tmp_path / name))
    assert gifs[0].read_bytes() == gifs[1].read_bytes()
    from PIL import Image
    assert Image.open(gifs[0]).n_frames == 6


class _Toy(nn.Module):
    "A tiny random stand-in for a UNet: model(x, t[, y]) -> x's shape, depending on x, t (and y)."
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x, t, y=None):
        out = self.conv(x) * 0.5 + (t.float() / 1000).view(-1, 1, 1, 1) * 0.1
        return out if y is None else out + 0.01 * y.float().view(-1, 1, 1, 1)


def _diffusers_ddpm(model, steps, prediction_type, shape=(2, 1, 8, 8), seed=0):
    "diffusers' DDPMScheduler loop: start noise and every step's noise from one generator, as ddpm_sample draws them."
    import diffusers
    sch = diffusers.DDPMScheduler(**SCHED.to_diffusers_kwargs(), clip_sample=False, prediction_type=prediction_type)
    sch.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    with torch.no_grad():
        for t in sch.timesteps:
            x = sch.step(model(x, t.expand(shape[0])), t, x, generator=g).prev_sample
    return x


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [None, 50, 7])
def test_ddpm_sample_equals_diffusers_and_samplers(prediction_type, steps):
    "Bit for bit: the full 1000-step loop (steps=None) and strided ones, against diffusers and notebook 08's sampler."
    from ldm_course.samplers import sample  # a later notebook's module: only the test uses it
    model = _Toy()
    ours = ddpm_sample(model, SCHED, (2, 1, 8, 8), generator=torch.Generator().manual_seed(0), steps=steps,
                       prediction_type=prediction_type, progress=False)
    assert torch.equal(ours, _diffusers_ddpm(model, steps or 1000, prediction_type))
    theirs = sample(model, SCHED, (2, 1, 8, 8), "ddpm", steps or 1000, generator=torch.Generator().manual_seed(0),
                    prediction_type=prediction_type, progress=False)
    assert torch.equal(ours, theirs)


def test_ddpm_sample_path_x_T_cond_and_mode():
    model = _Toy().train()
    g = torch.Generator().manual_seed(3)
    x_T = torch.randn(3, 1, 8, 8, generator=g)
    out, path = ddpm_sample(model, SCHED, generator=g, x_T=x_T, steps=10, return_path=True, progress=True, y=torch.arange(3))
    assert model.training  # the model's mode is restored
    assert path["x_t"].shape == (11, 3, 1, 8, 8) and path["pred_x0"].shape == (10, 3, 1, 8, 8)
    assert path["timesteps"].tolist() == list(range(900, -1, -100))
    assert torch.equal(path["x_t"][0], x_T) and torch.equal(path["x_t"][-1], out)
    assert torch.equal(path["x_t"][-1], path["pred_x0"][-1])  # the last step returns the guess itself, no noise
    # the same x_T through the same generator state gives the same result; the labels reach the model
    g2 = torch.Generator().manual_seed(3); torch.randn(3, 1, 8, 8, generator=g2)
    again = ddpm_sample(model, SCHED, (3, 1, 8, 8), generator=g2, x_T=x_T, steps=10, progress=False, y=torch.arange(3))
    assert torch.equal(again, out)
    g3 = torch.Generator().manual_seed(3); torch.randn(3, 1, 8, 8, generator=g3)
    assert not torch.equal(ddpm_sample(model, SCHED, generator=g3, x_T=x_T, steps=10, progress=False), out)


def test_ddpm_does_not_import_later_modules():
    code = "import sys, ldm_course.ddpm; bad = [m for m in ('ldm_course.samplers', 'ldm_course.metrics', 'ldm_course.cli') if m in sys.modules]; assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_recipe():
    assert ddpm_recipe("ci") == dict(config="tiny", epochs=1, n_train=256, batch_size=32, ema_decay=0.9)
    assert ddpm_recipe("cpu")["config"] == "mini" and ddpm_recipe("gpu")["config"] == "base"
    assert ddpm_recipe() == ddpm_recipe("ci")  # the tests run at ci scale
    with pytest.raises(ValueError, match="expected one of"):
        ddpm_recipe("laptop")


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
        write_gif(torch.zeros(2, 1, 1, 8, 8), tmp_path / "x.png")
    with pytest.raises(ValueError, match="fps must be > 0"):
        write_gif(torch.zeros(2, 1, 1, 8, 8), tmp_path / "x.gif", fps=0)
    with pytest.raises(ValueError, match="no frames"):
        write_gif([], tmp_path / "x.gif")
    cb = DDPMCallback(SCHED, class_cond=True)
    cb.learn = types.SimpleNamespace(batch=(_images(), None), training=True)
    with pytest.raises(ValueError, match="class_cond=True needs integer labels"):
        cb.before_batch()


@pytest.mark.parametrize("kwargs, match", [
    (dict(steps=0), "steps must be"), (dict(steps=1001), "steps must be"), (dict(steps=True), "steps must be"),
    (dict(steps=2.0), "steps must be"), (dict(shape=None), "give the output shape"),
    (dict(x_T=torch.zeros(3, 1, 8, 8)), "x_T has shape"), (dict(shape=(0, 1, 8, 8)), "sizes >= 1"),
    (dict(shape=(4,)), "shape must be"), (dict(prediction_type="sample"), "expected one of epsilon, v_prediction"),
])
def test_ddpm_sample_bad_input(kwargs, match):
    kw = dict(shape=(2, 1, 8, 8), steps=3, progress=False) | kwargs
    with pytest.raises(ValueError, match=match):
        ddpm_sample(_Toy(), SCHED, **kw)


def test_ddpm_sample_checks_the_model_output():
    with pytest.raises(ValueError, match="the model returned shape"):
        ddpm_sample(lambda x, t: x[:, :, :4], SCHED, (2, 1, 8, 8), steps=3, progress=False)


def test_shipped_model_loads_by_name():
    "The shipped DDPM: found by name, small, a mini UNet with its recipe, FID and sampler table in its JSON."
    from ldm_course.ddpm import SHIPPED_DDPM, weights_dir
    model, schedule, info = load_ddpm()
    assert load_ddpm(SHIPPED_DDPM)[2] == info
    assert schedule.config == SCHED.config and info["prediction_type"] == "epsilon"
    tr = info["training"]
    assert tr["dataset"] == "fashion_mnist" and tr["unet"] == "mini" and tr["n_train"] == 60_000
    shipped = [f for f in weights_dir().rglob("*") if f.is_file() and ".ckpt." not in f.name]   # checkpoints are not shipped
    total = sum(f.stat().st_size for f in shipped)
    assert total <= 40 * 2**20, f"shipped weights are {total / 2**20:.1f} MB; the budget is 40 MB"
    vaes = sum(f.stat().st_size for f in shipped if f.stem.endswith("_vae"))
    assert vaes <= 20 * 2**20, f"shipped VAEs are {vaes / 2**20:.1f} MB; their budget is 20 MB"
    assert info["fid"]["sampler"] == "ddpm" and info["fid"]["steps"] == 20 and info["fid"]["n"] >= 500 and info["fid"]["fid"] > 0
    from ldm_course.samplers import DEFAULT_CLIP, DEFAULT_RUNS
    assert info["fid"]["clip_sample"] == DEFAULT_CLIP
    for key, clip in (("sampler_fid", True), ("sampler_fid_unclipped", False)):   # the tables with and without clipping
        rows = info[key]["rows"]
        assert {r["clip_sample"] for r in rows} == {clip} and info[key]["n"] >= 500, key
        runs = {(r["sampler"], r["steps"]) for r in rows}
        assert {("ddim", 20), ("euler", 20), ("dpmpp_2m", 10), ("dpmpp_2m", 20)} <= runs <= set(DEFAULT_RUNS), key
    assert ("ddpm", 1000) in {(r["sampler"], r["steps"]) for r in info["sampler_fid_unclipped"]["rows"]}
    assert ("ddpm", 20) in {(r["sampler"], r["steps"]) for r in info["sampler_fid"]["rows"]}   # the default's row


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
    # the record covers the whole run, not only the part after the resume
    _, _, full = train_ddpm(**kw, command="my command")
    assert [r["epoch"] for r in info["history"]] == [0, 1] and len(info["losses"]) == 4
    assert info["losses"] == full["losses"] and info["history"][0]["train_loss"] == full["history"][0]["train_loss"]
    for a, b in zip(ref.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b)
    # a new run never replaces the checkpoint silently, and resume needs something to resume from
    before = ckpt.read_bytes()
    with pytest.raises(ValueError, match="holds an earlier run"):
        train_ddpm(**kw, checkpoint=ckpt)
    assert ckpt.read_bytes() == before
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        train_ddpm(**kw, checkpoint=tmp_path / "none.safetensors", resume=True)
    with pytest.raises(ValueError, match="n_train was 64, now 32"):   # a resume continues the same run
        train_ddpm(**{**kw, "n_train": 32}, checkpoint=ckpt, resume=True)
    train_ddpm(**kw, max_steps=2, checkpoint=ckpt, overwrite=True)   # one full epoch: a checkpoint at step 2
    assert ckpt.read_bytes() != before


def test_weights_with_nan_are_refused(tmp_path):
    "A diverged model (NaN in a tensor) is an error at load time, not a black image later."
    from ldm_course.ddpm import SHIPPED_DDPM, weights_dir
    from ldm_course.files import load_tensors, save_tensors
    import shutil
    t = load_tensors(weights_dir() / f"{SHIPPED_DDPM}.safetensors")
    k = next(k for k, v in t.items() if v.is_floating_point())
    t[k] = t[k].clone(); t[k].view(-1)[0] = float("nan")
    save_tensors(t, tmp_path / "m.safetensors")
    shutil.copy(weights_dir() / f"{SHIPPED_DDPM}.json", tmp_path / "m.json")
    with pytest.raises(ValueError, match="NaN or infinite values"):
        load_ddpm(tmp_path / "m.safetensors")


def _edit_config(j, **changes):
    import json
    info = json.loads(j.read_text())
    info["config"] = {**info["config"], **changes}
    j.write_text(json.dumps(info))


def _drop_tensors(w, part):
    from ldm_course.files import load_tensors, save_tensors
    save_tensors({k: v for k, v in load_tensors(w).items() if part not in k}, w)


@pytest.mark.parametrize("break_it, expect", [
    (lambda j, w: j.write_text("{not json"), "is not valid JSON"),
    (lambda j, w: j.write_text("[1, 2]"), "holds a JSON list"),
    (lambda j, w: _edit_config(j, wings=2), "unknown UNet argument(s) ['wings']"),
    (lambda j, w: _edit_config(j, attention_levels=[True]), "config does not build a UNet"),
    (lambda j, w: _drop_tensors(w, "conv_in"), "does not fit the UNet"),
])
def test_broken_sidecars_say_which_file(tmp_path, break_it, expect):
    "A broken JSON or weights file beside a DDPM: a ValueError naming the file, never a raw traceback."
    import shutil
    from ldm_course.ddpm import SHIPPED_DDPM, weights_dir
    w, j = tmp_path / "m.safetensors", tmp_path / "m.json"
    shutil.copy(weights_dir() / f"{SHIPPED_DDPM}.safetensors", w); shutil.copy(weights_dir() / f"{SHIPPED_DDPM}.json", j)
    break_it(j, w)
    with pytest.raises(ValueError, match=re.escape(expect)):
        load_ddpm(w)
