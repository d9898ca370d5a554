"""Conditioning (notebook 12) and classifier-free guidance (notebook 13): class names, captions, text encoders,
training with condition dropout, saving/loading, guided sampling, the CLI. Offline: MiniLM from its package, a tiny
random CLIP built here."""
import json, subprocess, sys, warnings
from pathlib import Path

import pytest
import torch

from ldm_course.conditioning import (CaptionBank, ConditionalLatentDiffusion, ConditionCB, class_captions, class_ids,
                                     class_index, load_conditional, load_text_encoder, make_caption, train_conditional)
from ldm_course.data import FASHION_CLASSES
from ldm_course.guidance import (best_guidance, cfg_denoiser, check_guidance, generate_conditional, guidance_sweep,
                                 guided_sample, record_guidance, sweep_table)
from ldm_course.latent import load_latent
from ldm_course.samplers import SAMPLERS

CLI = str(Path(sys.executable).with_name("ldm-course"))


@pytest.fixture(scope="module")
def encoder():
    return load_text_encoder("minilm")


def _train_tiny(kind, tmp_path_factory):
    "A tiny `kind` model trained for a few steps on 64 images, saved once: (model, path)."
    out = tmp_path_factory.mktemp("cond") / f"{kind}.safetensors"
    model, _, _ = train_conditional(kind, config=f"tiny-{kind}", epochs=1, n_train=64, batch_size=16, cache=False,
                                    progress=False, out=out)
    return model, out


@pytest.fixture(scope="module")
def class_model(tmp_path_factory): return _train_tiny("class", tmp_path_factory)


@pytest.fixture(scope="module")
def text_model(tmp_path_factory): return _train_tiny("text", tmp_path_factory)


def test_class_names_any_case_and_unknown_ones_listed():
    assert class_index("  ankle BOOT ", FASHION_CLASSES) == 9 and class_index(3, FASHION_CLASSES) == 3
    assert class_ids(["sneaker", 0, torch.tensor(2)], FASHION_CLASSES).tolist() == [7, 0, 2]
    with pytest.raises(ValueError, match="unknown class name 'sneakers'.*'Sneaker'"): class_index("sneakers", FASHION_CLASSES)
    with pytest.raises(ValueError, match="out of range"): class_index(10, FASHION_CLASSES)
    with pytest.raises(ValueError, match="out of range"): class_index(-1, FASHION_CLASSES)
    with pytest.raises(TypeError): class_index(True, FASHION_CLASSES)
    with pytest.raises(ValueError, match="no classes"): class_ids([], FASHION_CLASSES)


def test_captions_fill_article_and_name():
    caps = class_captions(FASHION_CLASSES)
    assert len(caps) == 10 and all(len(c) == 10 for c in caps) and len({c for cs in caps for c in cs}) == 100
    assert "a photo of an ankle boot" in caps[9] and "a grey pair of trousers" in caps[1]
    assert make_caption("{a} {name}", "apple") == "an apple"
    with pytest.raises(ValueError, match="templates is empty"): class_captions(FASHION_CLASSES, [])


def test_minilm_encoder_shapes_mask_cache_and_bad_prompts(encoder):
    s, m = encoder(["a sneaker", "a photo of a dress", ""])
    assert s.shape == (3, 32, 384) and m.dtype == torch.bool and m.sum(1).tolist()[2] == 2   # "" = [CLS] [SEP]
    assert m.sum(1)[1] > m.sum(1)[0]
    s2, _ = encoder(["a photo of a dress"])
    assert torch.equal(s2[0], s[1])                              # cached, and batch-independent
    with pytest.raises(ValueError, match="empty"): encoder([])
    with pytest.raises(TypeError, match="list of strings"): encoder([1, 2])
    with pytest.warns(UserWarning, match="truncated"): encoder(["word " * 100])
    with pytest.raises(ValueError, match="max_length"): load_text_encoder("minilm", max_length=10_000)
    with pytest.raises(OSError, match="could not load the text encoder"): load_text_encoder("/no/such/encoder")


def _tiny_clip(folder: Path) -> Path:
    "A tiny random CLIP text model with a 30-word BPE vocabulary, saved like a hub checkpoint (no download)."
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    words = ["a", "photo", "of", "sneaker", "dress", "bag", "the", "red", "blue"]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    for w in words: vocab[w + "</w>"] = len(vocab)
    for ch in "abcdefghijklmnopqrstuvwxyz": vocab.setdefault(ch, len(vocab)); vocab.setdefault(ch + "</w>", len(vocab))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>")
    cfg = CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=64, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    torch.manual_seed(0)
    CLIPTextModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_clip_encoder_loads_from_a_folder(tmp_path):
    enc = load_text_encoder(str(_tiny_clip(tmp_path / "clip")))
    assert enc.dim == 32 and enc.max_length == 64
    s, m = enc(["a photo of a sneaker", "a bag"])
    assert s.shape == (2, 64, 32) and m[0].sum() > m[1].sum()
    with pytest.warns(UserWarning, match="truncated"): enc(["a photo of a sneaker " * 5])


