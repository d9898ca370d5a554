"""ldm_course.pipeline: ImageDiffusionModel equals diffusers' StableDiffusionPipeline on tiny random parts (offline),
repeats with a seed, and rejects bad input with an error that says what was expected."""
import json, math, warnings

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


# img2img: the same images as diffusers' StableDiffusionImg2ImgPipeline for the same parts, images, strength and seed
def _diffusers_img2img(parts, scheduler, prompts, images, seed, **kw):
    from diffusers import StableDiffusionImg2ImgPipeline
    sched = parts["scheduler_LMS" if scheduler == "lms" else "scheduler_DDIM"]
    pipe = StableDiffusionImg2ImgPipeline(vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"],
                                          unet=parts["unet"], scheduler=type(sched).from_config(sched.config),
                                          safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompts, image=images, generator=torch.Generator().manual_seed(seed), output_type="pt", **kw).images


@pytest.fixture(scope="module")
def init_images(sd):
    "Two images in [0, 1] to start from (drawn by the tiny pipeline itself)."
    return sd.prompt_to_img(PROMPTS, height=SIZE, width=SIZE, num_inference_steps=2, seed=0, output_type="pt", progress=False)


@pytest.mark.parametrize("scheduler", ["lms", "ddim"])
@pytest.mark.parametrize("strength,n_images", [(0.6, 2), (1.0, 2), (0.5, 1)])
def test_img_to_img_equals_diffusers_img2img(sd, parts, init_images, scheduler, strength, n_images):
    images = init_images[:n_images]                     # one image for both prompts, or one each
    kw = dict(strength=strength, num_inference_steps=8, guidance_scale=7.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                 # diffusers deprecates one image for several prompts
        ref = _diffusers_img2img(parts, scheduler, ["a dog", "a cat"], images, 5, **kw)
    ours = sd.img_to_img(images, ["a dog", "a cat"], seed=5, scheduler=scheduler, output_type="pt", progress=False, **kw)
    assert ours.shape == ref.shape == (2, 3, SIZE, SIZE) and 0 < ref.std()
    assert (ours - ref).abs().max() < 1e-4


def test_img_to_img_strength_and_seed_matter(sd, init_images):
    kw = dict(num_inference_steps=8, output_type="pt", progress=False)
    a = sd.img_to_img(init_images, PROMPTS, strength=0.3, seed=1, **kw)
    assert torch.equal(a, sd.img_to_img(init_images, PROMPTS, strength=0.3, seed=1, **kw))
    assert (a - sd.img_to_img(init_images, PROMPTS, strength=0.3, seed=2, **kw)).abs().max() > 1e-4
    weak, strong = (sd.img_to_img(init_images, PROMPTS, strength=s, seed=1, **kw) for s in (0.25, 1.0))
    assert (weak - init_images).abs().mean() < (strong - init_images).abs().mean()   # low strength stays closer
    pil = sd.img_to_img(sd.transform_imgs(init_images), PROMPTS, strength=0.5, seed=1, num_inference_steps=4, progress=False)
    assert len(pil) == 2 and pil[0].mode == "RGB" and pil[0].size == (SIZE, SIZE)
    one_prompt = sd.img_to_img(init_images, "a cat", strength=0.5, seed=1, **kw)         # one prompt for both images
    torch.testing.assert_close(one_prompt, sd.img_to_img(init_images, ["a cat"] * 2, strength=0.5, seed=1, **kw))


@pytest.mark.parametrize("scheduler", ["lms", "ddim"])
def test_img_to_img_with_the_course_unet_and_vae_equals_diffusers(parts, init_images, scheduler):
    from ldm_course.pipeline import to_course_parts
    course = ImageDiffusionModel(**to_course_parts(parts))
    kw = dict(strength=0.7, num_inference_steps=6, guidance_scale=5.0)
    ref = _diffusers_img2img(parts, scheduler, PROMPTS, init_images, 3, **kw)
    ours = course.img_to_img(init_images, PROMPTS, seed=3, scheduler=scheduler, output_type="pt", progress=False, **kw)
    assert (ours - ref).abs().max() < 1e-4


@pytest.mark.parametrize("strength", [0, -0.1, 1.5, math.nan, True, "0.5", None])
def test_img_to_img_strength_outside_0_1(sd, init_images, strength):
    with pytest.raises(ValueError, match=r"strength=.*expected a number in \(0, 1\]"):
        sd.img_to_img(init_images, PROMPTS, strength=strength, num_inference_steps=2, progress=False)


def test_img_to_img_strength_too_small_for_the_steps(sd, init_images):
    with pytest.raises(ValueError, match="no step would run.*at least 20"):
        sd.img_to_img(init_images, PROMPTS, strength=0.05, num_inference_steps=10, progress=False)


@pytest.mark.parametrize("images,match", [
    (torch.rand(2, 1, SIZE, SIZE), r"expected \(B, 3, H, W\).*3-channel"),
    (torch.rand(2, 4, SIZE, SIZE), r"expected \(B, 3, H, W\)"),
    (torch.rand(3, SIZE, SIZE), r"expected \(B, 3, H, W\)"),
    (torch.rand(2, 3, SIZE + 1, SIZE), "multiples of 2"),
    (torch.rand(3, 3, SIZE, SIZE), "3 init images for 2 prompts; give one image for all prompts, one prompt for all images"),
    (torch.rand(2, 3, SIZE, SIZE) * 2 - 1, r"in \[0, 1\]"),
    (torch.full((2, 3, SIZE, SIZE), math.nan), r"in \[0, 1\]"),
    (torch.randint(0, 255, (2, 3, SIZE, SIZE), dtype=torch.uint8), r"float values in \[0, 1\]"),
])
def test_img_to_img_bad_init_images(sd, images, match):
    with pytest.raises(ValueError, match=match):
        sd.img_to_img(images, PROMPTS, strength=0.5, num_inference_steps=2, progress=False)


def test_img_to_img_bad_init_image_types_and_sizes(sd):
    from PIL import Image
    with pytest.raises(TypeError, match="PIL image, a list of them, or a tensor"):
        sd.img_to_img(np.zeros((SIZE, SIZE, 3)), "a cat", num_inference_steps=2, progress=False)
    with pytest.raises(TypeError, match="PIL image, a list of them, or a tensor"):
        sd.img_to_img([], "a cat", num_inference_steps=2, progress=False)
    odd = [Image.new("RGB", (SIZE, SIZE)), Image.new("RGB", (SIZE, 2 * SIZE))]
    with pytest.raises(ValueError, match="different sizes"):
        sd.img_to_img(odd, PROMPTS, num_inference_steps=2, progress=False)
    with pytest.raises(ValueError, match="multiples of 2"):
        sd.img_to_img(Image.new("RGB", (SIZE + 1, SIZE)), "a cat", num_inference_steps=2, progress=False)
    with pytest.raises(ValueError, match="unknown|expected one of"):
        sd.img_to_img(Image.new("RGB", (SIZE, SIZE)), "a cat", scheduler="euler", num_inference_steps=2, progress=False)
    with pytest.raises(ValueError, match="empty"):
        sd.img_to_img(Image.new("RGB", (SIZE, SIZE)), [], num_inference_steps=2, progress=False)


# the course's own text-to-image models in the same API (offline: MiniLM from its package, the shipped VAEs)
@pytest.fixture(scope="module")
def fmnist_text(tmp_path_factory):
    "A tiny Fashion-MNIST text model trained for a few steps (as in test_conditioning), saved: (model, path)."
    from ldm_course.conditioning import train_conditional
    out = tmp_path_factory.mktemp("course") / "text.safetensors"
    model, _, _ = train_conditional("text", config="tiny-text", epochs=1, n_train=64, batch_size=16, cache=False,
                                    progress=False, out=out)
    return model.eval(), out


@pytest.fixture(scope="module")
def rgb_text(tmp_path_factory):
    """An RGB text model like the emoji one (the shipped emoji VAE, MiniLM, 32×32), with a random v-predicting UNet:
    the pipeline must work for any text model, whatever its channels and prediction type. Saved: (model, path)."""
    from ldm_course.conditioning import ConditionalLatentDiffusion
    from ldm_course.schedules import NoiseSchedule
    from ldm_course.unet import UNet, unet_config
    from ldm_course.vae import load_vae
    torch.manual_seed(0)
    unet = UNet(**unet_config("tiny-text", in_channels=4, out_channels=4, context_dim=384))
    model = ConditionalLatentDiffusion(load_vae("emoji_vae"), unet, NoiseSchedule("cosine"), 0.5, "v_prediction", 32,
                                       "emoji_vae", text_encoder="minilm", max_length=16).eval()
    out = tmp_path_factory.mktemp("rgb") / "rgb.safetensors"
    model.save_pretrained(out, half=False)
    return model, out


def _course_ddim_vs_guided(model, prompts, steps=4, scale=3.0, seed=0):
    from ldm_course.guidance import guided_sample
    pipe = ImageDiffusionModel.from_course(model)
    z = torch.randn(len(prompts), *model.latent_shape, generator=torch.Generator().manual_seed(seed))
    ours = pipe.prompt_to_img(prompts, img_latents=z, scheduler="ddim", num_inference_steps=steps, guidance_scale=scale,
                              output_type="pt", progress=False)
    ref = guided_sample(model, prompts=prompts, guidance_scale=scale, sampler="ddim", steps=steps, x_T=z, progress=False)
    return pipe, ours, ref


@pytest.mark.parametrize("which", ["fmnist_text", "rgb_text"])
def test_course_model_ddim_equals_its_own_guided_sampling(which, request):
    "The pipeline over a course model's parts, DDIM, = notebook 13's guided_sample with DDIM from the same latents."
    model, _ = request.getfixturevalue(which)
    pipe, ours, ref = _course_ddim_vs_guided(model, ["a photo of a bag", "a pair of trousers"])
    c = model.vae.cfg.in_channels
    assert ours.shape == (2, c, 32, 32) and ref.shape == (2, c, 32, 32) and 0 < ref.std()
    assert (ours * 2 - 1 - ref).abs().max() < 1e-4
    assert pipe.use_attention_mask and pipe.image_size == 32 and pipe.vae_scale_factor == 4


def test_course_model_from_a_saved_file_and_pil_modes(fmnist_text, rgb_text):
    from ldm_course.pipeline import course_model_parts
    for (model, path), mode in ((fmnist_text, "L"), (rgb_text, "RGB")):
        loaded = ImageDiffusionModel.from_course(path)
        kw = dict(num_inference_steps=3, guidance_scale=2.0, seed=4, progress=False)
        pil = loaded.prompt_to_img(["a bag", "a hat"], **kw)
        assert [im.mode for im in pil] == [mode, mode] and pil[0].size == (32, 32)
        a = loaded.prompt_to_img(["a bag", "a hat"], output_type="pt", **kw)
        b = ImageDiffusionModel.from_course(model).prompt_to_img(["a bag", "a hat"], output_type="pt", **kw)
        assert (a - b).abs().max() < 0.02          # the trained model's file holds float16 weights
        parts = course_model_parts(model)
        assert parts["tokenizer"].model_max_length == model.max_length and parts["scaling_factor"] == model.scale_factor
        for sched in (parts["scheduler_LMS"], parts["scheduler_DDIM"]):
            assert sched.config.prediction_type == model.prediction_type
            torch.testing.assert_close(sched.alphas_cumprod, model.schedule.alphas_cumprod, rtol=1e-6, atol=1e-7)


def test_course_mask_reaches_the_text_encoder_and_the_unet(fmnist_text):
    model, _ = fmnist_text
    pipe = ImageDiffusionModel.from_course(model)
    embeds, mask = pipe.get_text_embeds(["a photo of a bag", ""], return_mask=True)
    ctx, ctx_mask = model.text_encoder(["a photo of a bag", ""])          # the states the UNet was trained on
    torch.testing.assert_close(embeds, ctx, rtol=1e-5, atol=1e-5)
    assert torch.equal(mask, ctx_mask) and mask.shape == (2, model.max_length) and mask[1].sum() == 2   # [CLS] [SEP]
    e2, m2 = pipe.get_prompt_embeds("a photo of a bag", return_mask=True)
    assert e2.shape == (2, model.max_length, 384) and torch.equal(m2, mask.flip(0))       # unconditional first
    x, t = torch.randn(2, 4, 8, 8), torch.tensor(500)
    with torch.no_grad():
        assert (pipe.predict_noise(x, t, e2, m2) - pipe.predict_noise(x, t, e2)).abs().max() > 1e-4   # the mask matters


def test_sd_parts_pass_no_mask(sd):
    embeds, mask = sd.get_prompt_embeds(PROMPTS, return_mask=True)
    assert mask is None and embeds.shape == (4, sd.tokenizer.model_max_length, 32)


def test_course_schedulers_run_the_course_ddim():
    from ldm_course.pipeline import course_schedulers
    from ldm_course.samplers import spaced_timesteps
    from ldm_course.schedules import NoiseSchedule
    lms, ddim = course_schedulers(NoiseSchedule("linear"))
    cfg = ddim.config
    assert (cfg.beta_schedule, cfg.beta_start, cfg.beta_end, cfg.num_train_timesteps) == ("linear", 1e-4, 0.02, 1000)
    assert (cfg.set_alpha_to_one, cfg.steps_offset, cfg.clip_sample, cfg.timestep_spacing) == (True, 0, False, "leading")
    ddim.set_timesteps(50)
    assert ddim.timesteps.tolist() == spaced_timesteps(1000, 50, "leading").tolist()     # 980 … 0
    lms.set_timesteps(50)
    assert float(lms.timesteps[0]) == 999 and 150 < float(lms.init_noise_sigma) < 160   # σ_max of the linear schedule
    with pytest.raises(ValueError, match="zero-terminal-SNR"):
        course_schedulers(NoiseSchedule("linear", rescale_zero_terminal_snr=True))


def test_shipped_fmnist_text_model_in_the_pipeline():
    pipe = ImageDiffusionModel.from_course("fmnist_latent_text")
    assert (pipe.image_size, pipe.size_multiple, pipe.image_channels, pipe.latent_channels) == (32, 16, 1, 4)
    with pytest.raises(ValueError, match="multiples of 16: the VAE downsamples by 4 and the UNet by 4 more"):
        pipe.prompt_to_img("a bag", height=24, width=24, num_inference_steps=1, progress=False)
    img = pipe.prompt_to_img("a photo of a sneaker", num_inference_steps=2, seed=0, output_type="pt", progress=False)
    assert img.shape == (1, 1, 32, 32) and 0 <= img.min() and img.max() <= 1


def test_course_model_img_to_img(fmnist_text):
    from PIL import Image
    model, _ = fmnist_text
    pipe = ImageDiffusionModel.from_course(model)
    grey = torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    out = pipe.img_to_img(grey, ["a dress", "a bag"], strength=0.5, num_inference_steps=4, seed=0, output_type="pt", progress=False)
    assert out.shape == (2, 1, 32, 32)
    rgb = Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype("uint8"))   # converted to grey
    assert pipe.img_to_img(rgb, "a dress", strength=0.5, num_inference_steps=4, seed=0, progress=False)[0].mode == "L"
    with pytest.raises(ValueError, match=r"expected \(B, 1, H, W\)"):
        pipe.img_to_img(torch.rand(1, 3, 32, 32), "a dress", num_inference_steps=2, progress=False)
    with pytest.raises(ValueError, match="multiples of 8.*UNet by 2 more"):       # the tiny UNet: 2 levels
        pipe.img_to_img(torch.rand(1, 1, 20, 20), "a dress", num_inference_steps=2, progress=False)


