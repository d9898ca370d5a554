"""Latent diffusion (notebook 11): the latent cache, the scale factor, LatentDiffusion, training, saving, CLI."""
import copy, json, subprocess, sys, warnings
from pathlib import Path

import pytest
import torch

from ldm_course.data import load_dataset, to_float
from ldm_course.latent import (LatentDataset, LatentDiffusion, encode_dataset, generate_latent, latent_scale_factor,
                               load_latent, renoise, train_latent, vae_fingerprint)
from ldm_course.unet import UNet, unet_config
from ldm_course.vae import VAE, load_vae

CLI = str(Path(sys.executable).with_name("ldm-course"))


@pytest.fixture(scope="module")
def vae():
    return load_vae()


@pytest.fixture(scope="module")
def small():
    return load_dataset(split="test").subset(48, seed=3)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    "A tiny latent model trained for a few steps on 64 images, saved once."
    out = tmp_path_factory.mktemp("latent") / "m.safetensors"
    model, learn, info = train_latent(config="tiny", epochs=1, n_train=64, batch_size=16, cache=False, progress=False, out=out)
    return model, info, out


def _tiny(vae, **kw):
    return LatentDiffusion(vae, UNet(**unet_config("tiny", in_channels=4, out_channels=4)), **kw)


def test_cache_is_reused_and_rebuilt_when_the_vae_or_images_change(vae, small, tmp_path):
    path = tmp_path / "c.safetensors"
    a = encode_dataset(vae, small, cache=path, progress=False)
    assert a.shape == (4, 8, 8) and len(a) == 48 and path.is_file() and path.with_suffix(".json").is_file()
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # the same VAE and images: read back, no warning
        b = encode_dataset(vae, small, cache=path, progress=False)
    assert torch.equal(a.mean, b.mean) and torch.equal(a.logvar, b.logvar) and torch.equal(a.labels, b.labels)
    other = copy.deepcopy(vae)
    with torch.no_grad(): other.decoder.conv_out.bias += 1e-3
    with pytest.warns(UserWarning, match="another VAE"):
        encode_dataset(other, small, cache=path, progress=False)
    assert json.loads(path.with_suffix(".json").read_text())["vae"] == vae_fingerprint(other)   # rebuilt for the new VAE
    with pytest.warns(UserWarning, match="other images"):
        encode_dataset(other, load_dataset(split="test").subset(48, seed=4), cache=path, progress=False)
    path.write_bytes(b"not safetensors")
    path.with_suffix(".json").unlink()
    with pytest.warns(UserWarning, match="rebuilding"):
        encode_dataset(vae, small, cache=path, progress=False)


def test_cache_matches_direct_encoding(vae, small):
    lat = encode_dataset(vae, small, cache=False, progress=False)
    with torch.no_grad(): post = vae.encode(to_float(small.images))
    torch.testing.assert_close(lat.mean, post.mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lat.logvar, post.logvar, atol=1e-5, rtol=1e-5)


def test_encode_refuses_images_the_vae_cannot_take(vae):
    rgb = load_dataset("bundled_mnist", split="test").subset(4)
    rgb.images = rgb.images.repeat(1, 3, 1, 1)
    with pytest.raises(ValueError, match="1-channel images"):
        encode_dataset(vae, rgb, cache=False, progress=False)


def test_latent_dataset_items(vae, small):
    lat = encode_dataset(vae, small, cache=False, progress=False)
    lat.scale_factor, lat.sample = 0.5, False
    z, y = lat[torch.arange(5)]
    assert torch.equal(z, lat.mean[:5] * 0.5) and torch.equal(y, small.labels[:5])
    lat.sample = True
    torch.manual_seed(0); z1, _ = lat[torch.arange(5)]
    torch.manual_seed(0); z2, _ = lat[torch.arange(5)]
    assert torch.equal(z1, z2) and not torch.equal(z1, z) and lat.__getitems__([0, 1])[0].shape == (2, 4, 8, 8)
    with pytest.raises(ValueError, match=r"\(N, c, h, w\)"):
        LatentDataset(torch.zeros(3, 4), torch.zeros(3, 4))


def test_scale_factor():
    assert latent_scale_factor(2 * torch.randn(100_000, generator=torch.Generator().manual_seed(0))) == pytest.approx(0.5, rel=0.01)
    with pytest.raises(ValueError, match="finite number > 0"):
        latent_scale_factor(torch.ones(10))
    with pytest.raises(ValueError, match="finite number > 0"):
        latent_scale_factor(torch.full((10,), float("nan")))


def test_bad_models_and_latents_are_refused_with_both_values(vae):
    with pytest.raises(ValueError, match="latents have 4 channels but the UNet takes 1 and returns 1"):
        LatentDiffusion(vae, UNet(**unet_config("tiny")))
    with pytest.raises(ValueError, match="multiple of the VAE's factor 4"):
        _tiny(vae, image_size=30)
    with pytest.raises(ValueError, match="scale_factor"):
        _tiny(vae, scale_factor=0.0)
    with pytest.raises(ValueError, match=r"expected scaled latents of shape \(B, 4, 8, 8\); got \(2, 3, 8, 8\)"):
        _tiny(vae).decode(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"x_T must be start noise of shape \(n, 4, 8, 8\); got \(2, 4, 4, 4\)"):
        _tiny(vae).sample(2, steps=2, x_T=torch.zeros(2, 4, 4, 4), progress=False)


