"""ldm_course.unet: shapes, conditioning, bad input, checkpointing, presets, save/load, the diffusers twin."""
import pytest
import torch

from ldm_course.unet import (UNET_CONFIGS, UNet, bench_unet, count_params, diffusers_unet, diffusers_unet_state,
                             format_bench, unet_config)

SMALL = dict(block_out_channels=(16, 32), layers_per_block=1, attention_levels=(False, True), num_heads=2, norm_groups=8)


def _x(b=2, c=1, s=16): return torch.randn(b, c, s, s, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("extra", [{}, {"num_classes": 5}, {"context_dim": 12}, {"in_channels": 3, "out_channels": 6}])
def test_shapes_and_every_parameter_gets_gradient(extra):
    torch.manual_seed(0)
    m = UNet(**{**SMALL, **extra})
    x = _x(c=m.in_channels)
    kw = {"context": torch.randn(2, 4, 12)} if "context_dim" in extra else {}
    if "num_classes" in extra: kw["class_labels"] = torch.tensor([0, 4])
    y = m(x, torch.tensor([3, 700]), **kw)
    assert y.shape == (2, m.out_channels, 16, 16)
    y.square().mean().backward()
    assert [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0] == []


def test_four_levels_and_head_dim():
    m = UNet(block_out_channels=(16, 32, 32, 64), attention_levels=(False, False, True, True), head_dim=8,
             norm_groups=8, layers_per_block=1)
    assert m(_x(1, 1, 32), 5).shape == (1, 1, 32, 32)


def test_timesteps_and_null_class():
    m = UNet(**SMALL, num_classes=3).eval()
    x = _x()
    with torch.no_grad():
        ref = m(x, torch.tensor([9, 9]))
        assert torch.equal(m(x, 9), ref)                                 # scalar broadcast
        torch.testing.assert_close(m(x, torch.tensor([9.0, 9.0])), ref)  # float timesteps accepted
        assert torch.equal(ref, m(x, torch.tensor([9, 9]), torch.tensor([3, 3])))  # None = null class 3
        assert not torch.allclose(ref, m(x, 9, torch.tensor([0, 1])))
    assert m.class_embedding.num_embeddings == 4


def test_context_mask_hides_tokens():
    torch.manual_seed(0)
    m = UNet(**SMALL, context_dim=8).eval()
    x, ctx = _x(), torch.randn(2, 5, 8)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    ctx2 = ctx.clone(); ctx2[1, 3:] = 50.0
    with torch.no_grad():
        a, b = m(x, 1, context=ctx, context_mask=mask), m(x, 1, context=ctx2, context_mask=mask)
        c = m(x, 1, context=ctx2)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert (a - c).abs().max() > 1e-4


@pytest.mark.parametrize("call,msg", [
    (lambda m, mc, mx: m(torch.randn(2, 2, 16, 16), 1), r"expects x of shape \(B, 1, H, W\); got shape \(2, 2, 16, 16\)"),
    (lambda m, mc, mx: m(torch.randn(16, 16), 1), r"got shape \(16, 16\)"),
    (lambda m, mc, mx: m(torch.randn(2, 1, 17, 16), 1), r"divisible by 2; got 17×16"),
    (lambda m, mc, mx: m(_x(), torch.tensor([1, 2, 3])), r"\(B,\) = \(2,\); got shape \(3,\)"),
    (lambda m, mc, mx: m(_x(), torch.ones(2, 1)), r"got shape \(2, 1\)"),
    (lambda m, mc, mx: m(_x(), torch.tensor([True, True])), r"dtype torch.bool"),
    (lambda m, mc, mx: m(_x(), 1, class_labels=torch.tensor([0, 1])), r"num_classes=None"),
    (lambda m, mc, mx: mc(_x(), 1, class_labels=torch.tensor([0, 4])), r"in \[0, 3\] \(3 = null class\); got values in \[0, 4\]"),
    (lambda m, mc, mx: mc(_x(), 1, class_labels=torch.tensor([-1, 0])), r"got values in \[-1, 0\]"),
    (lambda m, mc, mx: mc(_x(), 1, class_labels=torch.tensor([0.5, 1.0])), r"must be integers"),
    (lambda m, mc, mx: mx(_x(), 1, context=torch.randn(2, 3, 16)), r"context has last dim 16, UNet expects context_dim=8"),
    (lambda m, mc, mx: mx(_x(), 1), r"needs context \(B, M, 8\); got None"),
    (lambda m, mc, mx: mx(_x(), 1, context=torch.randn(2, 8)), r"shape \(B=2, M, 8\); got \(2, 8\)"),
    (lambda m, mc, mx: mx(_x(), 1, context=torch.randn(2, 3, 8), context_mask=torch.ones(2, 4, dtype=torch.bool)),
     r"bool of shape \(B, M\) = \(2, 3\)"),
    (lambda m, mc, mx: mx(_x(), 1, context=torch.randn(2, 3, 8), context_mask=torch.ones(2, 3)),
     r"context_mask must be bool of shape \(B, M\) = \(2, 3\); got torch.float32"),
    (lambda m, mc, mx: m(_x(), 1, context=torch.randn(2, 3, 8)), r"context_dim=None"),
    (lambda m, mc, mx: mc(_x(), 1, class_labels=torch.tensor([0, 1, 2])), r"\(B,\) = \(2,\); got \(3,\)"),
    (lambda m, mc, mx: mc(_x(), 1, class_labels=torch.tensor([True, False])), r"must be integers; got dtype torch.bool"),
])
def test_bad_input_names_expected_and_received(call, msg):
    m, mc, mx = UNet(**SMALL), UNet(**SMALL, num_classes=3), UNet(**SMALL, context_dim=8)
    with pytest.raises(ValueError, match=msg):
        call(m, mc, mx)


def test_bad_construction():
    with pytest.raises(ValueError, match=r"attention_levels has 3 entries; expected one per level \(2\)"):
        UNet(block_out_channels=(16, 32), attention_levels=(False, True, True), norm_groups=8)
    with pytest.raises(ValueError, match=r"attention_levels has 1 entries; expected one per level \(2\)"):
        UNet(block_out_channels=(32, 64), attention_levels=(True,))
    with pytest.raises(ValueError, match="need at least one level and layers_per_block >= 1"):
        UNet(**{**SMALL, "layers_per_block": 0})
    with pytest.raises(ValueError, match="num_classes must be a positive int or None; got 0"):
        UNet(**SMALL, num_classes=0)
    with pytest.raises(ValueError, match="attention level with 32 channels is not divisible by num_heads=3"):
        UNet(**{**SMALL, "num_heads": 3})
    with pytest.raises(ValueError, match="not divisible by norm_groups=32"):
        UNet(block_out_channels=(16, 32), attention_levels=(False, True))


def test_gradient_checkpointing_same_gradients():
    torch.manual_seed(0)
    m = UNet(**SMALL, dropout=0.2, num_classes=3, context_dim=8).train()
    x, ctx = _x(), torch.randn(2, 3, 8)

    def grads():
        m.zero_grad(); torch.manual_seed(1)
        m(x, torch.tensor([5, 500]), torch.tensor([0, 2]), context=ctx).square().mean().backward()
        return [p.grad.clone() for p in m.parameters()]

    plain = grads()
    m.gradient_checkpointing = True
    ckpt = grads()
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("form", ["folder", "file"])
def test_save_load_round_trip(tmp_path, form):
    m = UNet(**SMALL, num_classes=4, context_dim=8).eval()
    path = tmp_path / ("unet" if form == "folder" else "unet.safetensors")
    m.save_pretrained(path)
    files = sorted(p.name for p in (path if form == "folder" else tmp_path).iterdir())
    assert files == (["config.json", "model.safetensors"] if form == "folder" else ["unet.json", "unet.safetensors"])
    m2 = UNet.from_pretrained(path)
    assert m2.config == m.config
    x, ctx = _x(), torch.randn(2, 3, 8)
    with torch.no_grad():
        assert torch.equal(m(x, 7, 1, context=ctx), m2(x, 7, 1, context=ctx))


def test_mini_is_the_shipped_architecture():
    "The shipped DDPM's UNet is the `mini` preset (notebook 05 draws it and rebuilds it in 40 lines)."
    import json
    from ldm_course.files import weights_dir
    from ldm_course.ddpm import SHIPPED_DDPM
    cfg = json.loads((weights_dir() / f"{SHIPPED_DDPM}.json").read_text())["config"]
    assert cfg == unet_config("mini")


def test_presets():
    assert {"tiny", "small", "base", "small-class", "small-text"} <= set(UNET_CONFIGS)
    for name in UNET_CONFIGS:
        cfg = unet_config(name)
        assert set(cfg) >= {"block_out_channels", "attention_levels", "num_classes", "context_dim"}
    n = count_params(UNet(**unet_config("small")))
    assert 2e6 <= n <= 3.2e6 and 4 * n <= 12.5 * 2**20         # ships as <= ~12 MB fp32
    assert unet_config("small", in_channels=3)["in_channels"] == 3
    with pytest.raises(ValueError, match="unknown UNet config 'nope'"):
        unet_config("nope")
    with pytest.raises(ValueError, match=r"unknown UNet arguments \['width'\]"):
        unet_config("small", width=3)


@pytest.mark.parametrize("name", ["tiny", "tiny-class", "tiny-text", "small", "small-text"])
def test_diffusers_twin_has_same_parameter_count(name):
    cfg = unet_config(name)
    assert count_params(UNet(**cfg)) == count_params(diffusers_unet(cfg))


@pytest.mark.parametrize("name", ["tiny", "tiny-class", "tiny-text"])
def test_equals_diffusers_after_weight_copy(name):
    "Our UNet and diffusers' UNet2DConditionModel of the same config compute the same function (float64)."
    cfg = unet_config(name, block_out_channels=[16, 32, 32], attention_levels=[False, True, False], layers_per_block=2)
    torch.manual_seed(0)
    ours, ref = UNet(**cfg).double().eval(), diffusers_unet(cfg).double().eval()
    ref.load_state_dict(diffusers_unet_state(ours.state_dict()), strict=True)
    x, t = torch.randn(2, 1, 16, 16, dtype=torch.float64), torch.tensor([0, 999])
    ko, kr = {}, {"encoder_hidden_states": torch.zeros(2, 1, 8, dtype=torch.float64)}
    if cfg["num_classes"]: ko["class_labels"] = kr["class_labels"] = torch.tensor([2, 10])
    if cfg["context_dim"]:
        c, m = torch.randn(2, 4, cfg["context_dim"], dtype=torch.float64), torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]]).bool()
        ko.update(context=c, context_mask=m); kr.update(encoder_hidden_states=c, encoder_attention_mask=m)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, **ko), ref(x, t, **kr).sample, atol=1e-10, rtol=0)


