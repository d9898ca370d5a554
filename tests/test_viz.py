"""The explorer and the visualisations (notebook 16): one Drawer over every kind of shipped model, slerp, prompt
interpolation, denoising paths and latent trajectories."""
import pytest
import torch

from ldm_course.viz import (Drawer, denoising_gif, denoising_strip, explore, explorer, latent_trajectories, load_drawer,
                            model_kind, noise_path, plot_trajectories, prompt_path, shipped_models, slerp)


def test_shipped_models_and_kinds():
    kinds = shipped_models()
    assert kinds["fmnist_ddpm"] == "pixel" and kinds["fmnist_latent"] == "latent"
    assert kinds["fmnist_latent_class"] == "class" and kinds["fmnist_latent_text"] == "text"
    assert "fmnist_vae" not in kinds and "fmnist_classifier" not in kinds
    assert model_kind({"class": "VAE"}) is None
    with pytest.raises(ValueError, match="not a model that draws"): load_drawer("fmnist_classifier")
    with pytest.raises(FileNotFoundError): load_drawer("no_such_model")


@pytest.mark.parametrize("name,cond,shape", [("fmnist_ddpm", None, (2, 1, 32, 32)), ("fmnist_latent", None, (2, 1, 32, 32)),
                                             ("fmnist_latent_class", "Bag", (2, 1, 32, 32)),
                                             ("fmnist_latent_text", "a photo of a bag", (2, 1, 32, 32))])
def test_every_kind_draws_images_and_a_path(name, cond, shape):
    d = load_drawer(name)
    x, path = d.draw(2, cond, guidance=2.0, sampler="ddim", steps=3, seed=0)
    assert x.shape == shape and path.shape == (3, *shape) and x.min() >= -1 and x.max() <= 1
    x2, _ = d.draw(2, cond, guidance=2.0, sampler="ddim", steps=3, seed=0)
    assert torch.equal(x, x2)     # DDIM from the same seed: the same images


def test_conditions_are_checked():
    with pytest.raises(ValueError, match="unconditional"): load_drawer("fmnist_latent").draw(1, "Bag", steps=2)
    with pytest.raises(ValueError, match="unknown class name"): load_drawer("fmnist_latent_class").draw(1, "Bags", steps=2)


def test_slerp_keeps_the_norm_and_ends_at_both_points():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 8, 8, generator=g), torch.randn(4, 8, 8, generator=g)
    path = noise_path(a, b, 5)
    assert torch.allclose(path[0], a, atol=1e-5) and torch.allclose(path[-1], b, atol=1e-4)
    norms = path.flatten(1).norm(dim=1)
    lo, hi = min(a.norm(), b.norm()), max(a.norm(), b.norm())
    assert (norms >= 0.98 * lo).all() and (norms <= 1.02 * hi).all()   # slerp stays on the Gaussian's shell
    straight = noise_path(a, b, 5, spherical=False)
    assert straight[2].norm() < 0.85 * (a.norm() + b.norm()) / 2   # the straight line's midpoint is too short (≈ 0.71)
    assert torch.allclose(slerp(a, a, 0.3), a)           # parallel: no division by sin(0)
    with pytest.raises(ValueError, match="one shape"): slerp(a, b[:2], 0.5)
    with pytest.raises(ValueError, match="n must be"): noise_path(a, b, 1)


def test_prompt_path_and_trajectories(tmp_path):
    d = load_drawer("fmnist_latent_text")
    strip = prompt_path(d.model, "a bag", "a sneaker", 3, steps=2)
    assert strip.shape == (3, 1, 32, 32)
    with pytest.raises(ValueError, match="text-conditional"): prompt_path(load_drawer("fmnist_latent_class").model, "a", "b")
    frames, idx = denoising_strip(torch.zeros(10, 2, 1, 4, 4), 4)
    assert idx[0] == 0 and idx[-1] == 9 and frames.shape == (4, 2, 1, 4, 4)
    assert denoising_gif(torch.zeros(3, 2, 1, 8, 8), tmp_path / "p.gif").stat().st_size > 0
    traj = latent_trajectories(load_drawer("fmnist_latent_class"), ["Bag", "Sneaker"], n_per_class=2, steps=3)
    assert traj["x_t"].shape == (4, 4, 4 * 8 * 8) and traj["labels"].tolist() == [0, 0, 1, 1]
    plot_trajectories(traj)
    with pytest.raises(ValueError, match="class-conditional"): latent_trajectories(d, ["a"])


def test_explore_figure_and_the_panel():
    fig = explore("fmnist_latent_class", "Coat", sampler="ddim", steps=3, n=2, frames=3)
    assert len(fig.axes) >= 6
    panel = explorer(["fmnist_latent_class", "fmnist_latent_text"])
    assert panel.children and len(panel.children) == 4
    with pytest.raises(ValueError, match="unknown model"): explorer(["nope"])
