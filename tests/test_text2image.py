"""Text-to-image on the Noto Emoji (notebook 13a): caption augmentation, the captioned pair, the online/folder loader,
training, the measures (ink colour, nearest images, memorisation, emoji FID) and the CLI. Needs the emoji set
(LDM_COURSE_DATA) for the tests that train or score; the rest run anywhere."""
import json, random, subprocess, sys, warnings
from pathlib import Path

import pytest
import torch

from ldm_course.data import ImageDataset, load_dataset
from ldm_course.guidance import guided_sample
from ldm_course.conditioning import load_conditional
from ldm_course.text2image import (EMOJI_TEMPLATES, augment_caption, caption_variants, captioned_pair, colour_agreement,
                                   drop_modifiers, emoji_fid, ink_colour, load_captioned, memorisation, nearest_images,
                                   swap_synonyms, train_text2image)

CLI = str(Path(sys.executable).with_name("ldm-course"))


def _have_emoji() -> bool:
    try:
        load_dataset("noto_emoji", "test", download=False)
        return True
    except (FileNotFoundError, OSError):
        return False


needs_emoji = pytest.mark.skipif(not _have_emoji(), reason="the Noto Emoji set is not available (set LDM_COURSE_DATA)")


def test_caption_variants_are_seeded_distinct_and_start_with_the_caption():
    v = caption_variants("grinning face with big eyes", 6, seed=1)
    assert v[0] == "grinning face with big eyes" and len(set(v)) == len(v) == 6
    assert v == caption_variants("grinning face with big eyes", 6, seed=1)
    assert caption_variants("x", 1) == ["x"]
    with pytest.raises(ValueError, match="non-empty"): caption_variants("  ", 3)
    with pytest.raises(ValueError, match="k must be"): caption_variants("red heart", 0)


def test_modifiers_are_dropped_and_synonyms_swapped_sometimes():
    outs = {drop_modifiers("man tipping hand: dark skin tone", random.Random(s)) for s in range(40)}
    assert outs == {"man tipping hand", "man tipping hand: dark skin tone"}
    outs = {drop_modifiers("grinning face with big eyes", random.Random(s)) for s in range(40)}
    assert outs == {"grinning face", "grinning face with big eyes"}
    swapped = {swap_synonyms("red circle", random.Random(s), p=1.0) for s in range(40)}
    assert swapped <= {f"{c} {s}" for c in ("crimson", "scarlet") for s in ("disc", "round")} and len(swapped) > 1
    assert swap_synonyms("red circle", random.Random(0), p=0.0) == "red circle"
    assert augment_caption("apple", random.Random(0), ["an emoji of {a} {c}"]) == "an emoji of an apple"


def test_load_captioned_reads_a_local_imagefolder_and_checks_its_input(tmp_path):
    from PIL import Image
    rows = []
    for i in range(5):
        Image.new("RGBA", (40, 30), (255, 0, 0, 128 + i)).save(tmp_path / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"red thing {i}"})
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    train, test = load_captioned(str(tmp_path), size=16, test_fraction=0.2)
    assert train.images.shape == (4, 3, 16, 16) and test.images.shape == (1, 3, 16, 16) and train.images.dtype == torch.uint8
    assert sorted(train.captions + test.captions) == [r["text"] for r in rows]
    assert train.images[0, 0].float().mean() > 250 and train.images[0, 2].float().mean() < 130   # red on white
    with pytest.raises(ValueError, match="caption_column"): load_captioned(str(tmp_path), size=16, caption_column="caption")
    with pytest.raises(ValueError, match="divisible by 4"): load_captioned(str(tmp_path), size=18)
    with pytest.raises(ValueError, match="test_fraction"): load_captioned(str(tmp_path), size=16, test_fraction=1.0)
    with pytest.raises(OSError, match="noto_emoji"): load_captioned(str(tmp_path / "nowhere-such-set"), size=16)