def test_sample_is_seeded_and_in_range(trained):
    model, _, _ = trained
    a = model.sample(3, "ddim", 4, generator=torch.Generator().manual_seed(5), progress=False)
    b = model.sample(3, "ddim", 4, generator=torch.Generator().manual_seed(5), progress=False)
    assert a.shape == (3, 1, 32, 32) and torch.equal(a, b) and a.min() >= -1 and a.max() <= 1
    imgs, inter = model.sample(2, "ddpm", 3, generator=torch.Generator().manual_seed(0), progress=False, return_intermediates=True)
    assert inter["x_t"].shape == (4, 2, 4, 8, 8) and inter["pred_x0"].shape == (3, 2, 4, 8, 8)


def test_train_records_and_saves(trained):
    model, info, out = trained
    assert info["vae"] == "fmnist_vae" and info["latent_shape"] == [4, 8, 8] and info["steps"] == 4
    assert 0.1 < info["scale_factor"] < 10 and model.scale_factor == info["scale_factor"]
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["class"] == "LatentDiffusion" and meta["config"]["vae_name"] == "fmnist_vae" and meta["config"]["vae"] is None
    back = LatentDiffusion.from_pretrained(out)
    assert back.info["training"]["steps"] == 4 and back.scale_factor == model.scale_factor
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    torch.testing.assert_close(back(x, t), model(x, t), atol=2e-2, rtol=2e-2)   # float16 weights in the file


def test_round_trip_exact_and_with_an_embedded_vae(vae, tmp_path):
    own = VAE(channels=(8, 16), layers_per_level=1, norm_groups=4)    # not shipped: saved inside the file
    m = LatentDiffusion(own, UNet(**unet_config("tiny", in_channels=4, out_channels=4)), scale_factor=0.7, image_size=16)
    back = load_latent(m.save_pretrained(tmp_path / "own.safetensors", half=False))
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([3, 500])
    assert torch.equal(back(x, t), m(x, t)) and back.vae_name is None and back.latent_shape == (4, 8, 8)
    assert torch.equal(back.decode(x), m.decode(x))


def test_a_changed_shipped_vae_is_refused(trained, tmp_path):
    _, _, out = trained
    meta = json.loads(out.with_suffix(".json").read_text())
    meta["config"]["vae_fingerprint"] = "0" * 16
    (tmp_path / "m.safetensors").write_bytes(out.read_bytes())
    (tmp_path / "m.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="its latents differ"):
        load_latent(tmp_path / "m.safetensors")


def test_loading_the_wrong_thing(tmp_path):
    with pytest.raises(FileNotFoundError, match="shipped"):
        load_latent("no_such_model")
    with pytest.raises(ValueError, match="expected a LatentDiffusion"):
        load_latent("fmnist_ddpm")


def test_renoise(trained, small):
    model, _, _ = trained
    x = to_float(small.images[:3])
    assert torch.equal(renoise(model, x, 0), model.decode(model.encode(x)))
    y = renoise(model, x, 600, steps=3, generator=torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1
    with pytest.raises(ValueError, match=r"t must be an int in \[0, 1000\)"):
        renoise(model, x, 1000)


def test_generate_latent_writes_files(trained, tmp_path):
    _, _, out = trained
    res = generate_latent(out, steps=3, n=5, out=tmp_path, batch_size=4)
    assert Path(res["samples"]).is_file() and Path(res["gif"]).is_file() and sum(res["classes"].values()) == 5


def test_cli_generate_and_errors(trained, tmp_path):
    _, _, out = trained
    ok = subprocess.run([CLI, "generate", "--weights", str(out), "--n", "4", "--steps", "3", "--out", str(tmp_path)],
                        capture_output=True, text=True, timeout=600)
    assert ok.returncode == 0, ok.stderr
    res = json.loads(ok.stdout[ok.stdout.rindex("\n{") + 1 if not ok.stdout.startswith("{") else 0:])
    assert res["sampler"] == "ddpm" and res["steps"] == 3 and (tmp_path / "samples.png").is_file()
    for args, msg in [(["bench", "latent", "--n", "1"], "--n must be ≥ 2"), (["bench", "latent", "--seconds", "0"], "--seconds must be ≥ 1")]:
        bad = subprocess.run([CLI, *args], capture_output=True, text=True, timeout=600)
        assert bad.returncode == 2 and msg in bad.stderr and "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_shipped_latent_model_and_bench_record():
    "fmnist_latent: found by name, trained on fmnist_vae's latents of all 60,000 images, its FID in its JSON; the bench record."
    from ldm_course.latent import load_bench
    m = load_latent()
    tr = m.info["training"]
    assert m.vae_name == "fmnist_vae" and tr["dataset"] == "fashion_mnist" and tr["n_train"] == 60_000 and tr["scale"] == "cpu"
    assert m.latent_shape == (4, 8, 8) and m.info["fid"]["n"] >= 500 and m.info["fid"]["fid"] > 0
    x = m.sample(2, steps=3, generator=torch.Generator().manual_seed(0), progress=False)
    assert x.shape == (2, 1, 32, 32)
    bench = load_bench()
    assert [r["model"] for r in bench["rows"]] == ["pixel", "latent"] and bench["scale"] == "cpu"
    assert bench["grids"].shape == (2, 16, 1, 32, 32) and all(r["fid"] > 0 and r["n"] == bench["n"] for r in bench["rows"])