def test_channels_last_gives_same_output():
    m = UNet(**SMALL, context_dim=8).eval()
    x, ctx = _x(), torch.randn(2, 3, 8)
    with torch.no_grad():
        a = m(x, 5, context=ctx)
        m = m.to(memory_format=torch.channels_last)
        b = m(x.contiguous(memory_format=torch.channels_last), 5, context=ctx)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_bench_runs_and_formats(tmp_path):
    rows = bench_unet("tiny", batch_sizes=(1,), device="cpu", repeats=1, warmup=0, verbose=False,
                      json_path=tmp_path / "bench.json", size=16)
    assert [r["mode"] for r in rows] == ["forward", "forward+backward"]
    assert all(r["ours_ms"] > 0 and r["diffusers_ms"] > 0 and r["ours_params"] == r["diffusers_params"] for r in rows)
    assert (tmp_path / "bench.json").is_file()
    table = format_bench(rows)
    assert table.startswith("| config") and table.count("\n") == 3


def test_non_finite_timesteps_raise():
    from ldm_course.unet import UNet, unet_config
    m = UNet(**unet_config("tiny"))
    with pytest.raises(ValueError, match="NaN or infinite timesteps"):
        m(torch.zeros(2, 1, 32, 32), torch.tensor([1.0, float("nan")]))


