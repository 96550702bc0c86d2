"""The training harness: exact accumulation, bit-exact resume after a kill, errors, logs."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from largebatch.train.loop import TrainConfig, fit
from largebatch.train.tasks import get_task

SUBSET = {"train_subset": 512, "eval_subset": 256}


@pytest.fixture(scope="module")
def mnist():
    return get_task("mnist-lenet", **SUBSET)


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("optimizer", ["lamb", "sgd", "lars"])
def test_accumulation_equals_one_big_batch(mnist, optimizer):
    """micro 16 x 4 accumulation == one batch of 64, after 4 steps, in float64."""
    runs = []
    for micro in (64, 16, 24):  # 24 does not divide 64: uneven micro-batches are exact too
        cfg = TrainConfig(task="mnist-lenet", optimizer=optimizer, batch_size=64, micro_batch_size=micro, epochs=1,
                          lr=0.05, weight_decay=0.01, precision="fp64", max_steps=4, progress=False, log_every=0)  # fmt: skip
        torch.manual_seed(0)
        model = mnist.build_model()
        res = fit(cfg, task=mnist, model=model)
        assert res.accumulation == -(-64 // micro)
        runs.append(_params(model))
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_accumulated_gradient_equals_full_batch_gradient(mnist):
    torch.manual_seed(0)
    model = mnist.build_model().double()
    idx = torch.arange(64)

    def grads_for(chunks):
        model.zero_grad()
        batches = [mnist.get_batch("train", c) for c in chunks]
        total = sum(b.weight for b in batches)
        for b in batches:
            b = type(b)({k: v.double() if v.is_floating_point() else v for k, v in b.tensors.items()}, b.weight)
            loss_sum, _ = mnist.loss(model, b)
            (loss_sum / total).backward()
        return [p.grad.clone() for p in model.parameters()]

    full = grads_for([idx])
    for a, b in zip(full, grads_for(idx.split(10))):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


def _train_cmd(out_dir, extra=()):
    return [sys.executable, "-m", "largebatch", "train", "--task", "mnist-lenet", "--task-option", "train_subset=1024",
            "--task-option", "eval_subset=256", "--optimizer", "lamb", "--batch-size", "16", "--epochs", "4",
            "--base-lr", "0.01", "--warmup-epochs", "0.2", "--weight-decay", "0.01", "--checkpoint-every", "5",
            "--out-dir", str(out_dir), "--no-progress", "--log-every", "5", *extra]  # fmt: skip


def test_killed_run_resumes_bit_identical(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(_train_cmd(full), check=True, env=env, capture_output=True)

    proc = subprocess.Popen(_train_cmd(killed), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (killed / "checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed / "result.json").exists()
    step_at_kill = torch.load(killed / "checkpoint.pt", weights_only=True)["step"]
    assert 0 < step_at_kill < 256

    out = subprocess.run(_train_cmd(killed), check=True, env=env, capture_output=True, text=True)
    assert "finished" in out.stdout
    a = torch.load(full / "checkpoint.pt", weights_only=True)
    b = torch.load(killed / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 256
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), (k, step_at_kill, (a["model"][k] - b["model"][k]).abs().max())
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for k in sa:
            assert torch.equal(sa[k], sb[k])
    ra = json.loads((full / "result.json").read_text())
    rb = json.loads((killed / "result.json").read_text())
    assert ra["final"] == rb["final"]
    lines = [json.loads(x) for x in (killed / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in lines if r["split"] == "train"]
    assert steps == sorted(set(steps))  # no duplicated log lines after the resume


def test_a_resumed_run_logs_the_train_loss_of_an_uninterrupted_one(tmp_path, mnist, monkeypatch):
    """The checkpoint (step 4) falls inside a log window (every 3 steps): the window's loss goes on."""
    kw = dict(task="mnist-lenet", batch_size=64, epochs=2, lr=0.01, progress=False, log_every=3, checkpoint_every=4,
              task_options=SUBSET)  # fmt: skip
    full = fit(TrainConfig(**kw, out_dir=str(tmp_path / "full"), max_steps=9), task=mnist)
    real, calls = mnist.get_batch, []

    def crashing(*args, **kwargs):
        calls.append(1)
        if len(calls) > 5:  # during step 6, after the checkpoint of step 4
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(mnist, "get_batch", crashing)
    with pytest.raises(RuntimeError, match="killed"):
        fit(TrainConfig(**kw, out_dir=str(tmp_path / "resumed"), max_steps=9), task=mnist)
    monkeypatch.setattr(mnist, "get_batch", real)
    resumed = fit(TrainConfig(**kw, out_dir=str(tmp_path / "resumed"), max_steps=9), task=mnist)
    train = lambda res: [(r["step"], r["loss"]) for r in res.history if r["split"] == "train"]  # noqa: E731
    assert train(resumed) == train(full) and [s for s, _ in train(full)] == [3, 6, 9]