def test_caption_bank_and_condition_dropout(encoder):
    bank = CaptionBank(encoder, [["a sneaker", "a photo of a sneaker"], ["a bag"]])
    ctx, mask = bank.draw(torch.tensor([0, 1, 1]), drop=torch.tensor([False, False, True]))
    assert ctx.shape == (3, 32, 384) and mask[2].sum() == 2                 # the dropped one is ""
    assert torch.equal(ctx[1], bank.states[2])
    with pytest.raises(ValueError, match="every label"): CaptionBank(encoder, [["a"], []])
    with pytest.raises(ValueError, match="p_uncond"): ConditionCB(1.0, null_class=10)
    with pytest.raises(ValueError, match="not both"): ConditionCB(0.1)

    class L: training = True
    cb = ConditionCB(0.5, null_class=10); cb.learn = L()
    torch.manual_seed(0)
    y = torch.zeros(4000, dtype=torch.long)
    cb.learn.batch = ((torch.zeros(4000, 1), torch.zeros(4000), y), None)
    cb.before_batch()
    dropped = (cb.learn.batch[0][2] == 10).float().mean().item()
    assert 0.45 < dropped < 0.55                                             # p_uncond of the labels → the null class
    cb.learn.training = False
    cb.before_epoch()
    cb.learn.batch = ((torch.zeros(8, 1), torch.zeros(8), y[:8]), None)
    cb.before_batch()
    assert (cb.learn.batch[0][2] == 0).all()                                 # validation never drops


def test_class_model_trains_saves_loads_and_checks_requests(class_model):
    model, out = class_model
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["conditioning"]["kind"] == "class" and meta["conditioning"]["classes"] == list(FASHION_CLASSES)
    assert meta["training"]["p_uncond"] == 0.1 and meta["training"]["class_cond"]
    loaded = load_conditional(out)
    assert isinstance(loaded, ConditionalLatentDiffusion) and loaded.classes == list(FASHION_CLASSES)
    a = loaded.sample(3, "ddim", 4, classes=["bag", 1, "SNEAKER"], generator=torch.Generator().manual_seed(0), progress=False)
    assert a.shape == (3, 1, 32, 32) and a.abs().max() <= 1
    with pytest.raises(ValueError, match="give classes=..., not prompts"): loaded.condition(2, prompts="a bag")
    with pytest.raises(ValueError, match="unknown class name"): loaded.condition(2, classes="cat")
    with pytest.raises(ValueError, match="one per sample"): loaded.condition(3, classes=[0, 1])
    assert loaded.condition(2)["class_labels"].tolist() == [10, 10]         # no class: the null class
    plain = load_latent(out)                                                 # also loads as an unconditional model
    assert type(plain).__name__ == "LatentDiffusion"


def test_text_model_trains_saves_loads_and_checks_requests(text_model):
    model, out = text_model
    loaded = load_conditional(out)
    assert loaded.kind == "text" and loaded.text_encoder_name == "minilm" and loaded.unet.context_dim == 384
    cond = loaded.condition(2, prompts="a photo of a bag")
    assert cond["context"].shape == (2, 32, 384) and cond["context_mask"].shape == (2, 32)
    with pytest.raises(ValueError, match="text-conditional"): loaded.condition(2, classes="bag")
    with pytest.raises(ValueError, match="empty"): loaded.condition(2, prompts=[])
    with pytest.raises(ValueError, match="one per sample"): loaded.condition(3, prompts=["a", "b"])
    with pytest.raises(FileNotFoundError, match="shipped"): load_conditional("no_such_model")
    with pytest.raises(ValueError, match="unconditional"): load_conditional("fmnist_latent")


def test_cfg_is_one_batched_pass_equal_to_two(class_model):
    model, _ = class_model
    unet, x, t = model.unet, torch.randn(3, 4, 8, 8), torch.full((3,), 500)
    c, u = {"class_labels": torch.tensor([1, 2, 3])}, {"class_labels": torch.full((3,), 10)}
    with torch.no_grad():
        e_c, e_u = unet(x, t, **c), unet(x, t, **u)
        for s in (0.0, 1.0, 2.5):
            torch.testing.assert_close(cfg_denoiser(unet, c, u, s)(x, t), e_u + s * (e_c - e_u), atol=1e-5, rtol=1e-4)
    calls = []
    unet.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    with torch.no_grad():
        cfg_denoiser(unet, c, u, 3.0)(x, t); cfg_denoiser(unet, c, u, 1.0)(x, t)
    assert calls == [6, 3]
    unet._forward_hooks.clear()
    with pytest.raises(ValueError, match="same keywords"): cfg_denoiser(unet, c, {"context": None}, 2.0)