def _sd_unet(chans, attn, heads=2, layers=1, cross=16, groups=8, seed=0, **kw):
    "A small random `UNet2DConditionModel` of the Stable Diffusion family, its weights moved off their initial values."
    from diffusers import UNet2DConditionModel
    torch.manual_seed(seed)
    d = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, block_out_channels=chans,
                             down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
                             up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
                             layers_per_block=layers, cross_attention_dim=cross, attention_head_dim=heads,
                             norm_num_groups=groups, **kw).eval()
    with torch.no_grad():   # GroupNorm weights of one and zero biases would hide a misplaced tensor
        for p in d.parameters(): p.add_(torch.randn_like(p) * 0.05)
    return d


@pytest.mark.parametrize("chans,attn,kw", [
    ((32, 64), (False, True), {}),
    ((32, 64), (True, False), dict(layers=2, cross=32)),
    ((32, 64, 64), (True, True, False), dict(heads=[2, 4, 4], layers=2, cross=32, groups=16)),
    ((32, 32, 64, 64), (True, True, True, False), dict(heads=8, cross=32, groups=32)),       # SD 1.x pattern
    ((32, 32, 64, 64), (True, True, True, False), dict(heads=[1, 2, 4, 8], layers=2, cross=16, groups=16)),
    ((32, 64), (True, True), dict(heads=[1, 2], use_linear_projection=True)),                 # SD 2.x projections
    ((32, 64), (False, True), dict(resnet_time_scale_shift="scale_shift", norm_eps=1e-6, dropout=0.1)),
])
def test_from_diffusers_equals_unet2dconditionmodel(chans, attn, kw):
    ref = _sd_unet(chans, attn, **kw)
    ours = UNet.from_diffusers(ref)
    assert ours.config["attention_levels"] == list(attn) and ours.config["context_dim"] == kw.get("cross", 16)
    assert count_params(ours) == count_params(ref)
    g = torch.Generator().manual_seed(1)
    x, t, c = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([3, 871]), torch.randn(2, 5, kw.get("cross", 16), generator=g)
    with torch.no_grad():
        out = ours(x, t, context=c, context_mask=None)
        diff = (out - ref(x, t, encoder_hidden_states=c).sample).abs().max().item()
        assert (out - ours(x, t, context=c.flip(0))).abs().max() > 1e-3      # the context matters
    print(f"{chans} {attn} {kw}: max |ours - diffusers| = {diff:.1e}")
    assert diff <= 1e-4