def test_a_smaller_max_steps_than_the_checkpoint_is_refused_and_changes_nothing(tmp_path, mnist):
    """A run stopped at step 6, run again with max_steps=3: the loop would not run and the checkpoint
    (step 6's weights) was saved again as step 3, so going on to the end gave other parameters."""
    kw = dict(task="mnist-lenet", batch_size=64, epochs=1, lr=0.01, progress=False, log_every=0, checkpoint_every=2,
              task_options=SUBSET, out_dir=str(tmp_path / "r"))  # fmt: skip
    full = fit(TrainConfig(**{**kw, "out_dir": str(tmp_path / "full")}), task=mnist)
    assert full.steps > 6
    fit(TrainConfig(**kw, max_steps=6), task=mnist)
    saved = (tmp_path / "r" / "checkpoint.pt").read_bytes()
    with pytest.raises(ValueError, match=r"holds this run at step 6, past max_steps=3; nothing was changed"):
        fit(TrainConfig(**kw, max_steps=3), task=mnist)
    assert (tmp_path / "r" / "checkpoint.pt").read_bytes() == saved
    resumed = fit(TrainConfig(**kw), task=mnist)
    assert resumed.steps == full.steps and resumed.final == full.final


def test_finished_run_is_returned_not_overwritten(tmp_path, mnist):
    cfg = TrainConfig(task="mnist-lenet", batch_size=128, epochs=1, base_lr=0.01, out_dir=str(tmp_path / "r"),
                      progress=False, task_options=SUBSET)  # fmt: skip
    first = fit(cfg, task=mnist)
    mtime = (tmp_path / "r" / "checkpoint.pt").stat().st_mtime_ns
    again = fit(cfg, task=mnist)
    assert again.final == first.final and (tmp_path / "r" / "checkpoint.pt").stat().st_mtime_ns == mtime
    with pytest.raises(FileExistsError, match="already holds a run"):
        fit(TrainConfig(**{**cfg.to_dict(), "resume": False, "decay_epochs": ()}), task=mnist)
    other = TrainConfig(**{**cfg.to_dict(), "base_lr": 0.5, "decay_epochs": ()})
    with pytest.raises(ValueError, match=r"holds a different run \(base_lr: saved 0.01, now 0.5\)"):
        fit(other, task=mnist)


def test_diverging_run_is_reported_and_keeps_its_checkpoint(tmp_path, mnist):
    cfg = TrainConfig(task="mnist-lenet", optimizer="sgd", batch_size=64, epochs=2, lr=1e6, out_dir=str(tmp_path / "d"),
                      progress=False, log_every=1, checkpoint_every=2, task_options=SUBSET)  # fmt: skip
    res = fit(cfg, task=mnist)
    assert res.status == "diverged" and res.steps < res.total_steps
    saved = tmp_path / "d" / "checkpoint.pt"
    nonfinite = [r for r in res.history if r["split"] == "train" and not r["loss"] < float("inf")]
    assert nonfinite and nonfinite[0]["step"] >= 2  # the weights were finite at the first checkpoint
    ck = torch.load(saved, weights_only=True)  # never overwritten by non-finite weights
    assert ck["step"] < nonfinite[0]["step"] + 2
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


