"""The harness under torchrun (2 gloo ranks on CPU): same result as one process, and a killed rank."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")


def _args(out_dir, batch=64, epochs="1", extra=()):
    return ["-m", "largebatch", "train", "--task-option", "train_subset=1024", "--task-option", "eval_subset=256",
            "--batch-size", str(batch), "--micro-batch-size", "16", "--epochs", epochs, "--base-lr", "0.01",
            "--weight-decay", "0.01", "--max-grad-norm", "1.0", "--precision", "fp64", "--out-dir", str(out_dir),
            "--no-progress", *extra]  # fmt: skip


def _torchrun(nproc=2):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1")


def _run(cmd, **kw):
    """subprocess.run that shows the command's stderr when it fails."""
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300, **kw)
    assert done.returncode == 0, f"{' '.join(cmd)} exited with {done.returncode}:\n{done.stderr[-4000:]}"
    return done


def _model(out_dir):
    return torch.load(Path(out_dir) / "checkpoint.pt", weights_only=True)


def test_two_ranks_equal_one_process(tmp_path):
    """Global batch 64 over 2 ranks x 2 micro-batches == one process with batch 64 (float64)."""
    _run(_torchrun() + _args(tmp_path / "ddp"))
    _run([sys.executable] + _args(tmp_path / "one"))
    a, b = _model(tmp_path / "ddp"), _model(tmp_path / "one")
    assert a["step"] == b["step"] == 16
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-12, atol=1e-14)
    # the checkpoint is written once, by rank 0, and the log holds one line per record
    assert len(list((tmp_path / "ddp").glob("checkpoint*"))) == 1


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


@pytest.mark.skipif(not Path("/proc").exists(), reason="finds the worker processes through /proc")
def test_killed_rank_fails_cleanly_and_resumes(tmp_path):
    extra = ("--checkpoint-every", "4")
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(_torchrun() + _args(full, batch=16, epochs="2", extra=extra), check=True, env=_env(),
                   capture_output=True, timeout=300)  # fmt: skip

    proc = subprocess.Popen(_torchrun() + _args(killed, batch=16, epochs="2", extra=extra), env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.time() + 120
    while not (killed / "checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    workers = _children(proc.pid)
    assert workers, "no worker processes found"
    os.kill(workers[-1], signal.SIGKILL)  # one rank dies
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0  # the whole run fails, it does not hang
    assert not (killed / "result.json").exists()
    step_at_kill = _model(killed)["step"]
    assert 0 < step_at_kill < 128

    out = subprocess.run(_torchrun() + _args(killed, batch=16, epochs="2", extra=extra), env=_env(),
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    a, b = _model(full), _model(killed)
    assert a["step"] == b["step"] == 128
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0)


def test_train_command_destroys_its_process_group(tmp_path, monkeypatch):
    """`largebatch train` under torchrun's variables (one rank, in this process) destroys the process
    group it created before returning: a gloo group left alive at exit can abort the process in its
    worker threads ("terminate called without an active exception")."""
    import socket

    from largebatch.cli import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)).items():
        monkeypatch.setenv(k, v)
    assert main(_args(tmp_path / "one", batch=256)[2:]) == 0
    assert not torch.distributed.is_initialized()