# bad input for the course's models
def test_unknown_course_model_name():
    with pytest.raises(FileNotFoundError, match="fmnist_latent_text"):
        ImageDiffusionModel.from_course("no_such_model")


def test_class_conditional_course_model_is_refused():
    with pytest.raises(ValueError, match="class-conditional.*text-conditional"):
        ImageDiffusionModel.from_course("fmnist_latent_class")


def test_from_course_needs_a_conditional_model(sd):
    with pytest.raises(TypeError, match="ConditionalLatentDiffusion"):
        ImageDiffusionModel.from_course(sd.unet)


@pytest.mark.parametrize("height,width", [(20, 32), (32, 36), (4, 4), (0, 32)])
def test_course_model_sizes_must_fit_vae_and_unet(fmnist_text, height, width):
    pipe = ImageDiffusionModel.from_course(fmnist_text[0])      # VAE f = 4, a 2-level UNet halves once more
    with pytest.raises(ValueError, match=r"multiples of 8: the VAE downsamples by 4 and the UNet by 2 more .*native size is 32×32"):
        pipe.prompt_to_img("a bag", height=height, width=width, num_inference_steps=1, progress=False)


def test_course_model_latent_batch_must_match_the_prompts(fmnist_text):
    pipe = ImageDiffusionModel.from_course(fmnist_text[0])
    with pytest.raises(ValueError, match=r"expected \(2, 4, 8, 8\).*number of prompts"):
        pipe.prompt_to_img(["a bag", "a hat"], img_latents=torch.randn(3, 4, 8, 8), num_inference_steps=1, progress=False)
    with pytest.raises(ValueError, match="empty"):
        pipe.prompt_to_img([], num_inference_steps=1, progress=False)


def test_no_default_size_without_image_size(parts):
    from ldm_course.pipeline import to_course_parts
    course = ImageDiffusionModel(**to_course_parts(parts))       # the course UNet has no sample_size to read
    with pytest.raises(ValueError, match="give height and width"):
        course.prompt_to_img("a cat", num_inference_steps=1, progress=False)
    assert ImageDiffusionModel(**parts).image_size == 32        # diffusers' UNet: sample_size 16 × the VAE's 2
