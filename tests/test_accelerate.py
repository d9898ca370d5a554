"""ldm_course.learner under `accelerate launch`: two CPU processes (gloo) follow the same loss curve as one process
on the same global batch, end with the same weights, and write each checkpoint once (from the main process)."""
import json, os, socket, subprocess, sys, textwrap

import pytest

SCRIPT = textwrap.dedent('''
    import json, sys
    from pathlib import Path
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    import os
    import ldm_course.learner as L

    out = Path(sys.argv[1])
    rank = int(os.environ.get("RANK", "0"))  # set by `accelerate launch`; the Learner sets accelerate up itself
    _save = L.save_tensors
    def save_tensors(tensors, path, *args, **kwargs):  # log who writes what
        with open(out / "writes.log", "a") as f: f.write(f"{rank} {Path(path).name}\\n")
        return _save(tensors, path, *args, **kwargs)
    L.save_tensors = save_tensors

    g = torch.Generator().manual_seed(1)
    x = torch.randn(180, 1, 8, 8, generator=g)
    y = (x.mean((1, 2, 3)) > 0).long() + 2 * (x[:, 0, :4].mean((1, 2)) > 0).long()
    # global batch 33: slices of 17 and 16 items on two processes; validation batches of 25 and 23
    train_dl = DataLoader(TensorDataset(x[:132], y[:132]), 33, shuffle=True, drop_last=True,
                          generator=torch.Generator().manual_seed(2))
    valid_dl = DataLoader(TensorDataset(x[132:], y[132:]), 25)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))
    cbs = [L.MetricsCB(accuracy=L.accuracy), L.OneCycleCB(), L.GradClipCB(1.0), L.EMACB(0.9),
           L.CheckpointCB(out / "ckpt", every_steps=5)]
    learn = L.Learner(model, (train_dl, valid_dl), lr=3e-2, cbs=cbs).fit(3)
    if learn.is_main_process:
        m = learn.find_cb(L.MetricsCB)
        weights = [p.detach().flatten().tolist() for p in learn.accelerator.unwrap_model(learn.model).parameters()]
        (out / "result.json").write_text(json.dumps({"processes": learn.num_processes, "losses": m.losses,
                                                     "history": m.history, "weights": weights, "step": learn.step}))
''')


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(tmp_path, name, processes):
    out = tmp_path / name
    out.mkdir()
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # CPU processes, gloo, even on a GPU machine
    if processes == 1:
        cmd = [sys.executable, str(script), str(out)]
    else:
        # `--cpu --num_processes 2` would start a single process (accelerate reserves several CPU processes for
        # mpirun with a hostfile); `--multi_gpu` on a machine without a visible GPU starts 2 CPU processes (gloo)
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), str(script), str(out)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads((out / "result.json").read_text()), (out / "writes.log").read_text().split("\n")[:-1], r.stdout


def test_two_processes_match_one(tmp_path):
    pytest.importorskip("accelerate")
    one, writes1, _ = _run(tmp_path, "one", 1)
    two, writes2, stdout2 = _run(tmp_path, "two", 2)
    assert one["processes"] == 1 and two["processes"] == 2
    assert one["step"] == two["step"] == 12
    # the same loss at every step (global batch 33 either way), the same epoch averages, the same final weights
    assert len(one["losses"]) == len(two["losses"]) == 12
    for a, b in zip(one["losses"], two["losses"]):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (one["losses"], two["losses"])
    for ra, rb in zip(one["history"], two["history"]):
        for k in ("train_loss", "valid_loss", "valid_accuracy"):
            assert abs(ra[k] - rb[k]) <= 1e-5, (k, ra, rb)
    for wa, wb in zip(one["weights"], two["weights"]):
        assert max(abs(a - b) for a, b in zip(wa, wb)) <= 1e-4
    # checkpoints: every 5 steps (5, 10) and after each of the 3 epochs = 5 saves, all by process 0
    assert len(writes1) == 5 and writes1 == writes2, (writes1, writes2)
    assert all(w.startswith("0 ") for w in writes2)
    # printed epoch lines come from the main process only
    assert stdout2.count("train_loss") == 3, stdout2