@pytest.mark.parametrize("bad", [-0.5, float("nan"), float("inf"), "3", True])
def test_bad_guidance_scales(bad):
    with pytest.raises(ValueError, match="guidance scale"): check_guidance(bad)


def test_guided_sampling_with_every_sampler_and_negatives(class_model, text_model):
    cm, tm = class_model[0], text_model[0]
    for sampler in SAMPLERS:
        x = guided_sample(cm, 2, classes="bag", guidance_scale=2.0, sampler=sampler, steps=3, progress=False,
                          generator=torch.Generator().manual_seed(0))
        assert x.shape == (2, 1, 32, 32) and torch.isfinite(x).all()
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    a = guided_sample(cm, classes="bag", guidance_scale=3.0, x_T=noise, sampler="ddim", steps=3, progress=False)
    b = guided_sample(cm, classes="bag", negative="sneaker", guidance_scale=3.0, x_T=noise, sampler="ddim", steps=3, progress=False)
    c = guided_sample(cm, classes="bag", guidance_scale=3.0, x_T=noise, sampler="ddim", steps=3, progress=False)
    assert torch.equal(a, c) and not torch.equal(a, b)
    t1 = guided_sample(tm, prompts="a bag", negative="a sneaker", guidance_scale=2.0, x_T=noise, sampler="ddim", steps=3, progress=False)
    assert t1.shape == (2, 1, 32, 32)
    with pytest.raises(ValueError, match="x_T must be"): guided_sample(cm, classes="bag", x_T=torch.randn(2, 3, 8, 8), progress=False)
    with pytest.raises(TypeError, match="ConditionalLatentDiffusion"): guided_sample(load_latent(class_model[1]), 2, classes="bag")


def test_sweep_rows_and_record(class_model, tmp_path):
    model, out = class_model
    rows = guidance_sweep(model, scales=(0, 2), n=20, sampler="ddim", steps=3, progress=False)
    assert [r["scale"] for r in rows] == [0.0, 2.0] and all(0 <= r["accuracy"] <= 1 and len(r["per_class"]) == 10 for r in rows)
    assert rows[0]["images"].shape == (20, 1, 32, 32) and "| 2 |" in sweep_table(rows)
    best = best_guidance(rows)
    with pytest.warns(UserWarning, match="no guidance scale has FID"): assert best_guidance(rows, max_fid=-1) == min(rows, key=lambda r: r["fid"])
    record_guidance(out, rows, best, command="test")
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["guidance"]["best_scale"] == best["scale"] and "images" not in meta["guidance"]["sweep"][0]
    with pytest.raises(ValueError, match="belongs to the installed package"): record_guidance("fmnist_latent", rows, best)


def test_generate_conditional_writes_each_image(class_model, text_model, tmp_path):
    res = generate_conditional(class_model[1], classes="Bag", n=3, steps=3, sampler="ddim", out=tmp_path / "c", each=True)
    assert res["class"] == "Bag" and [Path(f).name for f in res["files"]] == ["000.png", "001.png", "002.png"]
    assert (tmp_path / "c" / "denoising.gif").is_file() and 0 <= res["on_target"] <= 1
    with pytest.raises(ValueError, match="class-conditional"): generate_conditional(class_model[1], prompt="a bag", out=tmp_path / "x")
    with pytest.raises(ValueError, match="text-conditional"): generate_conditional(text_model[1], classes="bag", out=tmp_path / "x")
    with pytest.raises(ValueError, match="unknown class name"): generate_conditional(class_model[1], classes="cat", out=tmp_path / "x")
    assert not (tmp_path / "x").exists()                                      # bad requests fail before writing


def _cli(*args):
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=600)


def test_cli_generate_conditional(class_model, text_model, tmp_path):
    out = _cli("generate", "--weights", str(class_model[1]), "--class-name", "sneaker", "--guidance", "2", "--n", "2",
               "--steps", "3", "--sampler", "ddim", "--each", "--out", str(tmp_path / "a"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "a" / "001.png").is_file() and json.loads(out.stdout)["guidance"] == 2.0
    out = _cli("generate", "--weights", str(text_model[1]), "--prompt", "a photo of a bag", "--negative-prompt", "a sneaker",
               "--n", "2", "--steps", "3", "--no-gif", "--out", str(tmp_path / "b"))
    assert out.returncode == 0, out.stderr[-2000:]


@pytest.mark.parametrize("args, expect", [
    (["generate", "--weights", "fmnist_latent", "--class-name", "bag"], "is unconditional"),
    (["generate", "--class-name", "bag", "--prompt", "a bag"], "not both"),
    (["generate", "--guidance", "3"], "need a conditional model"),
    (["generate", "--each"], "--each is for conditional models"),
])
def test_cli_conditional_bad_args(args, expect):
    out = _cli(*args)
    assert out.returncode == 2 and "Traceback" not in out.stderr and expect in out.stderr, out.stderr
