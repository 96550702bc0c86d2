"""The gradient noise scale estimator against closed forms."""

from __future__ import annotations

import pytest
import torch

from largebatch.study.noise import LinearRegressionTask, NoiseProbe, measure_noise_scale, noise_scale_from_norms


def test_estimates_from_exact_expected_norms():
    # E|G_B|^2 = |G|^2 + tr(Sigma) / B: the two-batch estimates invert it exactly
    g2, trace = 0.37, 12.5
    for b_small, b_big in ((1, 2), (8, 256), (32, 4096)):
        est = noise_scale_from_norms(g2 + trace / b_small, g2 + trace / b_big, b_small, b_big)
        assert est.grad_sq == pytest.approx(g2, rel=1e-12)
        assert est.trace == pytest.approx(trace, rel=1e-12)
        assert est.b_simple == pytest.approx(trace / g2, rel=1e-12)
    assert noise_scale_from_norms(2.0, 0.5, 4, 8).b_simple == float("inf")  # |G|^2 estimate (4 - 8) / 4 <= 0
    with pytest.raises(ValueError, match="0 < b_small < b_big"):
        noise_scale_from_norms(1.0, 1.0, 8, 8)


def test_measured_noise_scale_matches_linear_regression_closed_form():
    task = LinearRegressionTask(dim=20, n_train=100_000, noise_std=1.0, seed=0)
    model = task.build_model()
    delta = torch.randn(20, generator=torch.Generator().manual_seed(1), dtype=torch.float64) / 20**0.5
    with torch.no_grad():
        model.weight.copy_((task.w_star + delta).reshape(1, -1))
    exact = task.closed_form(model.weight)
    assert exact["trace"] == pytest.approx(20 * (exact["grad_sq"] + 1.0) + exact["grad_sq"])
    est = measure_noise_scale(model, task, b_small=8, b_big=256, batches=40, seed=0)
    assert est.grad_sq == pytest.approx(exact["grad_sq"], rel=0.1)
    assert est.trace == pytest.approx(exact["trace"], rel=0.1)
    assert est.b_simple == pytest.approx(exact["b_simple"], rel=0.1)
    assert all(p.grad is None for p in model.parameters())  # .grad untouched


def test_measurement_leaves_rng_and_training_unchanged():
    task = LinearRegressionTask(dim=4, n_train=2048, seed=0)
    model = task.build_model()
    state = torch.get_rng_state()
    measure_noise_scale(model, task, 4, 64, batches=2)
    assert torch.equal(state, torch.get_rng_state())

    from largebatch.train.loop import TrainConfig, fit

    cfg = dict(task="mnist-lenet", optimizer="lamb", batch_size=64, epochs=1, base_lr=0.01, eval_every=2, progress=False,
               log_every=1)  # fmt: skip
    from largebatch.train.tasks import get_task

    mnist = get_task("mnist-lenet", train_subset=256, eval_subset=64)
    plain = fit(TrainConfig(**cfg), mnist)
    probed = fit(TrainConfig(**cfg), NoiseProbe(mnist, b_small=16, b_big=64, batches=1))
    assert [h["loss"] for h in plain.history] == [h["loss"] for h in probed.history]
    evals = [h for h in probed.history if h["split"] == "eval"]
    assert len(evals) == 2 and all(h["noise_trace"] > 0 for h in evals)


def test_noise_probe_of_a_resumed_run_measures_what_an_uninterrupted_one_does(tmp_path):
    """The probe's batches depend on the parameters measured at, not on a per-process call count
    (which restarted at 0 after a resume and gave other noise-scale numbers)."""
    from largebatch.train.loop import TrainConfig, fit
    from largebatch.train.tasks import get_task

    mnist = get_task("mnist-lenet", train_subset=256, eval_subset=64)
    cfg = dict(task="mnist-lenet", optimizer="lamb", batch_size=64, epochs=2, base_lr=0.01, eval_every=2,
               checkpoint_every=2, progress=False, log_every=0)  # fmt: skip
    probe = lambda: NoiseProbe(mnist, b_small=16, b_big=64, batches=1)  # noqa: E731
    noise = lambda res: [(h["step"], h["noise_b_simple"], h["noise_trace"]) for h in res.history if h["split"] == "eval"]  # noqa: E731
    full = fit(TrainConfig(**cfg, out_dir=str(tmp_path / "full")), probe())
    fit(TrainConfig(**cfg, out_dir=str(tmp_path / "cut"), max_steps=4), probe())
    resumed = fit(TrainConfig(**cfg, out_dir=str(tmp_path / "cut")), probe())  # a new probe: a new process
    assert len(noise(full)) >= 3 and noise(resumed) == noise(full)
    # a measurement at other parameters draws other batches; at the same ones, the same
    model = mnist.build_model()
    a, b = probe().evaluate(model, batch_size=64), probe().evaluate(model, batch_size=64)
    assert a == b
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)
    assert probe().evaluate(model, batch_size=64)["noise_trace"] != a["noise_trace"]
