"""What a user may count on when a run stops, resumes, meets a NaN or finds other files in its folder."""

import json
import math
from pathlib import Path

import pytest
import torch

from largebatch.train.checkpoint import CheckpointError
from largebatch.train.data import default_data_dir
from largebatch.train.loop import TrainConfig, fit
from largebatch.train.tasks import get_task

SUBSET = {"train_subset": 320, "eval_subset": 64}


@pytest.fixture(scope="module")
def mnist():
    return get_task("mnist-lenet", **SUBSET)


def _records(out_dir: Path) -> list[dict]:
    """metrics.jsonl without the throughput (a wall-clock rate)."""
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k != "examples_per_s"} for x in lines]


@pytest.mark.parametrize("stop", [5, 4])
def test_a_run_stopped_by_max_steps_and_resumed_is_an_uninterrupted_run(tmp_path, mnist, stop):
    """15 steps (5 per epoch), micro-batches of 24 in a batch of 64, warmup then decay, a train record
    every 3 steps and an eval every 4. Stopped at step 5 (inside a log window, no eval there) or 4
    (an eval step), then resumed: the weights and the whole log are those of the uninterrupted run.
    The stopped run's record of part of a window (steps 4-5) and its final eval at step 5 are its
    own (result.json); the resumed log went on from them, so its step-6 loss averaged step 6 only."""
    kw = dict(task="mnist-lenet", task_options=SUBSET, batch_size=64, micro_batch_size=24, epochs=3, base_lr=0.01,
              warmup_epochs=0.5, weight_decay=0.01, progress=False, log_every=3, eval_every=4)  # fmt: skip
    full = fit(TrainConfig(**kw, out_dir=str(tmp_path / "full")), task=mnist)
    stopped = fit(TrainConfig(**kw, out_dir=str(tmp_path / "r"), max_steps=stop), task=mnist)
    assert stopped.status == "stopped" and stopped.steps == stop
    if stop == 5:  # what the stopped run did is in its result: a train record of steps 4-5 and an eval
        assert [(r["step"], r["split"]) for r in stopped.history][-2:] == [(5, "train"), (5, "eval")]
    resumed = fit(TrainConfig(**kw, out_dir=str(tmp_path / "r")), task=mnist)
    assert resumed.status == full.status == "finished" and resumed.steps == full.steps == 15
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert resumed.final == full.final
    log = _records(tmp_path / "full")
    assert [(r["step"], r["split"]) for r in log] == [(3, "train"), (4, "eval"), (6, "train"), (8, "eval"), (9, "train"),
                                                      (12, "train"), (12, "eval"), (15, "train"), (15, "eval")]  # fmt: skip
    assert [r["lr"] for r in log if r["split"] == "train"] == pytest.approx([0.01, 0.01 * 10 / 12, 0.01 * 7 / 12,
                                                                            0.01 * 4 / 12, 0.01 * 1 / 12])  # fmt: skip
    assert _records(tmp_path / "r") == log


def test_tuple_and_path_options_do_not_lock_a_run_out_of_its_folder(tmp_path, mnist):
    """betas as a tuple and data_dir as a Path (both natural from Python): result.json stores them
    as a list and text, so the stopped run was "a different run" from the same config, and the
    checkpoint held a PosixPath that torch.load(weights_only=True) refuses."""
    cfg = lambda **kw: TrainConfig(task="mnist-lenet", batch_size=64, epochs=1, lr=0.01, progress=False,  # noqa: E731
                                   log_every=0, optimizer_options={"betas": (0.9, 0.99)}, out_dir=str(tmp_path / "r"),
                                   task_options={"data_dir": default_data_dir() / "mnist", **SUBSET}, **kw)  # fmt: skip
    assert fit(cfg(max_steps=2), task=mnist).status == "stopped"
    assert fit(cfg(max_steps=3), task=mnist).steps == 3  # goes on from result.json "stopped" and the checkpoint
    (tmp_path / "r" / "result.json").unlink()  # as if killed after the checkpoint of step 3
    finished = fit(cfg(), task=mnist)
    assert finished.status == "finished" and finished.steps == 5
    assert fit(cfg(), task=mnist).final == finished.final  # the finished run is returned
    saved = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)["config"]
    assert saved["optimizer_options"] == {"betas": [0.9, 0.99]}
    assert saved["task_options"]["data_dir"] == str(default_data_dir() / "mnist")
    with pytest.raises(ValueError, match=r"holds a different run \(optimizer_options: saved \{'betas': \[0.9, 0.99\]\}"):
        fit(TrainConfig(**{**cfg().to_dict(), "optimizer_options": {"betas": (0.9, 0.98)}}), task=mnist)


@pytest.mark.parametrize("value", [0, -5, 2.5])
def test_a_bad_eval_batch_size_is_refused_before_training(tmp_path, mnist, value):
    """eval_batch_size=0 failed in the final evaluation, after the last step and before the last
    checkpoint, so the whole run was lost; -5 gave a run with no eval metrics."""
    out = tmp_path / "r"
    with pytest.raises(ValueError, match=rf"Invalid eval_batch_size: {value}; it must be a positive integer"):
        fit(TrainConfig(task="mnist-lenet", batch_size=64, epochs=1, lr=0.01, progress=False, eval_batch_size=value,
                        out_dir=str(out)), task=mnist)  # fmt: skip
    assert not out.exists()


