"""The ResNet-diffusion VAE (notebook 14): image input and its bad forms, encoders by name, shapes, saving and
loading, classifier-free guidance, interpolation, seeds, the diffusers decoder (a tiny random config), pixel space,
evaluation, and `ldm-course generate --from-image`. Offline: the course classifier as the encoder."""
import contextlib, io, json

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_course.cli import main, run
from ldm_course.data import load_dataset, to_float
from ldm_course.resnet_decoder import (IMAGE_ENCODERS, ContextAdapter, DiffusersDecoder, ImageEncoder, ResNetConditionCB,
                                       ResNetDiffusionVAE, comparison_table, evaluate_resnet_decoder, generate_from_resnet,
                                       interpolate, laplacian_sharpness, load_image, load_image_encoder,
                                       load_resnet_decoder, match_channels, pairwise_distance, resnet_guidance_sweep,
                                       sample_prior, tiny_diffusers_config, train_resnet_decoder, write_decodings)
from ldm_course.unet import UNet, unet_config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    "A tiny latent-space model trained for a few steps on 64 images, saved once: (model, path)."
    out = tmp_path_factory.mktemp("rd") / "tiny.safetensors"
    model, _, info = train_resnet_decoder(config="tiny", epochs=1, n_train=64, batch_size=16, cache=False, progress=False,
                                          z_dim=16, out=out)
    return model, out


@pytest.fixture(scope="module")
def images():
    return to_float(load_dataset(None, "test").images[:3])


# ---- images in, and their bad forms ---------------------------------------------------------------------------

def test_load_image_paths_pil_and_tensors(tmp_path):
    a = (np.arange(32 * 32) % 256).astype(np.uint8).reshape(32, 32)
    Image.fromarray(a).save(tmp_path / "grey.png")
    x = load_image(tmp_path / "grey.png")
    assert x.shape == (1, 1, 32, 32) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1
    assert torch.equal(x, load_image(Image.fromarray(a))) and torch.equal(x, load_image(torch.from_numpy(a)))
    rgb = np.stack([a, a, a], -1)
    Image.fromarray(rgb).save(tmp_path / "rgb.jpg", quality=100)
    assert load_image(tmp_path / "rgb.jpg").shape == (1, 1, 32, 32)            # RGB → grey
    assert load_image(tmp_path / "grey.png", channels=3).shape == (1, 3, 32, 32)   # grey → RGB
    assert torch.allclose(load_image(Image.fromarray(rgb)), x, atol=1 / 127)
    rgba = np.concatenate([rgb, np.zeros((32, 32, 1), np.uint8)], -1)           # fully transparent: black
    assert torch.equal(load_image(Image.fromarray(rgba)), torch.full((1, 1, 32, 32), -1.0))
    assert load_image(torch.zeros(28, 28, dtype=torch.uint8)).shape == (1, 1, 32, 32)   # Fashion-MNIST's size, padded
    assert load_image(torch.zeros(1, 1, 64, 48), resize=True).shape == (1, 1, 32, 32)
    assert torch.equal(load_image(x), x)


def test_bad_images_say_what_was_expected(tmp_path):
    (tmp_path / "notes.png").write_text("this is not an image")
    with pytest.raises(ValueError, match="not an image file.*PNG, JPEG"): load_image(tmp_path / "notes.png")
    with pytest.raises(FileNotFoundError, match="does not exist"): load_image(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="is a folder"): load_image(tmp_path)
    with pytest.raises(ValueError, match="path is empty"): load_image("")
    with pytest.raises(ValueError, match="is 40×40 pixels; this model takes 32×32"): load_image(torch.zeros(1, 40, 40))
    with pytest.raises(ValueError, match="1 \\(grey\\).*3 \\(RGB\\).*got 5"): load_image(torch.zeros(5, 32, 32))
    with pytest.raises(ValueError, match="got a batch of 2"): load_image(torch.zeros(2, 1, 32, 32))
    with pytest.raises(ValueError, match="must lie in \\[-1, 1\\]"): load_image(torch.full((1, 32, 32), 3.0))
    with pytest.raises(ValueError, match="NaN"): load_image(torch.full((1, 32, 32), float("nan")))
    with pytest.raises(ValueError, match="PIL mode 'F'"): load_image(Image.new("F", (32, 32)))
    with pytest.raises(TypeError, match="a path, a PIL image or a tensor"): load_image([[0.0]])
    with pytest.raises(ValueError, match="cannot convert 2-channel"): match_channels(torch.zeros(1, 2, 4, 4), 3)