def test_lamb_skips_nonfinite_gradients_and_reports_them(tmp_path, mnist):
    """A NaN gradient (from a NaN input) skips Lamb's step: the weights stay finite, the run goes on,
    and the skipped steps appear in the log records and in result.json."""
    task = get_task("mnist-lenet", **SUBSET)
    task._x["train"][:] = float("nan")  # every gradient is NaN
    cfg = TrainConfig(task="mnist-lenet", optimizer="lamb", batch_size=64, epochs=1, lr=0.01, max_steps=3,
                      out_dir=str(tmp_path / "nan"), progress=False, log_every=1, diverge_patience=10,
                      checkpoint_every=1)  # fmt: skip
    torch.manual_seed(0)
    model = task.build_model()
    before = _params(model)
    res = fit(cfg, task=task, model=model)
    # two parameter groups (with and without weight decay), each skipped at each of the 3 steps
    assert res.status == "stopped" and res.skipped_group_steps == 6
    assert [r["skipped_group_steps"] for r in res.history if r["split"] == "train"] == [2, 4, 6]
    assert json.loads((tmp_path / "nan" / "result.json").read_text())["skipped_group_steps"] == 6
    # the weights are finite but the loss is not: no checkpoint is a good one
    assert not (tmp_path / "nan" / "checkpoint.pt").exists()
    for a, b in zip(before, _params(model)):
        assert torch.equal(a, b)


def test_model_randomness_is_seeded_per_step_and_rank():
    from largebatch.train.loop import model_seed, step_generator

    seeds = {model_seed(0, step, rank) for step in range(50) for rank in range(8)}
    assert len(seeds) == 400 and model_seed(3, 7, 1) == model_seed(3, 7, 1)
    assert not seeds & {step_generator(0, step).initial_seed() for step in range(50)}


def test_logged_lr_is_the_lr_each_update_used(mnist):
    cfg = TrainConfig(task="mnist-lenet", optimizer="sgd", batch_size=128, epochs=1, lr=0.1, warmup_epochs=0.5,
                      progress=False, log_every=1)  # fmt: skip  # 4 steps: warmup 2, decay 2
    res = fit(cfg, task=mnist)
    logged = [r["lr"] for r in res.history if r["split"] == "train"]
    assert logged == pytest.approx([0.05, 0.1, 0.1, 0.05])  # (t + 1) / 2 then linear decay to 0 at step 4


def test_same_epochs_budget_and_recipe(mnist):
    cfg = TrainConfig(task="mnist-lenet", batch_size=128, epochs=2, base_lr=0.01, base_batch=32, lr_rule="sqrt",
                      warmup_epochs=0.25, warmup_rule="linear", max_steps=1, progress=False, log_every=0)  # fmt: skip
    res = fit(cfg, task=mnist)
    assert res.total_steps == 2 * 4  # 512 examples / 128 per step, 2 epochs
    assert res.lr == pytest.approx(0.01 * 2.0)  # sqrt(128 / 32)
    # linear-epoch warmup: 0.25 epochs at batch 32 (4 steps) stay 4 steps at batch 128 (1 epoch)
    assert res.warmup_steps == 4


def test_bf16_autocast_and_tensorboard(tmp_path, mnist):
    cfg = TrainConfig(task="mnist-lenet", batch_size=128, epochs=1, base_lr=0.01, precision="bf16", tensorboard=True,
                      out_dir=str(tmp_path / "tb"), progress=False, log_every=1, task_options=SUBSET)  # fmt: skip
    res = fit(cfg, task=mnist)
    assert res.status == "finished" and 0 <= res.final["accuracy"] <= 1
    assert list((tmp_path / "tb" / "tensorboard").glob("events.out.tfevents.*"))


