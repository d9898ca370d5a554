"""ldm_course.learner: exact resume, NaN stop, atomic checkpoints, safetensors only, the event order, batch sharding."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ldm_course.data import ImageDataset
from ldm_course.files import load_tensors, save_tensors
from ldm_course.learner import (EMACB, Callback, CancelEpochException, GradClipCB, Learner, MetricsCB, OneCycleCB,
                                accuracy, batch_len, shard_batch)


def _model(c_in=1, n_classes=10, dropout=0.3):
    "A small conv net with BatchNorm (buffers) and dropout (RNG), like the models the course trains."
    return nn.Sequential(nn.Conv2d(c_in, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(16, n_classes))


def _dls(seed=1, n=96, bs=16):
    g = torch.Generator().manual_seed(5)
    ds = ImageDataset(torch.randint(0, 256, (n, 1, 32, 32), dtype=torch.uint8, generator=g),
                      torch.randint(0, 10, (n,), generator=g), [str(i) for i in range(10)])
    keep = lambda b: b
    return (DataLoader(ds, bs, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(seed), collate_fn=keep),
            DataLoader(ds.subset(32), bs, collate_fn=keep))


def _learner(init_seed=0):
    torch.manual_seed(init_seed)
    model = _model()
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
    # the metrics record the whole run: every step's loss and the epoch averages, the resumed epoch included
    m_full, m_res = full.find_cb(MetricsCB), resumed.find_cb(MetricsCB)
    assert m_res.losses == pytest.approx(m_full.losses, abs=1e-6)
    assert len(m_res.history) == len(m_full.history) == 2
    for a, b in zip(m_full.history, m_res.history):
        for key in ("train_loss", "valid_loss", "valid_accuracy"):
            assert b[key] == pytest.approx(a[key], abs=1e-6), (key, a, b)


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


def test_bad_mixed_precision():
    with pytest.raises(ValueError, match="mixed_precision='fp8'"):
        Learner(_model(), _dls(), mixed_precision="fp8")


def test_event_order():
    class Trace(Callback):
        def __init__(self): self.log = []
    events = ["before_fit", "before_epoch", "before_batch", "after_pred", "after_loss", "before_step", "after_step",
              "after_batch", "after_epoch", "after_full_epoch", "after_fit"]
    for e in events: setattr(Trace, e, lambda self, e=e: self.log.append((e, self.learn.training)))
    t = Trace()
    Learner(_model(), _dls(n=32), cbs=[t], cpu=True).fit(1)  # 2 training batches, 2 validation batches
    one = ["before_batch", "after_pred", "after_loss"]
    train = ["before_fit", "before_epoch"] + 2 * (one + ["before_step", "after_step", "after_batch"]) + ["after_epoch"]
    valid = ["before_epoch"] + 2 * (one + ["after_batch"]) + ["after_epoch", "after_full_epoch", "after_fit"]
    assert [e for e, _ in t.log] == train + valid
    assert [tr for e, tr in t.log if e == "before_epoch"] == [True, False]


def test_max_steps_mid_epoch_skips_validation():
    seen = []
    class Seen(Callback):
        def after_full_epoch(self): seen.append(self.learn.step)
    learn = Learner(_model(), _dls(), cbs=[Seen()], cpu=True).fit(2, max_steps=8)  # 6 steps per epoch
    assert learn.step == 8 and seen == [6]


def test_cancel_epoch():
    class StopAfter2(Callback):
        def after_step(self):
            if self.learn.step % 6 == 2: raise CancelEpochException()
    ends = []
    class End(Callback):
        def after_epoch(self): ends.append(self.learn.training)
    learn = Learner(_model(), _dls(), cbs=[StopAfter2(), End()], cpu=True).fit(1)
    assert learn.step == 2 and ends == [True]   # after_epoch still runs; an incomplete epoch is not validated


def test_shard_batch():
    x, y = torch.arange(14.0).view(7, 2), torch.arange(7)
    parts = [shard_batch(((x, y), y), i, 3) for i in range(3)]
    assert [batch_len(p) for p in parts] == [3, 2, 2]
    assert torch.equal(torch.cat([p[0][0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)
    assert shard_batch((x, "meta"), 1, 2)[1] == "meta"
    assert shard_batch(x, 0, 1) is x


def test_metrics_weighted_by_batch_size():
    # 96 training items in batches of 16, 32 validation items in batches of 20 (20 + 12): averages weight by size
    m = MetricsCB(accuracy=accuracy)
    dls = _dls()
    dls = (dls[0], DataLoader(dls[1].dataset, 20, collate_fn=lambda b: b))
    learn = Learner(_model(dropout=0.0), dls, cbs=[m], cpu=True).fit(1)
    model = learn.model.eval()
    with torch.no_grad():
        xs, ys = dls[1].dataset[torch.arange(32)]
        preds = model(xs)
    assert abs(m.history[0]["valid_accuracy"] - accuracy(preds, ys).item()) < 1e-6


def test_checkpoint_pair_must_match(tmp_path):
    "The .safetensors and .json of a checkpoint carry one id: files of two different saves are refused, not mixed."
    learn = _learner().fit(1, max_steps=2)
    learn.save_checkpoint(tmp_path / "a")
    learn.fit(1, max_steps=3)
    learn.save_checkpoint(tmp_path / "b")
    (tmp_path / "a.json").write_text((tmp_path / "b.json").read_text())   # new JSON beside old tensors
    with pytest.raises(ValueError, match="come from different saves"):
        _learner().fit(1, resume_from=tmp_path / "a")
    _learner().fit(1, resume_from=tmp_path / "b")   # a matching pair loads


def test_stale_temporaries_are_cleaned(tmp_path):
    "A write that was killed leaves `.name.XXXX.tmp`; the next write of that file removes it."
    stale = tmp_path / ".w.safetensors.abc123.tmp"
    stale.write_bytes(b"half a file")
    save_tensors({"w": torch.ones(2)}, tmp_path / "w.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]
