"""Bad input where it enters: named datasets that are missing, hostile sidecar JSON, unwritable outputs, huge --n,
unreadable weights, a checkpoint that holds NaN. Command-line cases run in a fresh process: exit status 2, one
`error:` line on stderr, no traceback, and no file changed that must not change."""
import json, os, shutil, subprocess, sys
from pathlib import Path

import pytest
import torch

CLI = str(Path(sys.executable).with_name("ldm-course"))


def _cli(*args, env=None, timeout=600):
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=timeout, env=env)


def _one_line_error(out, expect):
    "Exit 2, one `error:` line that contains `expect`, no traceback."
    err = out.stderr.strip()
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert err.startswith("error:") and len(err.splitlines()) == 1, out.stderr[-3000:]
    for e in ([expect] if isinstance(expect, str) else expect):
        assert e in err, err
    return err


def _offline_env(tmp_path):
    "No local copy of any dataset, no download (HF offline; torchvision finds no network either)."
    env = {k: v for k, v in os.environ.items() if k != "LDM_COURSE_DATA"}
    env.update(LDM_COURSE_CACHE=str(tmp_path / "empty-cache"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return env


def _shipped_copy(tmp_path, name="m"):
    from ldm_course.files import weights_dir
    for ext in (".safetensors", ".json"): shutil.copy(weights_dir() / f"fmnist_ddpm{ext}", tmp_path / f"{name}{ext}")
    return tmp_path / f"{name}.safetensors"


# (a) a dataset named explicitly is that dataset or an error; the bundled digits only when asked for

def test_cli_named_dataset_missing_is_refused(tmp_path):
    out = _cli("train", "ddpm", "--dataset", "cifar10", "--epochs", "1", "--n-train", "32", "--out",
               str(tmp_path / "w.safetensors"), env=_offline_env(tmp_path))
    _one_line_error(out, ["'cifar10'", str(tmp_path / "empty-cache"), "LDM_COURSE_DATA", "--allow-fallback"])
    assert not (tmp_path / "w.safetensors").exists() and not (tmp_path / "w.ckpt.safetensors").exists()


def test_cli_eval_needs_the_models_dataset_or_the_opt_in(tmp_path):
    "The shipped model was trained on Fashion-MNIST: scoring it against digits needs --allow-fallback."
    w = _shipped_copy(tmp_path)
    before = w.with_suffix(".json").read_bytes()
    env = _offline_env(tmp_path)
    out = _cli("eval", "samplers", "--weights", str(w), "--runs", "ddim:2", "--n", "4", env=env)
    _one_line_error(out, ["'fashion_mnist'", "--allow-fallback"])
    out = _cli("eval", "samplers", "--weights", str(w), "--runs", "ddim:2", "--n", "4", "--allow-fallback", env=env)
    assert out.returncode == 0 and "bundled" in out.stderr, out.stderr[-2000:]
    assert w.with_suffix(".json").read_bytes() == before


# (b) sidecar configs are checked before anything is built

@pytest.mark.parametrize("edit, expect", [
    (lambda m: m["config"].update(block_out_channels=[10**9, 32, 64]), ["block_out_channels=[1000000000, 32, 64]", "[1, 4096]"]),
    (lambda m: m["config"].update(block_out_channels=[16] * 40, attention_levels=[False] * 40), ["block_out_channels has 40 entries", "1 to 8"]),
    (lambda m: m["config"].update(layers_per_block=10**6), ["layers_per_block=1000000", "[1, 16]"]),
    (lambda m: m["config"].update(in_channels=10**9), ["in_channels=1000000000", "[1, 64]"]),
    (lambda m: m["config"].update(num_classes=10**12), ["num_classes=1000000000000", "[1, 100000]"]),
    (lambda m: m["config"].update(layers_per_block="2"), ["layers_per_block='2'", "integers"]),
    (lambda m: m["schedule"].update(num_train_timesteps=10**9), ["num_train_timesteps=1000000000", "[1, 100000]"]),
    (lambda m: m["schedule"].update(colour="red"), ["does not build a NoiseSchedule", "colour"]),
    (lambda m: m.update(schedule=[1, 2]), ["'schedule' must be a JSON object"]),
    (lambda m: m["training"].update(image_shape=[1, 10**6, 10**6]), ["image_shape=[1, 1000000, 1000000]", "1024"]),
    (lambda m: m["training"].update(image_shape=[3, 32, 32]), ["image_shape=[3, 32, 32]", "C = 1"]),
])
def test_cli_hostile_sidecar(tmp_path, edit, expect):
    w = _shipped_copy(tmp_path)
    meta = json.loads(w.with_suffix(".json").read_text())
    edit(meta)
    w.with_suffix(".json").write_text(json.dumps(meta))
    out = _cli("generate", "--weights", str(w), "--n", "2", "--steps", "2", "--out", str(tmp_path / "o"))
    _one_line_error(out, expect)
    assert not (tmp_path / "o" / "samples.png").exists()


def test_sidecar_parameter_budget(tmp_path):
    "Sizes each inside their range can still multiply into gigabytes: the dry build on the meta device counts them."
    from ldm_course.metrics import ResNetClassifier
    from ldm_course.unet import UNet
    m = UNet(block_out_channels=[16, 32], attention_levels=[False, True], layers_per_block=1, num_heads=2, norm_groups=8)
    m.save_pretrained(tmp_path / "u.safetensors")
    meta = json.loads((tmp_path / "u.json").read_text())
    meta["config"].update(block_out_channels=[4096] * 8, attention_levels=[True] * 8, layers_per_block=16)
    (tmp_path / "u.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"parameters \(.* GB\), more than the 200,000,000 allowed"):
        UNet.from_pretrained(tmp_path / "u.safetensors")
    c = ResNetClassifier(channels=(8,))
    c.save_pretrained(tmp_path / "c.safetensors")
    meta = json.loads((tmp_path / "c.json").read_text())
    meta["config"]["channels"] = [10**9]
    (tmp_path / "c.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"channels=\[1000000000\] is outside the allowed range"):
        ResNetClassifier.from_pretrained(tmp_path / "c.safetensors")


def test_sidecar_too_big_to_be_a_config(tmp_path, monkeypatch):
    from ldm_course import files
    w = _shipped_copy(tmp_path)
    monkeypatch.setattr(files, "MAX_INFO_BYTES", 1000)
    with pytest.raises(ValueError, match="is 0 MB; the JSON beside weights is a few kB"):
        files.Pretrained.read_info(w)


# (c) an output that cannot be written is found before the first epoch

def test_train_ddpm_unwritable_outputs_fail_before_training(tmp_path, monkeypatch):
    from ldm_course import ddpm
    def no_data(*a, **k): raise AssertionError("data was loaded before the outputs were checked")
    monkeypatch.setattr(ddpm, "get_dataloaders", no_data)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(PermissionError, match=f"{tmp_path / 'afile'} is a file, not a folder"):
        ddpm.train_ddpm(checkpoint=tmp_path / "afile" / "ck.safetensors")
    with pytest.raises(PermissionError, match="cannot write the weights file"):
        ddpm.train_ddpm(out=tmp_path / "afile" / "w.safetensors")
    import tempfile
    def read_only(*a, **k): raise OSError(30, "Read-only file system")
    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(PermissionError, match=f"the folder {tmp_path / 'ro'} is not writable \\(Read-only file system\\)"):
        ddpm.train_ddpm(checkpoint=tmp_path / "ro" / "ck.safetensors")


def test_checkpoint_cb_checks_before_the_first_epoch(tmp_path, monkeypatch):
    "A Learner with a CheckpointCB into a read-only folder stops in before_fit, with no step taken."
    from torch.utils.data import DataLoader, TensorDataset
    from ldm_course.learner import CheckpointCB, Learner
    import tempfile
    dl = DataLoader(TensorDataset(torch.randn(8, 2), torch.randn(8, 1)), 4)
    learn = Learner(torch.nn.Linear(2, 1), (dl, dl), torch.nn.functional.mse_loss, cbs=[CheckpointCB(tmp_path / "ck")], cpu=True)
    monkeypatch.setattr(tempfile, "mkstemp", lambda *a, **k: (_ for _ in ()).throw(PermissionError(13, "Permission denied")))
    with pytest.raises(PermissionError, match=f"cannot write the checkpoint {tmp_path / 'ck.safetensors'}"):
        learn.fit(1)
    assert learn.step == 0


def test_cli_train_classifier_out_through_a_file(tmp_path):
    (tmp_path / "afile").write_text("x")
    out = _cli("train", "classifier", "--out", str(tmp_path / "afile" / "c.safetensors"))
    _one_line_error(out, str(tmp_path / "afile"))
    assert (tmp_path / "afile").read_text() == "x"


# (d) generate runs in batches; what no grid can hold is refused with what it would take

def test_generate_in_batches(tmp_path, monkeypatch):
    from ldm_course import samplers
    seen, real = [], samplers.sample
    def spy(model, schedule, shape, *a, **k):
        seen.append((shape[0], k.get("return_intermediates")))
        return real(model, schedule, shape, *a, **k)
    monkeypatch.setattr(samplers, "sample", spy)
    res = samplers.generate(steps=2, n=5, batch_size=2, out=tmp_path / "a", classify=False)
    assert seen == [(2, True), (2, False), (1, False)] and res["n"] == 5
    from PIL import Image
    assert Image.open(res["gif"]).size[0] < Image.open(res["samples"]).size[0]
    seen.clear()
    one = samplers.generate(steps=2, n=5, batch_size=8, out=tmp_path / "b", gif=False, classify=False)
    assert seen == [(5, False)] and Path(one["samples"]).exists()
    with pytest.raises(ValueError, match="batch_size must be an int ≥ 1"):
        samplers.generate(n=2, batch_size=0, out=tmp_path / "c")


def test_grid_limit_says_what_it_would_take():
    from ldm_course.samplers import MAX_GRID, check_grid_n
    assert check_grid_n(MAX_GRID) == MAX_GRID
    with pytest.raises(ValueError, match=r"n 4,097 is more than one grid can show \(at most 4,096\): its PNG grid alone would take 19 MB"):
        check_grid_n(MAX_GRID + 1)
    with pytest.raises(ValueError, match="46,240.0 GB"):
        check_grid_n(10**10)
    for bad in (0, -1, 2.5, True, "8"):
        with pytest.raises(ValueError, match="must be an int ≥ 1"):
            check_grid_n(bad)


def test_cli_generate_huge_n(tmp_path):
    out = _cli("generate", "--n", "5000", "--out", str(tmp_path / "o"))
    _one_line_error(out, ["--n 5,000 is more than one grid can show (at most 4,096)", "MB of memory"])
    assert not (tmp_path / "o").exists()


# (e) a weights file that cannot be read is not reported as missing

def test_unreadable_weights_say_so(tmp_path, monkeypatch):
    from ldm_course import files
    w = _shipped_copy(tmp_path)
    real_open = open
    def no_access(p, *a, **k):
        if Path(p) == w: raise PermissionError(13, "Permission denied", str(p))
        return real_open(p, *a, **k)
    monkeypatch.setattr(files, "open", no_access, raising=False)
    with pytest.raises(PermissionError, match=f"cannot read weights file {w}: permission denied"):
        files.load_tensors(w)


def test_cli_unreadable_weights_fresh_process(tmp_path):
    "The same through `main` in a fresh process (as root, chmod cannot take read access away, so open is patched)."
    w = _shipped_copy(tmp_path)
    code = ("import builtins, sys; from pathlib import Path; real = builtins.open\n"
            "def fake(p, *a, **k):\n"
            f"    if str(p) == {str(w)!r}: raise PermissionError(13, 'Permission denied', str(p))\n"
            "    return real(p, *a, **k)\n"
            "builtins.open = fake\n"
            "from ldm_course.cli import main\n"
            f"sys.exit(main(['generate', '--weights', {str(w)!r}, '--out', {str(tmp_path / 'o')!r}]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    err = _one_line_error(out, f"cannot read weights file {w}: permission denied")
    assert "No such file" not in err and "does not exist" not in err


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads any file")
def test_cli_unreadable_weights_chmod(tmp_path):
    w = _shipped_copy(tmp_path)
    w.chmod(0)
    try:
        _one_line_error(_cli("generate", "--weights", str(w), "--out", str(tmp_path / "o")), "permission denied")
    finally:
        w.chmod(0o644)


@pytest.mark.parametrize("content, expect", [
    (b"", "not a valid safetensors file"),
    (b"\x80\x04\x95 a pickle", "not a valid safetensors file"),
    ((10**6).to_bytes(8, "little") + b'{"a": 1}', "not a valid safetensors file"),   # header longer than the file
    ((8).to_bytes(8, "little") + b'{"a": 1}', "not a valid safetensors file"),       # a header, but not safetensors'
])
def test_cli_not_safetensors(tmp_path, content, expect):
    w = _shipped_copy(tmp_path)
    w.write_bytes(content)
    err = _one_line_error(_cli("generate", "--weights", str(w), "--out", str(tmp_path / "o")), [str(w), expect])
    assert "does not exist" not in err


def test_cli_weights_folder(tmp_path):
    (tmp_path / "d").mkdir()
    _one_line_error(_cli("generate", "--weights", str(tmp_path / "d"), "--out", str(tmp_path / "o")), "does not exist")
    (tmp_path / "d" / "model.safetensors").mkdir()
    _one_line_error(_cli("generate", "--weights", str(tmp_path / "d"), "--out", str(tmp_path / "o")), "is a folder")


# (f) resuming from a checkpoint that holds NaN names the checkpoint as the problem

def _nan_checkpoint(tmp_path, out_name="w"):
    "A checkpoint made like `ldm-course train ddpm --epochs 1 --n-train 64` would, saved after its epoch (step 2), then poisoned."
    from safetensors import safe_open
    from ldm_course.ddpm import train_ddpm
    from ldm_course.files import load_tensors, save_tensors
    ck = tmp_path / f"{out_name}.ckpt.safetensors"
    train_ddpm(epochs=1, n_train=64, checkpoint=ck, progress=False)   # 2 steps: saved at the epoch end
    with safe_open(str(ck), "pt") as f: meta = f.metadata()
    t = load_tensors(ck)
    k = next(k for k in t if k.startswith("model.") and t[k].is_floating_point())
    t[k] = t[k].clone(); t[k].view(-1)[0] = float("nan")
    save_tensors(t, ck, metadata=meta)
    return ck


def test_resume_from_nan_checkpoint(tmp_path):
    from ldm_course.ddpm import train_ddpm
    ck = _nan_checkpoint(tmp_path)
    with pytest.raises(ValueError, match=r"itself is broken: it holds NaN or infinite weights at step 2 .*without --resume"):
        train_ddpm(epochs=1, n_train=64, checkpoint=ck, resume=True, progress=False)


def test_cli_resume_from_nan_checkpoint(tmp_path):
    ck = _nan_checkpoint(tmp_path)
    before = ck.read_bytes()
    out = _cli("train", "ddpm", "--epochs", "1", "--n-train", "64", "--out", str(tmp_path / "w.safetensors"), "--resume")
    _one_line_error(out, ["itself is broken", "NaN", "at step 2", "--overwrite", "lower learning rate"])
    assert ck.read_bytes() == before and not (tmp_path / "w.safetensors").exists()


# more of the same kind, found by probing: each was a traceback, a crash, work thrown away or a silent wrong result

@pytest.mark.parametrize("args, expect", [
    (["--threads", "100000", "info"], "--threads must be ≥ 1 and at most"),          # was a segmentation fault
    (["generate", "--weights", ""], "the weights path is empty"),                    # was "model.safetensors does not exist"
    (["generate", "--out", ""], "--out is empty"),                                   # wrote into the current folder
    (["train", "ddpm", "--fid-n", "1"], "--fid-n must be ≥ 2"),                      # failed after the whole training
    (["eval", "samplers", "--n", "1"], "--n must be ≥ 2"),                           # failed after the real features
    (["eval", "samplers", "--runs", ""], "no runs in ''"),                          # ran the full 12-run table
    (["train", "ddpm", "--out", ".safetensors"], "name a file"),                     # "must end in .safetensors, got .safetensors"
    (["eval", "samplers", "--plot", "/proc/x.png", "--runs", "ddim:2", "--n", "4"], "the folder of --plot /proc is not writable"),
    (["bench", "attention", "--json", "/proc/x.json", "--device", "cpu"], "the folder of --json /proc is not writable"),
])
def test_cli_probed_inputs(args, expect, tmp_path):
    out = subprocess.run([CLI, *args], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    _one_line_error(out, expect)
    assert list(tmp_path.iterdir()) == []          # nothing written where the command ran


def test_train_sizes_are_checked(tmp_path):
    "0 is not 'the recipe's default', and -1 epochs is not an untrained model returned as if trained."
    from ldm_course.data import bundled_mnist
    from ldm_course.ddpm import train_ddpm
    kw = dict(dataset="bundled_mnist", config="tiny", n_train=32, progress=False)
    for bad, expect in (({"epochs": -1}, "epochs must be an int ≥ 1"), ({"epochs": 0}, "epochs must be an int ≥ 1"),
                        ({"batch_size": 0}, "batch_size must be an int ≥ 1"), ({"n_train": 0}, "n_train must be an int ≥ 1"),
                        ({"lr": float("nan")}, "lr must be a number > 0"), ({"ema_decay": 2.0}, r"ema_decay must lie in \[0, 1\)")):
        with pytest.raises(ValueError, match=expect):
            train_ddpm(**{**kw, **bad})
    with pytest.raises(ValueError, match="a subset needs n ≥ 1"):
        bundled_mnist("test").subset(-1)