def test_ink_colour_and_nearest_images():
    white = torch.ones(1, 3, 8, 8)
    red = white.clone(); red[:, 1:, 2:6, 2:6] = -1          # a red square on white
    col = ink_colour(torch.cat([white, red]))
    assert torch.allclose(col[0], torch.ones(3)) and torch.allclose(col[1], torch.tensor([1.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="RGB"): ink_colour(torch.zeros(2, 1, 8, 8))
    ref = torch.rand(5, 3, 8, 8) * 2 - 1
    d, i = nearest_images(ref[[3, 1]], ref)
    assert i.tolist() == [3, 1] and torch.allclose(d, torch.zeros(2), atol=1e-3)
    with pytest.raises(ValueError, match="differ in shape"): nearest_images(torch.zeros(1, 3, 4, 4), ref)
    as_uint8 = ((ref + 1) * 127.5).round().to(torch.uint8)                   # uint8 references, float samples
    d8, i8 = nearest_images(ref[[4, 0]], as_uint8)
    assert i8.tolist() == [4, 0] and d8.max() < 0.01
    m = memorisation(ref[:3], ref, ref[3:] * 0.5)
    assert m["near_copies"] == 1.0 and m["samples_median"] < 1e-3 < m["held_out_median"]


@needs_emoji
def test_captioned_pair_labels_index_the_caption_table():
    train, test, table = captioned_pair("noto_emoji", variants=3, n_train=50)
    assert len(train) == 50 and train.labels.tolist() == list(range(50)) and train.captions is None
    assert test.labels[0] == 50 and len(table) == 50 + len(test)
    assert all(1 <= len(r) <= 3 for r in table[:50]) and all(len(r) == 1 for r in table[50:])
    with pytest.raises(ValueError, match="captioned"): captioned_pair("fashion_mnist")


@pytest.fixture(scope="module")
def emoji_model(tmp_path_factory):
    if not _have_emoji(): pytest.skip("the Noto Emoji set is not available")
    out = tmp_path_factory.mktemp("t2i") / "emoji_tiny.safetensors"
    model, _, info = train_text2image(config="tiny-text", variants=2, epochs=1, n_train=48, batch_size=16, cache=False,
                                      progress=False, out=out)
    return model, out, info


def test_train_text2image_saves_a_text_model_that_draws_prompts(emoji_model):
    model, out, info = emoji_model
    assert model.kind == "text" and info["n_train"] == 48 and 48 + 351 <= info["captions"] <= 2 * 48 + 351
    loaded = load_conditional(out)
    x = guided_sample(loaded, prompts=["red heart", "blue book"], steps=3, guidance_scale=3.0,
                      generator=torch.Generator().manual_seed(0), progress=False)
    assert x.shape == (2, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
    assert "train_text2image(" in loaded.info["training"]["command"]
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        guided_sample(loaded, prompts="🍕🍕", n=1, steps=2, progress=False)
    assert any("does not know" in str(m.message) for m in w)


def test_measures_run_on_a_tiny_model(emoji_model):
    model = emoji_model[0]
    ca = colour_agreement(model, objects=("heart", "circle"), seeds=range(2), n=1, steps=2)
    assert len(ca["scores"]) == 2 and ca["images"].shape == (2, 2, 2, 1, 3, 32, 32) and set(ca["per_object"]) == {"heart", "circle"}
    real = load_dataset("noto_emoji", "test").images[:40]
    f = emoji_fid(real.float() / 127.5 - 1, n_real=200)
    assert f["fid"] >= 0 and "kid" in f


def test_cli_generates_an_emoji_prompt_each_as_its_own_png(emoji_model, tmp_path):
    _, out, _ = emoji_model
    r = subprocess.run([CLI, "generate", "--weights", str(out), "--prompt", "red heart", "--guidance", "3", "--each",
                        "--n", "2", "--steps", "2", "--no-gif", "--out", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert len(list(tmp_path.rglob("*.png"))) >= 2


@needs_emoji
def test_cli_trains_a_text2image_model_and_records_its_measures(tmp_path):
    out = tmp_path / "t2i.safetensors"
    r = subprocess.run([CLI, "--scale", "ci", "--threads", "1", "train", "text2image", "--epochs", "1", "--n-train", "32",
                        "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    info = json.loads(out.with_suffix(".json").read_text())
    assert info["conditioning"]["kind"] == "text" and info["training"]["n_train"] == 32
    assert {"colour", "memorisation", "fid", "real_fid"} <= set(info["eval"])
    assert "train text2image" in info["training"]["command"]