def test_encoders_by_name_and_unknown_names():
    with pytest.raises(ValueError, match="unknown image encoder 'vgg16'.*'course'.*'resnet18'"): load_image_encoder("vgg16")
    with pytest.raises(ValueError, match="unknown image encoder"): train_resnet_decoder(encoder="resnet101")
    course = load_image_encoder("course")
    assert course.feature_dim == 128 and course(torch.zeros(2, 1, 32, 32)).shape == (2, 128)
    assert course(torch.zeros(2, 3, 32, 32)).shape == (2, 128)                 # RGB in: its luminance
    r18 = load_image_encoder("resnet18", pretrained=False)                     # the architecture, without a download
    assert r18.feature_dim == 512 and r18(torch.zeros(2, 1, 32, 32)).shape == (2, 512)   # grey in: repeated to RGB
    assert set(IMAGE_ENCODERS) == {"course", "resnet18", "resnet34", "resnet50"}


# ---- the model ----------------------------------------------------------------------------------------------------

def test_shapes_kl_and_null_context(tiny, images):
    model, _ = tiny
    mu, logvar = model.encode(images)
    assert mu.shape == logvar.shape == (3, 16) and model.context(mu).shape == (3, 4, model.context_dim)
    x_t, t = torch.randn(3, *model.decoder_shape), torch.tensor([1, 500, 999])
    with torch.no_grad():
        out = model(x_t, t, images, torch.tensor([False, True, False]))
    assert out.shape == x_t.shape and model.kl.ndim == 0 and model.kl >= 0
    assert model.space == "latent" and model.decoder_shape == (4, 8, 8) and model.image_shape == (1, 32, 32)
    with pytest.raises(ValueError, match=r"expected images \(B, 1, 32, 32\)"): model.encode(torch.zeros(1, 1, 28, 28))
    with pytest.raises(ValueError, match=r"z must be \(B, 16\)"): model.decode(torch.zeros(2, 8))


def test_bad_model_arguments():
    enc = load_image_encoder("course", pretrained=False)
    plain = UNet(**unet_config("tiny", in_channels=1, out_channels=1))
    with pytest.raises(ValueError, match="must read a context"): ResNetDiffusionVAE(enc, plain)
    dec = UNet(**unet_config("tiny", in_channels=4, out_channels=4, context_dim=32))
    with pytest.raises(ValueError, match="in_channels = out_channels = 1"): ResNetDiffusionVAE(enc, dec)
    dec1 = UNet(**unet_config("tiny", context_dim=32))
    with pytest.raises(ValueError, match="z_dim must be an int"): ResNetDiffusionVAE(enc, dec1, z_dim=0)
    with pytest.raises(ValueError, match="p_uncond"): ResNetDiffusionVAE(enc, dec1, p_uncond=1.0)
    with pytest.raises(ValueError, match="beta must be"): ResNetConditionCB(torch.zeros(1), torch.zeros(1), beta=-1)
    with pytest.raises(ValueError, match="space must be one of"): train_resnet_decoder(space="latents")
    assert ContextAdapter(8, 3, 16)(torch.zeros(2, 8)).shape == (2, 3, 16)