def test_bad_inputs_have_clear_errors(mnist, tmp_path):
    with pytest.raises(ValueError, match=r"Invalid batch_size 100000: it is larger than the 512 training examples"):
        fit(TrainConfig(batch_size=100000, progress=False), task=mnist)
    with pytest.raises(ValueError, match=r"Unknown optimizer 'lion'; valid names are: lamb"):
        fit(TrainConfig(optimizer="lion"), task=mnist)
    with pytest.raises(ValueError, match=r"Invalid batch_size: 0"):
        fit(TrainConfig(batch_size=0), task=mnist)
    with pytest.raises(ValueError, match=r"Invalid precision: 'fp8'"):
        fit(TrainConfig(precision="fp8"), task=mnist)
    with pytest.raises(ValueError, match=r"max_grad_norm is given twice \(max_grad_norm=1000.0 and the optimizer option max_grad_norm=0.001\)"):
        fit(TrainConfig(max_grad_norm=1e3, optimizer_options={"max_grad_norm": 1e-3}), task=mnist)
    with pytest.raises(ValueError, match=r"Invalid exclude_from_adaptation: 'biases'; allowed are 'default', 'none', 'same' or a list"):
        fit(TrainConfig(exclude_from_adaptation="biases"), task=mnist)  # checked before any data is loaded
    for seed in (10**14, -1, 1.5):  # 10**14 overflowed the data-order generator's seed
        with pytest.raises(ValueError, match=rf"Invalid seed: {seed!r}; it must be an integer in \[0, 2\*\*31 - 1\]"):
            fit(TrainConfig(seed=seed), task=mnist)
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        get_task("mnist-lenet", data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match=r"unknown task 'imagenet'; valid tasks: bert-mlm, cifar10-resnet, mnist-lenet"):
        get_task("imagenet")
    for bad, message in [
        (dict(optimizer_options={"nosuch": 1}), r"Unknown option\(s\) nosuch for optimizer 'lamb' \(Lamb\); allowed: betas, eps"),
        (dict(optimizer="adamw", optimizer_options={"lr": 5}), r"lr cannot be an optimizer option"),
        (dict(max_steps=-3), r"Invalid max_steps: -3; it must be None \(train to the end\) or an integer >= 1"),
        (dict(base_batch=0), r"Invalid base_batch: 0"),
        (dict(lr=0.0), r"Invalid lr: 0.0; it must be a finite number > 0"),
        (dict(optimizer="adamw", max_grad_norm=-1.0), r"Invalid max_grad_norm: -1.0"),
    ]:
        with pytest.raises(ValueError, match=message):
            fit(TrainConfig(**bad, progress=False), task=mnist)


def test_max_grad_norm_clips_torch_optimizers_too(mnist):
    """--max-grad-norm clips AdamW (by clip_grad_norm_) as it clips Lamb (inside its step)."""
    runs = []
    for clip in (None, 1e-3):
        torch.manual_seed(0)
        model = mnist.build_model()
        cfg = TrainConfig(task="mnist-lenet", optimizer="sgd", optimizer_options={"momentum": 0.0}, batch_size=64,
                          lr=0.1, max_grad_norm=clip, precision="fp64", max_steps=1, progress=False, log_every=0)  # fmt: skip
        start = _params(model.double())
        fit(cfg, task=mnist, model=model)
        runs.append([b - a for a, b in zip(start, _params(model))])
    step_norm = [torch.cat([d.flatten() for d in run]).norm().item() for run in runs]
    assert step_norm[1] == pytest.approx(0.1 * 1e-3, rel=1e-4) and step_norm[0] > 10 * step_norm[1]


