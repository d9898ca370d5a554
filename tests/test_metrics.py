"""ldm_course.metrics: FID against a direct scipy computation, KID unbiasedness, monotonic response to a shift,
input validation, FIDScorer caching, and the shipped Fashion-MNIST classifier (accuracy only with the real data)."""
import json

import numpy as np
import pytest
import scipy.linalg
import torch

from ldm_course.data import load_dataset, to_float
from ldm_course.metrics import (FIDScorer, ResNetClassifier, classifier_accuracy, default_classifier_path, extract_features,
                                feature_stats, fid_from_features, fid_from_stats, kid_from_features,
                                load_fid_classifier, polynomial_mmd2, train_fid_classifier)


def _gauss(n, d, seed, shift=0.0, mix=False):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    if mix: x = x @ rng.standard_normal((d, d))
    return x + shift


def test_fid_identical_is_zero():
    x = _gauss(300, 16, 0, mix=True)
    assert abs(fid_from_features(x, x)) < 1e-6
    assert abs(fid_from_features(x, x, method="sqrtm")) < 1e-6


def test_fid_matches_direct_sqrtm():
    a, b = _gauss(400, 24, 1, mix=True), _gauss(300, 24, 2) * 1.3 + 0.2
    m1, s1, m2, s2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    direct = ((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert fid_from_features(a, b) == pytest.approx(direct, rel=1e-6)
    assert fid_from_features(torch.from_numpy(a), torch.from_numpy(b), method="sqrtm") == pytest.approx(direct, rel=1e-6)


def test_fid_closed_form_diagonal():
    # diagonal covariances: FID = |mu1 - mu2|^2 + sum (sd1 - sd2)^2
    sd1, sd2 = np.array([1.0, 2.0, 0.5]), np.array([1.5, 1.0, 0.5])
    fid = fid_from_stats(np.zeros(3), np.diag(sd1**2), np.array([1.0, 0, -2]), np.diag(sd2**2))
    assert fid == pytest.approx(5.0 + 0.25 + 1.0, abs=1e-9)


def test_fid_and_kid_grow_with_shift():
    base, other = _gauss(1000, 16, 3), _gauss(1000, 16, 4)
    shifts = [0.0, 0.1, 0.2, 0.4, 0.8]
    fids = [fid_from_features(base, other + s) for s in shifts]
    kids = [kid_from_features(base, other + s, subset_size=500, subsets=10)[0] for s in shifts]
    assert all(x < y for x, y in zip(fids, fids[1:])), fids
    assert all(x < y for x, y in zip(kids, kids[1:])), kids
    assert fids[-1] == pytest.approx(16 * 0.8**2, rel=0.15)  # E[FID] ≈ d·δ² (+ a small finite-sample term)


def test_kid_unbiased():
    # Two independent samples of one distribution: E[MMD²_u] = 0 exactly. Average many estimates and require the
    # mean within 4 standard errors of 0 (a correct estimator fails with probability < 1e-4); FID is biased (> 0).
    rng = np.random.default_rng(0)
    draws = 300
    est = np.array([polynomial_mmd2(rng.standard_normal((40, 8)), rng.standard_normal((40, 8))) for _ in range(draws)])
    se = est.std() / np.sqrt(draws)
    assert abs(est.mean()) < 4 * se, (est.mean(), se)
    assert (est < 0).any()  # unbiased estimates of a zero quantity straddle 0
    assert fid_from_features(rng.standard_normal((40, 8)), rng.standard_normal((40, 8))) > 0


def test_kid_reproducible_and_shapes():
    a, b = _gauss(120, 8, 5), _gauss(90, 8, 6, shift=0.3)
    k1, k2 = kid_from_features(a, b, subset_size=50, subsets=5, seed=1), kid_from_features(a, b, subset_size=50, subsets=5, seed=1)
    assert k1 == k2 and len(k1) == 2 and k1[1] >= 0


def test_validation_errors():
    a = _gauss(50, 8, 7)
    with pytest.raises(ValueError, match="at least 2 samples, got 1"):
        fid_from_features(a[:1], a)
    with pytest.raises(ValueError, match="same D"):
        fid_from_features(a, a[:, :4])
    with pytest.raises(ValueError, match="features must be"):
        feature_stats(np.zeros(5))
    with pytest.raises(ValueError, match="feature dims differ"):
        fid_from_stats(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="expected 'eigh' or 'sqrtm'"):
        fid_from_features(a, a, method="svd")
    with pytest.raises(ValueError, match="at least 2 samples"):
        kid_from_features(a[:1], a)
    model = ResNetClassifier(1, 10, (8, 16))
    with pytest.raises(ValueError, match=r"expected images \(N, 1, H, W\)"):
        extract_features(model, torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError, match="to_float"):
        extract_features(model, torch.full((2, 1, 32, 32), 200.0))
    with pytest.raises(ValueError, match="NaN"):
        extract_features(model, torch.full((2, 1, 32, 32), float("nan")))


def test_extract_features_shapes_and_uint8():
    model = ResNetClassifier(1, 10, (8, 16)).eval()
    x = torch.randint(0, 256, (10, 1, 32, 32), dtype=torch.uint8)
    f = extract_features(model, x, batch_size=3)
    assert f.shape == (10, 16) and f.dtype == torch.float64
    assert torch.allclose(f, extract_features(model, to_float(x)), atol=1e-5)


def test_scorer_with_given_images_and_classifier():
    torch.manual_seed(0)
    model = ResNetClassifier(1, 10, (8, 16)).eval()
    real = torch.rand(64, 1, 32, 32) * 2 - 1
    scorer = FIDScorer(real, classifier=model, n_real=48)
    assert scorer.n_real == 48 and scorer.real_features.shape == (48, 16)
    r = scorer.score(real[:40], subset_size=20, subsets=5)
    assert set(r) == {"fid", "kid", "kid_std", "n_fake", "n_real"} and r["n_fake"] == 40
    assert r["fid"] == pytest.approx(scorer.fid(real[:40]))
    assert r["kid"] == pytest.approx(scorer.kid(real[:40], subset_size=20, subsets=5)[0])
    with pytest.raises(ValueError, match=r"real images \(1, 32, 32\)"):
        scorer.fid(torch.zeros(8, 1, 28, 28))
    assert FIDScorer(real, classifier=model).n_real == 64  # given images: all of them by default
    with pytest.raises(ValueError, match="n_real must be"):
        FIDScorer(real, classifier=model, n_real=1)


def test_load_missing_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="train them with"):
        load_fid_classifier(tmp_path / "nope.safetensors")


def test_train_fid_classifier_smoke(tmp_path, monkeypatch):
    # a tiny registered dataset keeps this fast and independent of which real data is on the machine
    import ldm_course.data as data
    g = torch.Generator().manual_seed(0)
    tiny = data.ImageDataset(torch.randint(0, 256, (96, 1, 32, 32), dtype=torch.uint8, generator=g),
                             torch.randint(0, 10, (96,), generator=g), data.DIGITS, name="tiny")
    monkeypatch.setitem(data.DATASETS, "tiny", data.DatasetSpec("tiny", "random test images", data.DIGITS,
                                                                lambda base, split: tiny))
    monkeypatch.setenv("LDM_COURSE_SCALE", "ci")
    out = tmp_path / "clf.safetensors"
    model, info = train_fid_classifier(out, epochs=1, dataset="tiny", n_train=64, n_test=64, channels=(8,), progress=False)
    saved = json.loads(out.with_suffix(".json").read_text())
    for key in ("test_accuracy", "epochs", "train_seconds", "hardware", "command", "date", "n_test"):
        assert key in saved
    assert saved["n_test"] == 64 and saved["epochs"] == 1 and saved["dataset"] == "tiny" and saved["n_train"] == 64
    assert isinstance(load_fid_classifier(out), ResNetClassifier)
    with pytest.raises(ValueError, match=".safetensors"):
        train_fid_classifier(tmp_path / "clf.pt")


def test_shipped_classifier_loads():
    path = default_classifier_path()
    assert path.is_file() and path.stat().st_size < 2_000_000
    info = ResNetClassifier.read_info(path)
    assert info["dataset"] == "fashion_mnist" and info["n_test"] == 10_000 and info["test_accuracy"] >= 0.92
    model = load_fid_classifier()
    assert not model.training and model.feature_dim == 128
    assert extract_features(model, torch.zeros(2, 1, 32, 32)).shape == (2, 128)


def test_shipped_classifier_accuracy():
    try:
        test = load_dataset("fashion_mnist", "test", fallback=False)
    except FileNotFoundError:
        pytest.skip("Fashion-MNIST is not available offline; set LDM_COURSE_DATA to a folder with it")
    acc = classifier_accuracy(load_fid_classifier(), to_float(test.images), test.labels)
    assert len(test) == 10_000 and acc >= 0.92, acc


def test_pretrained_roundtrip(tmp_path):
    m = ResNetClassifier(3, 4, channels=(8,)).eval()
    for target in (tmp_path / "folder", tmp_path / "w.safetensors"):
        m.save_pretrained(target)
        m2 = ResNetClassifier.from_pretrained(target)
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            assert torch.equal(m(x), m2(x))