def test_save_load_round_trip(tiny, images, tmp_path):
    model, path = tiny
    a, b = load_resnet_decoder(path), load_resnet_decoder(path)
    assert torch.equal(a.encode(images)[0], b.encode(images)[0])
    assert torch.allclose(a.encode(images)[0], model.encode(images)[0], atol=2e-2)   # saved as float16
    info = json.loads(path.with_suffix(".json").read_text())
    assert info["class"] == "ResNetDiffusionVAE" and info["config"]["vae_name"] == "fmnist_vae"
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f: keys = list(f.keys())
    assert not any(k.startswith("vae.") for k in keys) and any(k.startswith("encoder.") for k in keys)   # the VAE by name
    assert info["training"]["command"].startswith("from ldm_course.resnet_decoder import train_resnet_decoder")
    assert [h["split"] for h in info["training"]["kl_history"]] == ["train", "valid"]
    with pytest.raises(ValueError, match="expected a ResNetDiffusionVAE"): load_resnet_decoder("fmnist_latent")
    with pytest.raises(FileNotFoundError, match="shipped"): load_resnet_decoder("no_such_model")
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    (tmp_path / "bad.json").write_text(path.with_suffix(".json").read_text())
    with pytest.raises(ValueError, match="only safetensors"): load_resnet_decoder(tmp_path / "bad.safetensors")


def test_seeds_repeat_and_differ(tiny, images):
    model, _ = tiny
    kw = dict(num_steps=4, n=3, model=model, guidance_scale=2.0)
    a, b = generate_from_resnet(images[0], seed=1, **kw), generate_from_resnet(images[0], seed=1, **kw)
    assert a.shape == (3, 1, 32, 32) and a.dtype == torch.float32 and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, generate_from_resnet(images[0], seed=2, **kw))
    assert not torch.equal(a[0], a[1])                       # n decodings of one z differ by the decoder's noise
    assert generate_from_resnet(images[0], seed=None, sample_z=True, **kw).shape == (3, 1, 32, 32)
    with pytest.raises(ValueError, match="seed must be"): generate_from_resnet(images[0], seed=-1, **kw)
    with pytest.raises(ValueError, match="guidance scale must be"): generate_from_resnet(images[0], num_steps=2, guidance_scale=-1, model=model)


def test_guidance_zero_ignores_the_image(tiny, images):
    model, _ = tiny
    kw = dict(num_steps=3, n=2, seed=0, model=model)
    u0, u1 = generate_from_resnet(images[0], guidance_scale=0, **kw), generate_from_resnet(images[1], guidance_scale=0, **kw)
    assert torch.allclose(u0, u1, atol=1e-5)                  # s = 0: the null context alone
    c0, c1 = generate_from_resnet(images[0], guidance_scale=1, **kw), generate_from_resnet(images[1], guidance_scale=1, **kw)
    assert not torch.allclose(c0, c1, atol=1e-5)


def test_interpolation_and_prior(tiny, images):
    model, _ = tiny
    s = interpolate(images[0], images[1], n=4, num_steps=3, model=model)
    t = interpolate(images[0], images[2], n=4, num_steps=3, model=model)
    assert s.shape == (4, 1, 32, 32)
    assert torch.allclose(s[0], t[0], atol=1e-4)              # the same start, the same noise: the same first frame
    with pytest.raises(ValueError, match="n must be an int in \\[2"): interpolate(images[0], images[1], n=1, model=model)
    p = sample_prior(3, num_steps=3, seed=0, model=model)
    assert p.shape == (3, 1, 32, 32) and torch.equal(p, sample_prior(3, num_steps=3, seed=0, model=model))


def test_evaluation_against_the_vae(tiny):
    model, _ = tiny
    res = evaluate_resnet_decoder(model, n=8, n_prior=8, n_diverse=2, k=2, num_steps=3, guidance_scale=1.0)
    for key in ("decoder", "vae"):
        assert 0 <= res[key]["agreement"] <= 1 and res[key]["fid"] >= 0 and res[key]["diversity"] >= 0
    assert res["images"]["decoder"].shape == (8, 1, 32, 32) and res["prior"]["n"] == 8
    assert "VAE reconstruction" in comparison_table(res)
    rows = resnet_guidance_sweep(model, scales=(1.0, 2.0), n=8, num_steps=2)
    assert [r["scale"] for r in rows] == [1.0, 2.0] and all(0 <= r["accuracy"] <= 1 for r in rows)
    assert laplacian_sharpness(torch.zeros(2, 1, 8, 8)) == 0
    assert pairwise_distance(torch.zeros(3, 2, 1, 4, 4)) == 0


