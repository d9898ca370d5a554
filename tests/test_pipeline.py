"""ldm_course.pipeline: ImageDiffusionModel equals diffusers' StableDiffusionPipeline on tiny random parts (offline),
repeats with a seed, and rejects bad input with an error that says what was expected."""
import json, math

import numpy as np
import pytest
import torch

from ldm_course.pipeline import SD15_SCHEDULER_CONFIG, ImageDiffusionModel, tiny_sd_parts

SIZE, STEPS = 32, 4          # 32×32 images → 16×16 latents (the tiny VAE downsamples by 2)
PROMPTS = ["a cat", "a dog"]


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return tiny_sd_parts(tmp_path_factory.mktemp("tokenizer"), seed=0)


@pytest.fixture(scope="module")
def sd(parts):
    return ImageDiffusionModel(**parts)


def _noise(batch, seed=1):
    return torch.randn(batch, 4, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(seed))


def _diffusers(parts, scheduler, prompts, noise, **kw):
    "The reference: diffusers' own pipeline over the same parts, with a fresh copy of the scheduler."
    from diffusers import StableDiffusionPipeline
    sched = parts["scheduler_LMS" if scheduler == "lms" else "scheduler_DDIM"]
    pipe = StableDiffusionPipeline(vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"],
                                   unet=parts["unet"], scheduler=type(sched).from_config(sched.config),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompts, height=SIZE, width=SIZE, num_inference_steps=STEPS, latents=noise, output_type="pt", **kw).images


def _ours(sd, scheduler, prompts, noise, **kw):
    return sd.prompt_to_img(prompts, height=SIZE, width=SIZE, num_inference_steps=STEPS, img_latents=noise,
                            scheduler=scheduler, output_type="pt", progress=False, **kw)


@pytest.mark.parametrize("scheduler", ["lms", "ddim"])
def test_equals_stable_diffusion_pipeline(sd, parts, scheduler):
    noise = _noise(2)
    ref = _diffusers(parts, scheduler, PROMPTS, noise, guidance_scale=7.5)
    ours = _ours(sd, scheduler, PROMPTS, noise, guidance_scale=7.5)
    assert ours.shape == ref.shape == (2, 3, SIZE, SIZE) and ours.dtype == torch.float32
    assert 0 < ref.std() and (ours - ref).abs().max() < 1e-4


@pytest.mark.parametrize("scheduler,prompts,negative", [("lms", PROMPTS, ["blurry", "a cat"]),
                                                        ("ddim", "a cat", "a dog")])
def test_negative_prompt_equals_stable_diffusion_pipeline(sd, parts, scheduler, prompts, negative):
    noise = _noise(len(prompts) if isinstance(prompts, list) else 1, seed=2)
    ref = _diffusers(parts, scheduler, prompts, noise, guidance_scale=5.0, negative_prompt=negative)
    ours = _ours(sd, scheduler, prompts, noise, guidance_scale=5.0, negative_prompt=negative)
    assert (ours - ref).abs().max() < 1e-4
    assert (ours - _ours(sd, scheduler, prompts, noise, guidance_scale=5.0)).abs().max() > 1e-4   # it matters


def test_prompt_embeds_put_the_unconditional_first(sd):
    embeds = sd.get_prompt_embeds(PROMPTS)
    assert embeds.shape == (4, sd.tokenizer.model_max_length, 32)
    torch.testing.assert_close(embeds[:2], sd.get_text_embeds(["", ""]))
    torch.testing.assert_close(embeds[2:], sd.get_text_embeds(PROMPTS))
    torch.testing.assert_close(sd.get_prompt_embeds("a cat", "a dog")[0], sd.get_text_embeds("a dog")[0])


def test_long_prompts_are_truncated_to_the_tokenizer_length(sd):
    assert sd.get_text_embeds("a cat " * 50).shape == (1, sd.tokenizer.model_max_length, 32)


def test_start_latents_are_scaled_by_init_noise_sigma(sd):
    sched = sd.scheduler("lms"); sched.set_timesteps(STEPS)
    noise = _noise(2)
    torch.testing.assert_close(sd.get_img_latents(2, SIZE, SIZE, "lms", img_latents=noise), noise * sched.init_noise_sigma)
    assert float(sched.init_noise_sigma) > 14          # σ_max of SD's schedule, ≈ 14.6
    seeded = sd.get_img_latents(2, SIZE, SIZE, "ddim", seed=5)
    assert seeded.shape == (2, 4, SIZE // 2, SIZE // 2)
    torch.testing.assert_close(seeded, torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(5)))


def test_a_seed_repeats_and_a_string_gives_one_pil_image(sd):
    kw = dict(height=SIZE, width=2 * SIZE, num_inference_steps=2, progress=False)
    a, b = sd.prompt_to_img(PROMPTS, seed=7, **kw), sd.prompt_to_img(PROMPTS, seed=7, **kw)
    c = sd.prompt_to_img(PROMPTS, seed=8, **kw)
    assert len(a) == 2 and a[0].size == (2 * SIZE, SIZE) and a[0].mode == "RGB"
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))
    assert not np.array_equal(np.asarray(a[0]), np.asarray(c[0]))
    assert not np.array_equal(np.asarray(a[0]), np.asarray(a[1]))      # each prompt its own noise
    one = sd.prompt_to_img("a cat", seed=7, **kw)
    assert isinstance(one, list) and len(one) == 1


def test_pil_images_round_as_diffusers(sd):
    from diffusers.image_processor import VaeImageProcessor
    imgs = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    ref = VaeImageProcessor.numpy_to_pil(VaeImageProcessor.pt_to_numpy(imgs))
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(sd.transform_imgs(imgs), ref))


