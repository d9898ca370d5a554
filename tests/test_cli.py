"""The `ldm-course` console script: success paths and one-line errors."""
import json, subprocess, sys
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


def test_demo(tmp_path):
    out = _cli("demo", "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr
    res = _json(out.stdout)
    assert (tmp_path / "demo_predictions.png").stat().st_size > 1000 and 0 <= res["valid_accuracy"] <= 1


def test_bad_args_one_line_no_traceback():
    out = _cli("demo", "--epochs", "0")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().startswith("error:") and len(out.stderr.strip().splitlines()) == 1
    out = _cli("train", "classifier", "--out", "weights.pt")
    assert out.returncode == 2 and "must end in .safetensors" in out.stderr and "Traceback" not in out.stderr


def test_unknown_command():
    out = _cli("paint")
    assert out.returncode == 2 and "invalid choice" in out.stderr


def test_bench_unet_tiny(tmp_path):
    out = _cli("bench", "unet", "--config", "tiny", "--device", "cpu", "--json", str(tmp_path / "b.json"))
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads((tmp_path / "b.json").read_text())
    assert len(rows) >= 4 and "|" in out.stdout