# ---- other decoders and spaces ---------------------------------------------------------------------------------

def test_diffusers_decoder_tiny_random_config(tmp_path, images):
    out = tmp_path / "sd.safetensors"
    model, _, _ = train_resnet_decoder(decoder=tiny_diffusers_config(4, 32), epochs=1, n_train=32, batch_size=16, z_dim=8,
                                       max_steps=2, cache=False, progress=False, out=out)
    assert isinstance(model.decoder, DiffusersDecoder) and model.context_dim == 32
    loaded = load_resnet_decoder(out)
    assert isinstance(loaded.decoder, DiffusersDecoder)
    x = generate_from_resnet(images[0], num_steps=2, n=2, seed=0, model=loaded)
    assert x.shape == (2, 1, 32, 32)
    with pytest.raises(ValueError, match="reads 32-d context"):
        train_resnet_decoder(decoder=tiny_diffusers_config(4, 32), context_dim=64, n_train=32, progress=False)
    with pytest.raises(ValueError, match="takes 4 channels; this space has 1"):
        train_resnet_decoder(space="pixel", decoder=tiny_diffusers_config(4, 32), n_train=32, progress=False)


def test_pixel_space_and_a_finetuned_encoder(images):
    model, learn, info = train_resnet_decoder(space="pixel", freeze_encoder=False, config="tiny", epochs=1, n_train=32,
                                              batch_size=16, z_dim=8, progress=False)
    assert model.space == "pixel" and model.decoder_shape == (1, 32, 32) and info["trainable_params"] > info["decoder_params"]
    before = load_image_encoder("course").backbone.stem[0].weight
    assert not torch.equal(model.encoder.backbone.stem[0].weight, before)   # fine-tuned: the encoder moved
    assert generate_from_resnet(images[0], num_steps=2, n=2, seed=0, model=model).shape == (2, 1, 32, 32)


# ---- the command line -----------------------------------------------------------------------------------------

