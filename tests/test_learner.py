"""ldm_course.learner: exact resume, NaN stop, atomic checkpoints, safetensors only."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ldm_course.data import ImageDataset
from ldm_course.learner import (EMACB, GradClipCB, Learner, MetricsCB, OneCycleCB, ResNetClassifier, accuracy,
                                load_tensors, save_tensors)


def _dls(seed=1, n=96, bs=16):
    g = torch.Generator().manual_seed(5)
    ds = ImageDataset(torch.randint(0, 256, (n, 1, 32, 32), dtype=torch.uint8, generator=g),
                      torch.randint(0, 10, (n,), generator=g), [str(i) for i in range(10)])
    keep = lambda b: b
    return (DataLoader(ds, bs, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(seed), collate_fn=keep),
            DataLoader(ds.subset(32), bs, collate_fn=keep))


def _learner(init_seed=0):
    torch.manual_seed(init_seed)
    model = ResNetClassifier(1, 10, channels=(8, 16), dropout=0.3)
    cbs = [OneCycleCB(), GradClipCB(0.5), EMACB(0.9), MetricsCB(accuracy=accuracy)]
    return Learner(model, _dls(), F.cross_entropy, lr=1e-2, cbs=cbs, cpu=True)


@pytest.mark.parametrize("k", [3, 6, 8])  # mid-epoch, exactly at an epoch boundary, mid second-to-last epoch
def test_exact_resume(tmp_path, k):
    torch.manual_seed(7); full = _learner().fit(2)
    torch.manual_seed(7); part = _learner().fit(2, max_steps=k)
    part.save_checkpoint(tmp_path / "ck")
    resumed = _learner(init_seed=3).fit(2, resume_from=tmp_path / "ck")
    assert resumed.step == full.step == 12
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    ema_a, ema_b = full.find_cb(EMACB).ema_model, resumed.find_cb(EMACB).ema_model
    for a, b in zip(ema_a.state_dict().values(), ema_b.state_dict().values()):
        assert torch.equal(a, b)


def test_checkpoint_files_atomic(tmp_path):
    learn = _learner().fit(1, max_steps=2)
    learn.save_checkpoint(tmp_path / "ck")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.json", "ck.safetensors"]


def test_nan_loss_names_step():
    learn = _learner()
    def loss(p, y): return F.cross_entropy(p, y) * (float("inf") if learn.step == 4 else 1.0)
    learn.loss_func = loss
    with pytest.raises(FloatingPointError, match="at step 4"):
        learn.fit(2)


def test_load_rejects_pickle(tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "w.safetensors")  # a pickle with the wrong name
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        load_tensors(tmp_path / "w.safetensors")
    with pytest.raises(FileNotFoundError):
        load_tensors(tmp_path / "none.safetensors")


def test_pretrained_roundtrip(tmp_path):
    m = ResNetClassifier(3, 4, channels=(8,)).eval()
    for target in (tmp_path / "folder", tmp_path / "w.safetensors"):
        m.save_pretrained(target)
        m2 = ResNetClassifier.from_pretrained(target)
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            assert torch.equal(m(x), m2(x))


def test_bad_mixed_precision():
    with pytest.raises(ValueError, match="mixed_precision='fp8'"):
        Learner(ResNetClassifier(), _dls(), mixed_precision="fp8")
