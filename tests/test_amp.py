"""torch.amp.GradScaler: the step takes the scaler's scale and inf flag (``_step_supports_amp_scaling``).

The reference is the scaler's ordinary protocol, which the same optimizer follows with the flag
turned off: ``unscale_`` multiplies the gradients in place by 1 / scale, and a step with an inf/nan
is not called at all. Handed the scale, the step unscales the gradients the same way (the CPU
kernel in its first pass, storing them back), so parameters and gradients are the same bits.
"""

import pytest
import torch
from conftest import PATH_IDS, PATHS

from largebatch import Lamb, Lars

INF_STEP = 3


def train(cls, kw, *, fused_scaling, steps=6, unscale_first=False, inf_step=INF_STEP, init_scale=2.0**12, grads=None):
    """Parameters, final scale, skipped_steps and the optimizer; ``grads`` collects the gradients
    after every step."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = cls(model.parameters(), lr=1e-2, weight_decay=0.01, **kw)
    if not fused_scaling:
        opt._step_supports_amp_scaling = False  # the scaler unscales in place and skips the call itself
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=2)
    gen = torch.Generator().manual_seed(1)
    for t in range(steps):
        xb, yb = torch.randn(32, 8, generator=gen), torch.randn(32, 1, generator=gen)
        opt.zero_grad()
        scaler.scale(torch.nn.functional.mse_loss(model(xb), yb)).backward()
        if t == inf_step:
            model[0].weight.grad[0, 0] = float("inf")
        if unscale_first:  # e.g. to clip by hand: the scaler then passes no scale, only its flag
            scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
        if grads is not None:
            grads.append([p.grad.clone() for p in model.parameters()])
    assert not hasattr(opt, "found_inf") and not hasattr(opt, "grad_scale")  # the scaler removed them
    return [p.detach().clone() for p in model.parameters()], float(scaler.get_scale()), int(opt.skipped_steps), opt


CASES = [
    (Lamb, dict()),
    (Lamb, dict(max_grad_norm=0.5, nesterov="first")),
    (Lamb, dict(update_in_grad=True)),
    (Lars, dict()),
    (Lars, dict(mode="classic", max_grad_norm=0.5)),
    # one shard: the identity stands for the all-reduce (the kernel's two-stage path)
    (Lamb, dict(norm_reducer=lambda sq: sq, update_in_grad=True, nesterov="both")),
    (Lars, dict(norm_reducer=lambda sq: sq, mode="classic", nesterov=True)),
]


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("unscale_first", [False, True], ids=["scaled", "unscaled"])
@pytest.mark.parametrize("cls,kw", CASES, ids=lambda c: getattr(c, "__name__", None) or ",".join(c) or "defaults")
def test_grad_scaler_steps_as_its_ordinary_protocol(cls, kw, unscale_first, path):
    """Parameters and the gradients left after every step (unscaled, as unscale_ leaves them, also
    after the skipped step; the update where update_in_grad) are the same bits."""
    grads, ref_grads = [], []
    ours, scale, skipped, opt = train(cls, kw | path, fused_scaling=True, unscale_first=unscale_first, grads=grads)
    ref, ref_scale, ref_skipped, ref_opt = train(cls, kw | path, fused_scaling=False, unscale_first=unscale_first,
                                                 grads=ref_grads)  # fmt: skip
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)
    for step, (gs, ref_gs) in enumerate(zip(grads, ref_grads)):
        for a, b in zip(gs, ref_gs):
            assert torch.equal(a, b), step  # the inf of the skipped step included
    assert scale == ref_scale == 2.0**13  # 2^12, x2 after steps 0-1, /2 at the inf (step 3), x2 after steps 4-5
    assert skipped == 1 and ref_skipped == 0  # the overflow reached our step (counted) / never called it
    steps = [float(s["step"]) for s in opt.state.values() if "step" in s]
    assert all(s == 5 for s in steps)  # 6 steps, one skipped


@pytest.mark.parametrize("nonfinite", ["skip", "raise", "none"])
def test_an_overflow_is_skipped_under_every_policy(nonfinite):
    """Overflow is how the scaler finds its scale: "raise" does not raise for it, "none" still skips."""
    ours, _, skipped, _ = train(Lamb, dict(nonfinite=nonfinite), fused_scaling=True)
    ref, *_ = train(Lamb, dict(nonfinite=nonfinite), fused_scaling=False)
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)
    assert skipped == 1


def test_scale_is_applied_inside_the_step():
    """Without the scaler's unscale_ the step itself divides by the scale: dropping it would give a
    different trajectory (a control that the comparison above is not vacuous). Adam's direction, the
    trust ratio and global clipping hardly depend on the gradients' scale, so the control has no
    clipping and an eps large enough to show it."""
    ours, *_ = train(Lamb, dict(eps=0.1), fused_scaling=True, inf_step=-1)
    opt_cls = type("IgnoresScale", (Lamb,), {"_amp_scaling": lambda self: (None, None)})
    wrong, *_ = train(opt_cls, dict(eps=0.1), fused_scaling=True, inf_step=-1)
    assert max(float((a - b).abs().max()) for a, b in zip(ours, wrong)) > 1e-4


@pytest.mark.parametrize("name,reaches_step", [("lamb+gradscaler", True), ("lamb+gradscaler-unscale", False),
                                               ("adamw-fused+gradscaler", True)])  # fmt: skip
def test_bench_grad_scaler_rows_take_the_protocol_they_name(name, reaches_step):
    """`largebatch bench` rows under a GradScaler: the scale and flag are handed to the step only
    where the row says so (Lamb then counts the skipped step; the ordinary protocol never calls it),
    an inf gradient changes nothing, and the scaler backs off."""
    from largebatch import bench

    params = bench.make_tensors([(3, 4), (4,)])
    opt = bench._impl(name).make(params)
    assert opt._step_supports_amp_scaling == reaches_step
    before = [p.detach().clone() for p in params]
    params[0].grad[1, 1] = float("inf")
    opt.step()
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))
    assert float(opt._scaler.get_scale()) == 0.5
    if name.startswith("lamb"):
        assert int(opt.skipped_steps) == int(reaches_step)
    params[0].grad[1, 1] = 0.0
    opt.step()
    assert not torch.equal(params[0].detach(), before[0])


def test_float16_parameters_with_master_weights_under_grad_scaler():
    """float16 parameters (float32 masters): the scaler's ordinary protocol refuses to unscale
    float16 gradients in place; handed the scale, the step unscales them in float32. A scale that is
    a power of two is exact in float16 arithmetic, so the run equals an unscaled one bit for bit."""

    def run(scaler):
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 4).half()
        opt = Lamb(model.parameters(), lr=1e-2, weight_decay=0.01, max_grad_norm=0.5)
        gen = torch.Generator().manual_seed(1)
        for _ in range(5):
            loss = model(torch.randn(16, 8, generator=gen).half()).float().square().mean()
            opt.zero_grad()
            (loss if scaler is None else scaler.scale(loss)).backward()
            if scaler is None:
                opt.step()
            else:
                scaler.step(opt)
                scaler.update()
        return [opt.state[p]["master"].clone() for p in model.parameters()] + [p.detach().clone() for p in model.parameters()]

    ref = run(None)
    ours = run(torch.amp.GradScaler("cpu", init_scale=2.0**10))
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients"):
        model = torch.nn.Linear(8, 4).half()
        opt = Lamb(model.parameters(), lr=1e-2)
        opt._step_supports_amp_scaling = False
        scaler = torch.amp.GradScaler("cpu")
        scaler.scale(model(torch.randn(2, 8).half()).float().sum()).backward()
        scaler.step(opt)


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("cls", [Lamb, Lars], ids=["lamb", "lars"])
def test_a_scale_that_is_not_a_power_of_two(cls, path):
    """GradScaler(init_scale=1000): the gradients are unscaled exactly as unscale_ does (same bits);
    with global clipping the norm is that of the scaled gradients times 1 / scale, which rounds
    differently from the norm of the unscaled ones (relative 1e-6 at most here)."""
    grads, ref_grads = [], []
    ours, *_ = train(cls, path, fused_scaling=True, init_scale=1000.0, grads=grads)
    ref, *_ = train(cls, path, fused_scaling=False, init_scale=1000.0, grads=ref_grads)
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)
    for a, b in zip(grads[-1], ref_grads[-1]):
        assert torch.equal(a, b)
    ours, *_ = train(cls, path | dict(max_grad_norm=0.5), fused_scaling=True, init_scale=1000.0)
    ref, *_ = train(cls, path | dict(max_grad_norm=0.5), fused_scaling=False, init_scale=1000.0)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_a_failed_step_does_not_leave_the_scale_behind():
    """A step that raises inside scaler.step (here: update_in_grad with the bfloat16 gradient of a
    float32 master) drops the scaler's attributes, so the retried step is unscaled once, not twice."""

    def run(retry):
        a = torch.nn.Parameter(torch.linspace(-1, 1, 6))
        b = torch.nn.Parameter(torch.linspace(1, 2, 4).bfloat16())
        opt = Lamb([{"params": [a]}, {"params": [b], "update_in_grad": retry}], lr=1e-2, update_in_grad=True)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        scaler.scale(torch.zeros(()))  # the scale exists, as after scaler.scale(loss)
        a.grad = torch.linspace(0.5, -0.5, 6) * 2.0**10  # gradients of a scaled loss
        b.grad = (torch.linspace(-0.1, 0.2, 4) * 2.0**10).bfloat16()
        if retry:
            with pytest.raises(ValueError, match="update_in_grad"):
                scaler.step(opt)
            assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")
            opt.param_groups[1]["update_in_grad"] = False
        scaler.step(opt)
        return [a.detach().clone(), b.detach().clone(), opt.state[b]["master"].clone()]

    for x, y in zip(run(retry=True), run(retry=False)):
        assert torch.equal(x, y)


def test_no_host_read_under_the_scaler():
    """Meta tensors have no data: a host read of the flag (or a copy of it to the CPU) would raise."""
    p = torch.nn.Parameter(torch.randn(4, device="meta"))
    p.grad = torch.randn(4, device="meta")
    opt = Lamb([p], lr=0.1, max_grad_norm=1.0)  # the torch-function backend (the one GPUs use)
    opt.found_inf, opt.grad_scale = torch.zeros((), device="meta"), torch.ones((), device="meta")
    opt.step()
    assert opt.skipped_steps.device.type == "meta"