def _cli_error(argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    msg = err.getvalue()
    assert code == 2 and msg.startswith("error: ") and msg.count("\n") == 1, msg
    return msg


def test_cli_generate_from_image(tiny, tmp_path, images):
    _, path = tiny
    img = tmp_path / "shirt.png"
    Image.fromarray(((images[0, 0] + 1) * 127.5).round().byte().numpy()).save(img)
    res = run(["generate", "--from-image", str(img), "--weights", str(path), "--n", "4", "--steps", "3",
               "--each", "--out", str(tmp_path / "out")])
    assert (tmp_path / "out" / "decodings.png").is_file() and len(res["files"]) == 4
    assert 0 <= res["agreement"] <= 1 and res["input_class"] and res["weights"] == str(path)
    (tmp_path / "notes.txt").write_text("hello")
    assert "not an image file" in _cli_error(["generate", "--from-image", str(tmp_path / "notes.txt"), "--weights", str(path)])
    assert "does not exist" in _cli_error(["generate", "--from-image", str(tmp_path / "nope.png"), "--weights", str(path)])
    assert "without --class-name" in _cli_error(["generate", "--from-image", str(img), "--class-name", "bag"])
    assert "needs a ResNet-decoder model" in _cli_error(["generate", "--from-image", str(img), "--weights", "fmnist_latent"])
    Image.new("L", (50, 50)).save(tmp_path / "big.png")
    assert "takes 32×32" in _cli_error(["generate", "--from-image", str(tmp_path / "big.png"), "--weights", str(path)])
    assert run(["generate", "--from-image", str(tmp_path / "big.png"), "--weights", str(path), "--resize", "--n", "2",
                "--steps", "2", "--out", str(tmp_path / "out2")])["n"] == 2
    assert "invalid choice: 'vgg'" in _cli_error(["train", "resnet-decoder", "--encoder", "vgg"])


def test_write_decodings_in_python(tiny, tmp_path, images):
    model, _ = tiny
    res = write_decodings(images[1], model, n=2, num_steps=2, out=tmp_path)
    assert (tmp_path / "decodings.png").is_file() and res["n"] == 2


def test_eval_cli_records_the_sweep_and_refuses_package_weights(tiny, tmp_path):
    import shutil
    _, path = tiny
    w = tmp_path / "copy.safetensors"
    shutil.copy(path, w); shutil.copy(path.with_suffix(".json"), w.with_suffix(".json"))
    res = run(["eval", "resnet-decoder", "--weights", str(w), "--scales", "1,2", "--n", "8", "--record"])
    info = json.loads(w.with_suffix(".json").read_text())
    assert res["best_scale"] == info["guidance"]["best_scale"] in (1.0, 2.0) and info["eval"]["prior"]["n"] == 8
    assert [r["scale"] for r in info["guidance"]["sweep"]] == [1.0, 2.0] and "eval resnet-decoder" in info["guidance"]["command"]
    assert load_resnet_decoder(w).info["guidance"]["best_scale"] == res["best_scale"]
    assert "belongs to the installed package" in _cli_error(["eval", "resnet-decoder", "--record"])


def test_cli_beta_is_checked_before_training():
    "`train resnet-decoder --beta` sets the KL weight; a negative one, or --beta on another trainer, stops at once."
    assert "--beta (the KL weight) takes a number ≥ 0" in _cli_error(["train", "resnet-decoder", "--beta", "-1"])
    assert "only with train resnet-decoder" in _cli_error(["train", "latent", "--beta", "1e-5"])
    assert "only with train resnet-decoder" in _cli_error(["train", "resnet-decoder", "--beta", "nan"])


def test_cli_train_records_beta(tmp_path):
    "The --beta given reaches the training and its JSON."
    w = tmp_path / "b.safetensors"
    res = run(["train", "resnet-decoder", "--beta", "2e-5", "--n-train", "32", "--fid-n", "4", "--out", str(w)])
    info = json.loads(w.with_suffix(".json").read_text())
    assert info["training"]["beta"] == 2e-5 and "--beta 2e-5" in info["training"]["command"] and res["weights"] == str(w)


def test_shipped_model_keeps_the_class():
    """The shipped decoder at its recorded guidance keeps most test images' class (here 64 images in 25 steps; its JSON
    records 500 in 50), and its recorded measures meet the course's aims: agreement ≥ 85 %, prior samples no worse
    than the unconditional latent model's."""
    from ldm_course.latent import load_latent
    from ldm_course.resnet_decoder import resnet_guidance
    model = load_resnet_decoder()
    row = resnet_guidance_sweep(model, scales=(resnet_guidance(model),), n=64, num_steps=25, seed=1)[0]
    assert row["accuracy"] >= 0.75, row
    ev = model.info["eval"]
    assert ev["decoder"]["agreement"] >= 0.85 and ev["prior"]["fid"] <= load_latent("fmnist_latent").info["fid"]["fid"]


def test_run_summary_rows_compare_like_with_like():
    "`run_summary` reads a model's JSON into the row notebook 14 compares; the recorded β comparison has the same fields."
    from ldm_course.resnet_decoder import run_summary
    info = load_resnet_decoder().info
    row = run_summary(info)
    assert row["agreement"] == info["eval"]["decoder"]["agreement"] and row["prior_fid"] == info["eval"]["prior"]["fid"]
    assert row["kl"] == [h["kl"] for h in info["training"]["kl_history"] if h["split"] == "valid"][-1]
    assert all(set(row) <= set(other) for other in info["beta_comparison"])
    with pytest.raises(ValueError, match="measure it first"): run_summary({"training": info["training"]})   # not yet evaluated