def test_from_pretrained_loads_a_saved_model_folder(sd, parts, tmp_path):
    "The layout of a Stable Diffusion repository, written locally (no download)."
    for name in ("vae", "text_encoder", "unet", "tokenizer"):
        parts[name].save_pretrained(tmp_path / name)
    (tmp_path / "scheduler").mkdir()      # as in the SD v1.5 repository: a PNDM config that LMS and DDIM read
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "PNDMScheduler", **SD15_SCHEDULER_CONFIG, "skip_prk_steps": True}))
    loaded = ImageDiffusionModel.from_pretrained(str(tmp_path), dtype=torch.float32, device="cpu")
    assert [type(loaded.scheduler(k)).__name__ for k in ("lms", "ddim")] == ["LMSDiscreteScheduler", "DDIMScheduler"]
    for k in ("lms", "ddim"):
        assert loaded.scheduler(k).config.timestep_spacing == sd.scheduler(k).config.timestep_spacing
    noise = _noise(1, seed=3)
    for k in ("lms", "ddim"):
        torch.testing.assert_close(_ours(loaded, k, "a cat", noise), _ours(sd, k, "a cat", noise), rtol=0, atol=0)


# bad input: each a ValueError (or TypeError) that says what was expected
def _call(sd, prompts="a cat", **kw):
    return sd.prompt_to_img(prompts, **{"height": SIZE, "width": SIZE, "num_inference_steps": 1, "progress": False, **kw})


@pytest.mark.parametrize("height,width", [(SIZE + 1, SIZE), (SIZE, 31), (0, SIZE), (-2, SIZE), (32.0, SIZE)])
def test_size_not_a_multiple_of_the_vae_factor(sd, height, width):
    with pytest.raises(ValueError, match="multiples of 2"):
        _call(sd, height=height, width=width)


def test_sd_vae_factor_is_eight():
    class Cfg: block_out_channels, scaling_factor, in_channels = (128, 256, 512, 512), 0.18215, 4
    class Part:
        config = Cfg
        def eval(self): return self
    assert ImageDiffusionModel(Part(), None, Part(), Part(), None, None).vae_scale_factor == 8


def test_img_latents_batch_must_match_the_prompts(sd):
    with pytest.raises(ValueError, match=r"expected \(2, 4, 16, 16\).*number of prompts"):
        _call(sd, PROMPTS, img_latents=_noise(3))


@pytest.mark.parametrize("shape", [(1, 3, 16, 16), (1, 4, 8, 8), (4, 16, 16)])
def test_img_latents_of_the_wrong_shape(sd, shape):
    with pytest.raises(ValueError, match=r"img_latents has shape .*expected \(1, 4, 16, 16\)"):
        _call(sd, img_latents=torch.randn(shape))


def test_img_latents_must_be_finite(sd):
    noise = _noise(1); noise[0, 0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        _call(sd, img_latents=noise)


def test_empty_prompt_list(sd):
    with pytest.raises(ValueError, match="empty"):
        _call(sd, [])


@pytest.mark.parametrize("prompts", [None, 3, ["a cat", 3]])
def test_prompts_must_be_strings(sd, prompts):
    with pytest.raises(TypeError, match="string or a list of strings"):
        _call(sd, prompts)


@pytest.mark.parametrize("name", ["euler", "LMS ", "pndm"])
def test_unknown_scheduler(sd, name):
    with pytest.raises(ValueError, match=r"expected one of \('lms', 'ddim'\)"):
        _call(sd, scheduler=name)


@pytest.mark.parametrize("negative", [["blurry"], ["a", "b", "c"], []])
def test_negative_prompt_list_of_the_wrong_length(sd, negative):
    with pytest.raises(ValueError, match="a list of 2 strings"):
        _call(sd, PROMPTS, negative_prompt=negative)


@pytest.mark.parametrize("scale", [-0.5, math.nan, math.inf, "7.5", True])
def test_guidance_scale_must_be_finite_and_not_negative(sd, scale):
    with pytest.raises(ValueError, match="finite number ≥ 0"):
        _call(sd, guidance_scale=scale)


@pytest.mark.parametrize("steps", [0, -1, 2.5])
def test_steps_must_be_a_positive_integer(sd, steps):
    with pytest.raises(ValueError, match="positive integer"):
        _call(sd, num_inference_steps=steps)


def test_unknown_output_type(sd):
    with pytest.raises(ValueError, match=r"expected one of \('pil', 'pt'\)"):
        _call(sd, output_type="np")


@pytest.mark.parametrize("scheduler", ["lms", "ddim"])
def test_course_unet_and_vae_on_sd_weights_equal_diffusers_modules(sd, parts, scheduler):
    "The course's own UNet and VAE (from_diffusers) in the pipeline draw what diffusers' modules draw, and diffusers' pipeline."
    from ldm_course.pipeline import to_course_parts
    from ldm_course.unet import UNet
    from ldm_course.vae import VAE
    course = ImageDiffusionModel(**to_course_parts(parts))
    assert isinstance(course.unet, UNet) and isinstance(course.vae, VAE) and course.vae_scale_factor == 2
    noise = _noise(2)
    ours = _ours(course, scheduler, PROMPTS, noise, negative_prompt=["blurry", ""])
    assert (ours - _ours(sd, scheduler, PROMPTS, noise, negative_prompt=["blurry", ""])).abs().max() <= 1e-4
    assert (ours - _diffusers(parts, scheduler, PROMPTS, noise, negative_prompt=["blurry", ""])).abs().max() <= 1e-4


def test_course_vae_needs_a_scaling_factor(parts):
    from ldm_course.pipeline import to_course_parts
    course = to_course_parts(parts)
    course.pop("scaling_factor")
    with pytest.raises(ValueError, match="scaling_factor"): ImageDiffusionModel(**course)