def test_cli_train_prints_summary_and_rejects_unknown_names(tmp_path):
    base = [sys.executable, "-m", "largebatch", "train", "--task-option", "train_subset=256",
            "--task-option", "eval_subset=128", "--no-progress"]  # fmt: skip
    out = subprocess.run(base + ["--batch-size", "64", "--epochs", "1", "--micro-batch-size", "16"],
                         capture_output=True, text=True, check=True)  # fmt: skip
    assert "finished: mnist-lenet lamb batch 64 (micro 16 x 4 accumulation x 1 ranks)" in out.stdout
    assert "accuracy" in out.stdout
    bad = subprocess.run(base + ["--optimizer", "lion"], capture_output=True, text=True)
    assert bad.returncode == 2 and "invalid choice: 'lion'" in bad.stderr and "lamb" in bad.stderr
    bad = subprocess.run(base + ["--task", "imagenet"], capture_output=True, text=True)
    assert bad.returncode == 2 and "mnist-lenet" in bad.stderr
    bad = subprocess.run(base + ["--optimizer-option", "nosuch=1"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: Unknown option(s) nosuch") and "Traceback" not in bad.stderr


def test_cli_refuses_bad_devices_folders_and_checkpoints_in_one_line(tmp_path, capsys, monkeypatch):
    """Each of these was a traceback: the command prints one line and exits with 2, and nothing of
    the user's (a file named as the output folder, a damaged checkpoint) is touched."""
    from largebatch.cli import main

    base = ["train", "--task-option", "train_subset=64", "--task-option", "eval_subset=32", "--no-progress",
            "--batch-size", "32", "--max-steps", "1"]  # fmt: skip
    afile = tmp_path / "afile"
    afile.write_text("mine")
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "checkpoint.pt").write_bytes(b"PK\x03\x04 truncated")
    finished = tmp_path / "finished"
    assert main(base + ["--out-dir", str(finished)]) == 0
    capsys.readouterr()
    for extra, message in [
        (["--device", "foo"], "Invalid device 'foo'"),
        (["--device", "cuda:7"], "Invalid device 'cuda:7': this machine has"),
        (["--out-dir", str(afile)], "it is a file, not a folder"),
        (["--out-dir", str(damaged)], "cannot load checkpoint"),
        (["--out-dir", str(finished), "--no-resume"], "already holds a run"),
        (["--task-option", "seq_len=abc", "--task", "bert-mlm"], "seq_len must be an integer, got 'abc'"),
        (["--task-option", "train_subset=1.5"], "train_subset must be a positive number of examples, got 1.5"),
    ]:
        assert main(base + extra) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err and err.count("\n") == 1, err
    assert afile.read_text() == "mine" and (damaged / "checkpoint.pt").read_bytes() == b"PK\x03\x04 truncated"


def test_cli_path_options_are_taken_as_written():
    """A folder called 2024 or null stays a folder name; other values are JSON where they parse."""
    from largebatch.commands.train import _kv

    assert _kv("data_dir=2024") == ("data_dir", "2024") and _kv("data_dir=null") == ("data_dir", "null")
    assert _kv("seq_len=64") == ("seq_len", 64) and _kv("eval_works=[1, 2]") == ("eval_works", [1, 2])
    assert _kv("config=cfg.json") == ("config", "cfg.json") and _kv("config=7") == ("config", "7")
    assert _kv('config={"hidden_size": 64}') == ("config", {"hidden_size": 64})


def _write_tiny_cifar(folder: Path, n: int = 32) -> None:
    import pickle

    import numpy as np

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        d = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": rng.integers(0, 10, n).tolist()}
        (folder / name).write_bytes(pickle.dumps(d, protocol=2))


def test_cifar_task_trains_from_the_cli(tmp_path):
    _write_tiny_cifar(tmp_path / "cifar")
    out = subprocess.run(
        [sys.executable, "-m", "largebatch", "train", "--task", "cifar10-resnet", "--task-option",
         f"data_dir={tmp_path / 'cifar'}", "--task-option", "width=0.125", "--optimizer", "lars",
         "--batch-size", "64", "--micro-batch-size", "32", "--epochs", "1", "--lr", "0.1", "--no-progress"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "finished: cifar10-resnet lars batch 64 (micro 32 x 2 accumulation" in out.stdout


def test_cifar_missing_folder_names_expected_files(tmp_path):
    with pytest.raises((FileNotFoundError, ValueError), match="data_batch_1"):
        get_task("cifar10-resnet", data_dir=str(tmp_path / "none"))


def test_bert_mlm_trains_a_few_steps(tmp_path):
    cfg = TrainConfig(task="bert-mlm", task_options={"train_subset": 64, "eval_subset": 16, "seq_len": 64},
                      optimizer="lamb", batch_size=32, micro_batch_size=16, epochs=1, base_lr=1e-3,
                      weight_decay=0.01, max_grad_norm=1.0, progress=False, out_dir=str(tmp_path / "bert"))  # fmt: skip
    res = fit(cfg)
    assert res.status == "finished" and res.steps == 2 and res.accumulation == 2
    assert 0.0 <= res.final["accuracy"] <= 1.0 and res.final["loss"] > 0


def test_bert_mlm_accumulation_equals_one_big_batch():
    """Masks are drawn per example from the step's generator: micro-batches of 16 or 8 give the
    weights of one batch of 32 (float64, dropout off, plain SGD)."""
    runs = []
    for micro in (32, 16, 8):
        task = get_task("bert-mlm", train_subset=96, eval_subset=16, seq_len=32,
                        config={"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0})  # fmt: skip
        torch.manual_seed(0)
        model = task.build_model()
        cfg = TrainConfig(task="bert-mlm", optimizer="sgd", batch_size=32, micro_batch_size=micro, epochs=1, lr=0.1,
                          precision="fp64", max_steps=2, progress=False, log_every=0)  # fmt: skip
        fit(cfg, task=task, model=model)
        runs.append(_params(model))
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_automatic_micro_batch_halves_on_out_of_memory(mnist):
    """A micro-batch that does not fit is halved and the step redone; the result is unchanged."""

    class Tight(type(mnist)):
        def loss(self, model, batch):
            if model.training and batch.weight > 16:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate (simulated)")
            return super().loss(model, batch)

    tight = Tight(**SUBSET)
    cfg = dict(task="mnist-lenet", batch_size=64, epochs=1, lr=0.05, precision="fp64", max_steps=3, progress=False, log_every=0)
    torch.manual_seed(0)
    m1 = mnist.build_model()
    fit(TrainConfig(**cfg, micro_batch_size=16), task=mnist, model=m1)
    torch.manual_seed(0)
    m2 = tight.build_model()
    res = fit(TrainConfig(**cfg), task=tight, model=m2)
    assert res.micro_batch_size == 16 and res.accumulation == 4
    assert [h["micro_batch_size"] for h in res.history if h.get("event") == "out_of_memory"] == [32, 16]
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    with pytest.raises(torch.OutOfMemoryError):  # a micro-batch the user chose is not changed
        fit(TrainConfig(**cfg, micro_batch_size=32), task=tight)


def test_check_device_knows_what_the_machine_has(monkeypatch):
    from largebatch.train.loop import check_device

    assert check_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert check_device("cuda:1") == torch.device("cuda:1") and check_device("cuda") == torch.device("cuda")
    with pytest.raises(ValueError, match=r"Invalid device 'cuda:2': this machine has 2 cuda device\(s\)"):
        check_device("cuda:2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="this machine has no cuda device"):
        check_device("cuda")
    with pytest.raises(ValueError, match="Invalid device 'gpu0'"):
        check_device("gpu0")


def test_cli_exclude_from_adaptation_reaches_the_config():
    import argparse

    from largebatch.commands import train as train_command

    parser = argparse.ArgumentParser()
    train_command.add_arguments(parser)
    rule = lambda *words: train_command.config_from_args(parser.parse_args(list(words))).exclude_from_adaptation  # noqa: E731
    assert rule() == "same"
    assert rule("--exclude-from-adaptation", "none") == "none"
    assert rule("--exclude-from-adaptation", "*bias", "*norm*") == ["*bias", "*norm*"]
    cfg = train_command.config_from_args(parser.parse_args(["--exclude-from-adaptation", "*bias"]))
    cfg.validate()  # a list of patterns is allowed
