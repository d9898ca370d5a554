"""The `ldm-course` console script: success paths and one-line errors."""
import json, subprocess, sys

import pytest
from pathlib import Path

CLI = str(Path(sys.executable).with_name("ldm-course"))  # the console script of this environment


def _json(stdout: str):
    "The JSON result the CLI prints last (progress lines may come before it)."
    return json.loads(stdout[stdout.rindex("\n{") + 1 if not stdout.startswith("{") else 0:])


def _cli(*args, timeout=600):
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=timeout)


def test_info():
    out = _cli("info")
    assert out.returncode == 0, out.stderr
    info = _json(out.stdout)
    assert info["scale"] == "ci" and "fashion_mnist" in info["datasets_found"]


def test_demo_from_a_fresh_process(tmp_path):
    "The README's main command: a PNG grid and a GIF from the shipped weights, every class present, where it said."
    out = _cli("demo", "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr
    res = _json(out.stdout)
    assert res["samples"] == str(tmp_path / "samples.png") and res["gif"] == str(tmp_path / "denoising.gif")
    assert (tmp_path / "samples.png").stat().st_size > 10_000 and (tmp_path / "denoising.gif").stat().st_size > 10_000
    assert res["sampler"] == "ddpm" and res["steps"] == 20 and res["clip_sample"] and res["n"] == 64 and sum(res["classes"].values()) == 64
    assert "wrote" in out.stderr and str(tmp_path / "samples.png") in out.stderr
    # the shipped cpu-trained model makes recognisable garments of many kinds: the FID classifier finds at least 8 of
    # the 10 classes in the grid, none in more than a quarter of it
    assert len(res["classes"]) == 10 and sum(v > 0 for v in res["classes"].values()) >= 8, res["classes"]
    assert max(res["classes"].values()) <= 16, res["classes"]


def test_generate_same_seed_same_bytes(tmp_path):
    a = _cli("generate", "--sampler", "euler", "--steps", "8", "--n", "6", "--seed", "7", "--out", str(tmp_path / "a"), "--no-gif")
    b = _cli("generate", "--sampler", "euler", "--steps", "8", "--n", "6", "--seed", "7", "--out", str(tmp_path / "b"), "--no-gif")
    c = _cli("generate", "--sampler", "euler", "--steps", "8", "--n", "6", "--seed", "8", "--out", str(tmp_path / "c"), "--no-gif")
    for r in (a, b, c): assert r.returncode == 0, r.stderr
    png = lambda d: (tmp_path / d / "samples.png").read_bytes()
    assert png("a") == png("b") != png("c")
    assert not (tmp_path / "a" / "denoising.gif").exists()


@pytest.mark.parametrize("args, expect", [
    (["demo", "--epochs", "1"], "unrecognized arguments: --epochs"),
    (["generate", "--sampler", "heun"], "invalid choice: 'heun'"),
    (["generate", "--steps", "0"], "--steps must be ≥ 1"),
    (["generate", "--steps", "1001", "--no-gif"], "got 1001"),
    (["generate", "--n", "-3"], "--n must be ≥ 1"),
    (["generate", "--weights", "missing.safetensors"], "does not exist"),
    (["generate", "--weights", "no_such_model"], "shipped models"),
    (["train", "classifier", "--out", "weights.pt"], "must end in .safetensors"),
    (["train", "ddpm", "--out", "weights.pt"], "must end in .safetensors"),
    (["train", "ddpm", "--n-train", "0"], "--n-train must be ≥ 1"),
    (["eval", "samplers", "--runs", "ddim:ten"], "write sampler:steps"),
    (["generate", "--seed", "99999999999999999999999"], "--seed must lie in [0, 2**63)"),
    (["generate", "--seed", "-1"], "--seed must lie in [0, 2**63)"),
    (["demo", "--out", "README.md"], "is a file; give a folder"),
    (["generate", "--n", "10000000000"], "more than one grid can show"),
    (["bench", "unet", "--device", "tpu"], "invalid choice: 'tpu'"),
    (["eval", "samplers", "--record", "--runs", "ddim:2", "--n", "4"], "belongs to the installed package"),
    (["eval", "samplers", "--json", "tests", "--runs", "ddim:2", "--n", "4"], "--json tests is a folder"),
])
def test_bad_args_one_line_no_traceback(args, expect):
    out = _cli(*args)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().startswith("error:") and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert expect in out.stderr, out.stderr


def test_weights_not_safetensors(tmp_path):
    (tmp_path / "w.safetensors").write_bytes(b"\x80\x04 a pickle, not safetensors")
    (tmp_path / "w.pt").write_bytes(b"whatever")
    for w, expect in ((tmp_path / "w.safetensors", "safetensors"), (tmp_path / "w.pt", "only safetensors")):
        out = _cli("generate", "--weights", str(w))
        assert out.returncode == 2 and expect in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_train_then_eval_records_fid(tmp_path):
    w = tmp_path / "d.safetensors"
    out = _cli("train", "ddpm", "--epochs", "1", "--n-train", "64", "--fid-n", "8", "--out", str(w))
    assert out.returncode == 0, out.stderr[-2000:]
    res = _json(out.stdout)
    meta = json.loads(w.with_suffix(".json").read_text())
    assert meta["fid"]["fid"] == res["fid"] and meta["fid"]["n"] == 8 and meta["fid"]["sampler"] == "ddpm"
    assert meta["training"]["command"].startswith("ldm-course train ddpm")
    out = _cli("eval", "samplers", "--weights", str(w), "--runs", "ddpm:3,ddim:3", "--n", "8", "--json", str(tmp_path / "e.json"),
               "--plot", str(tmp_path / "e.png"))
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads((tmp_path / "e.json").read_text())["rows"]
    assert [(r["sampler"], r["nfe"]) for r in rows] == [("ddpm", 3), ("ddim", 3)]
    assert (tmp_path / "e.png").stat().st_size > 1000 and "| ddim + clip | 3 | 3 |" in out.stdout


def test_unknown_command():
    out = _cli("paint")
    assert out.returncode == 2 and "invalid choice" in out.stderr


def test_bench_unet_tiny(tmp_path):
    out = _cli("bench", "unet", "--config", "tiny", "--device", "cpu", "--json", str(tmp_path / "b.json"))
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads((tmp_path / "b.json").read_text())
    assert len(rows) >= 4 and "|" in out.stdout


def test_threads_follow_the_free_cores(monkeypatch):
    "Without --threads or $OMP_NUM_THREADS, torch gets the cores that other work leaves free (at least one)."
    import os, torch
    from ldm_course.cli import set_threads
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    try:
        for load, expect in ((0.0, 8), (2.6, 5), (7.9, 1), (30.0, 1)):
            monkeypatch.setattr(os, "getloadavg", lambda load=load: (load, load, load))
            assert set_threads() == expect == torch.get_num_threads(), load
        assert set_threads(3) == 3
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        torch.set_num_threads(2)
        assert set_threads() == 2          # the user's choice stands
        with pytest.raises(ValueError, match="--threads must be ≥ 1"):
            set_threads(0)
    finally:
        torch.set_num_threads(before)


def test_record_never_replaces_a_better_table(tmp_path):
    "--record into a copy works; a table of fewer samples per run does not silently replace one of more."
    import shutil
    from ldm_course.files import weights_dir
    for ext in (".safetensors", ".json"): shutil.copy(weights_dir() / f"fmnist_ddpm{ext}", tmp_path / f"m{ext}")
    assert json.loads((tmp_path / "m.json").read_text())["sampler_fid"]["n"] == 500   # the shipped table
    before = (tmp_path / "m.json").read_bytes()
    # --allow-fallback: a fresh offline clone has no Fashion-MNIST to score against; what is tested here is the record
    out = _cli("eval", "samplers", "--weights", str(tmp_path / "m.safetensors"), "--runs", "ddim:2", "--n", "4", "--record",
               "--allow-fallback")
    assert out.returncode == 2 and "refusing to replace it" in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert (tmp_path / "m.json").read_bytes() == before
    out = _cli("eval", "samplers", "--weights", str(tmp_path / "m.safetensors"), "--runs", "ddim:2", "--n", "4", "--record",
               "--force", "--allow-fallback")
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads((tmp_path / "m.json").read_text())["sampler_fid"]["n"] == 4


def test_train_never_loses_a_run(tmp_path):
    "A checkpoint beside --out is kept unless --resume (continue) or --overwrite; --resume needs a checkpoint."
    w, ck = tmp_path / "m.safetensors", tmp_path / "m.ckpt.safetensors"
    ck.write_bytes(b"an earlier run")
    out = _cli("train", "ddpm", "--epochs", "1", "--n-train", "64", "--out", str(w))
    assert out.returncode == 2 and "holds an earlier run" in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert ck.read_bytes() == b"an earlier run" and not w.exists()
    out = _cli("train", "ddpm", "--resume", "--out", str(tmp_path / "new.safetensors"))
    assert out.returncode == 2 and "no checkpoint at" in out.stderr, out.stderr


def test_train_vae_from_the_command_line(tmp_path):
    "`ldm-course train vae` trains, saves safetensors + JSON with its test metrics, and keeps a run unless told."
    w = tmp_path / "v.safetensors"
    out = _cli("train", "vae", "--n-train", "32", "--out", str(w))
    assert out.returncode == 0, out.stderr
    res = _json(out.stdout)
    assert res["weights"] == str(w) and w.exists() and w.with_suffix(".json").exists()
    assert {"psnr", "ssim", "rfid"} <= set(res) and res["steps"] == 1
    saved = json.loads(w.with_suffix(".json").read_text())
    assert saved["class"] == "VAE" and saved["training"]["command"].startswith("ldm-course")
    before = w.read_bytes()
    out = _cli("train", "vae", "--n-train", "32", "--out", str(w))
    assert out.returncode == 2 and "holds an earlier run" in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert w.read_bytes() == before
    out = _cli("train", "vae", "--out", "v.pt")
    assert out.returncode == 2 and "must end in .safetensors" in out.stderr
    out = _cli("generate", "--weights", str(w), "--out", str(tmp_path / "g"))
    assert out.returncode == 2 and "VAE" in out.stderr and "Traceback" not in out.stderr, out.stderr