def test_files_in_the_folder_that_are_not_a_run_are_named_and_left_alone(tmp_path, capsys):
    """A checkpoint.pt of other weights and a damaged result.json were KeyError/IndexError/
    JSONDecodeError tracebacks (or a bare JSON message); now one line naming the file."""
    from largebatch.cli import main

    base = ["train", "--task-option", "train_subset=64", "--task-option", "eval_subset=32", "--no-progress",
            "--batch-size", "32", "--max-steps", "1"]  # fmt: skip
    cases = [
        ("checkpoint.pt", lambda p: torch.save({"w": torch.ones(2)}, p), "checkpoint.pt' is not a checkpoint of a training run"),
        ("checkpoint.pt", lambda p: torch.save(torch.ones(2), p), "checkpoint.pt' is not a checkpoint of a training run"),
        ("result.json", lambda p: p.write_text("{trunc"), "result.json' is not the result of a training run (not valid JSON"),
        ("result.json", lambda p: p.write_text('{"status": "finished"}'), "result.json' is not the result of a training run (no steps"),
        ("result.json", lambda p: p.write_text("[1]"), "result.json' is not the result of a training run (not a JSON object)"),
    ]  # fmt: skip
    for i, (name, write, message) in enumerate(cases):
        folder = tmp_path / str(i)
        folder.mkdir()
        write(folder / name)
        before = (folder / name).read_bytes()
        assert main(base + ["--out-dir", str(folder)]) == 2, name
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err and err.count("\n") == 1, err
        assert (folder / name).read_bytes() == before
    cfg = TrainConfig(task="mnist-lenet", batch_size=32, epochs=1, lr=0.01, progress=False, out_dir=str(tmp_path / "0"))
    with pytest.raises(CheckpointError, match="it has no model, optimizer, scheduler, rng, step, history, wall_time, config"):
        fit(cfg, task=get_task("mnist-lenet", train_subset=64, eval_subset=32))


def test_weights_that_are_not_finite_at_the_end_are_a_diverged_run(tmp_path, mnist, monkeypatch):
    """SGD meets a NaN input in the last of 5 steps: fewer non-finite log records than the patience,
    so the run was "finished" (exit 0) with NaN weights and an eval loss of NaN, and result.json
    said finished at step 5 beside a checkpoint of step 4."""
    real, calls = mnist.get_batch, []

    def nan_at_step_5(split, indices, generator=None):
        batch = real(split, indices, generator)
        if split == "train":
            calls.append(1)
            if len(calls) == 5:
                batch.tensors["x"] = batch.tensors["x"] * float("nan")
        return batch

    monkeypatch.setattr(mnist, "get_batch", nan_at_step_5)
    out = tmp_path / "r"
    cfg = TrainConfig(task="mnist-lenet", optimizer="sgd", batch_size=64, epochs=1, lr=0.01, progress=False, log_every=1,
                      checkpoint_every=2, out_dir=str(out))  # fmt: skip
    res = fit(cfg, task=mnist)
    assert res.status == "diverged" and res.steps == 5 and math.isnan(res.final["loss"])
    assert json.loads((out / "result.json").read_text())["status"] == "diverged"
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 4 and all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    monkeypatch.setattr(mnist, "get_batch", real)  # the data mended: the run goes on from its last good checkpoint
    again = fit(cfg, task=mnist)
    assert again.status == "finished" and again.steps == 5 and again.final["loss"] == again.final["loss"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_run_on_a_gpu_resumes(tmp_path, mnist):
    """The checkpoint is loaded onto the run's device, RNG states included, and torch refuses an RNG
    state on a GPU ("RNG state must be a torch.ByteTensor"): no run on a GPU could be resumed."""
    kw = dict(task="mnist-lenet", batch_size=64, epochs=1, lr=0.01, progress=False, device="cuda",
              out_dir=str(tmp_path / "r"))  # fmt: skip
    assert fit(TrainConfig(**kw, max_steps=2), task=mnist).status == "stopped"
    res = fit(TrainConfig(**kw), task=mnist)
    assert res.status == "finished" and res.steps == 5


@pytest.mark.parametrize(("name", "value", "allowed"), [
    ("log_every", 2.5, "an integer >= 0"), ("eval_every", "10", "an integer >= 0"), ("checkpoint_every", True, "an integer >= 0"),
    ("checkpoint_every", -1, "an integer >= 0"), ("max_micro_batch", 0, "a positive integer"),
    ("max_micro_batch", 64.0, "a positive integer"), ("diverge_patience", 0, "a positive integer"),
])  # fmt: skip
def test_step_counts_of_the_config_must_be_integers(name, value, allowed):
    """A float or a string here failed later (a modulo of the step, a slice) or never (patience 0)."""
    with pytest.raises(ValueError, match=rf"Invalid {name}: {value!r}; it must be {allowed}"):
        TrainConfig(task="mnist-lenet", batch_size=64, epochs=1, lr=0.01, **{name: value}).validate()