@pytest.mark.parametrize("name", ["tiny-text", "tiny-class", "tiny"])
def test_from_diffusers_round_trip(name):
    "Ours → diffusers_unet (weights copied) → UNet.from_diffusers gives back the same config and function."
    cfg = unet_config(name, dropout=0.0)
    torch.manual_seed(0)
    ours = UNet(**cfg).eval()
    ref = diffusers_unet(cfg).eval()
    ref.load_state_dict(diffusers_unet_state(ours.state_dict()), strict=True)
    back = UNet.from_diffusers(ref)
    assert back.config == ours.config
    x, kw = _x(c=1, s=32), {}
    if cfg["context_dim"]: kw["context"] = torch.randn(2, 4, cfg["context_dim"])
    if cfg["num_classes"]: kw["class_labels"] = torch.tensor([1, 10])
    with torch.no_grad():
        assert (back(x, torch.tensor([5, 500]), **kw) - ours(x, torch.tensor([5, 500]), **kw)).abs().max() <= 1e-6


@pytest.mark.parametrize("kw,msg", [
    (dict(upcast_attention=True), "upcast_attention=True"),
    (dict(only_cross_attention=True), "only_cross_attention=True"),
    (dict(transformer_layers_per_block=2), "transformer_layers_per_block=2"),
    (dict(flip_sin_to_cos=False), "flip_sin_to_cos=False; supported: True"),
    (dict(center_input_sample=True), "center_input_sample=True"),
    (dict(class_embed_type="timestep"), "class_embed_type='timestep'; supported: None"),
    (dict(time_cond_proj_dim=8), "time_cond_proj_dim=8"),
    (dict(conv_in_kernel=5), "conv_in_kernel=5; supported: 3"),
    (dict(down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D")),
     r"down_block_types=\['DownBlock2D', 'AttnDownBlock2D'\]; supported: CrossAttnDownBlock2D / DownBlock2D"),
    (dict(up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D")), r"up_block_types=.*the mirror of down_block_types"),
    (dict(layers_per_block=(1, 2)), r"layers_per_block=\(1, 2\); supported: the same number at every level"),
])
def test_from_diffusers_refuses_other_families(kw, msg):
    from diffusers import UNet2DConditionModel
    base = dict(block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=16, attention_head_dim=2,
                layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
    model = UNet2DConditionModel(**{**base, **kw})
    with pytest.raises(ValueError, match="UNet.from_diffusers does not support " + msg):
        UNet.from_diffusers(model)


def test_from_diffusers_needs_a_unet2dconditionmodel():
    with pytest.raises(ValueError, match="expects a diffusers UNet2DConditionModel; got Linear"):
        UNet.from_diffusers(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="got UNet"):
        UNet.from_diffusers(UNet(**SMALL))


def test_sd_options_in_config_only_when_set(tmp_path):
    "`time_embedding_norm`, `norm_eps` and per-level heads: saved and loaded; absent from configs that keep the defaults."
    m = UNet(**SMALL)
    assert "time_embedding_norm" not in m.config and "norm_eps" not in m.config
    assert "time_embedding_norm" not in unet_config("tiny")
    m = UNet(**{**SMALL, "num_heads": [1, 4]}, time_embedding_norm="default", norm_eps=1e-6, context_dim=8).eval()
    assert m.config["time_embedding_norm"] == "default" and m.config["norm_eps"] == 1e-6 and m.config["num_heads"] == [1, 4]
    assert m.mid_block.attentions[0].transformer_blocks[0].attn1.num_heads == 4
    assert m.down_blocks[0].resnets[0].emb_proj.out_features == 16
    m.save_pretrained(tmp_path / "u")
    m2 = UNet.from_pretrained(tmp_path / "u")
    assert m2.config == m.config
    x, c = _x(), torch.randn(2, 3, 8)
    with torch.no_grad(): assert torch.equal(m(x, 7, context=c), m2(x, 7, context=c))
    with pytest.raises(ValueError, match=r"num_heads has 3 entries; expected one per level \(2\)"):
        UNet(**{**SMALL, "num_heads": [1, 2, 4]})
    with pytest.raises(ValueError, match="attention level with 32 channels is not divisible by num_heads=3"):
        UNet(**{**SMALL, "num_heads": [2, 3]})
    with pytest.raises(ValueError, match="expected 'scale_shift' or 'default'"):
        UNet(**SMALL, time_embedding_norm="ada_group")
