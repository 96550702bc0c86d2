"""The optimizer API contract of Lamb and Lars: options, parameter groups and state dicts."""

import io
import itertools

import pytest
import torch
from conftest import PATH_IDS, PATHS, clone_params

from largebatch.optim import Lamb, Lars

OPTIMIZERS = [
    (Lamb, dict(lr=0.01, weight_decay=0.1)),
    (Lars, dict(lr=0.1, weight_decay=0.01)),
    (Lars, dict(lr=0.1, weight_decay=0.01, mode="classic", nesterov=True)),
]
OPTIMIZER_IDS = ["lamb", "lars-paper", "lars-classic"]


def _params(dtype=torch.float32, seed=0, shapes=((5, 3), (3,), (4, 4), (), (2, 2))):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).requires_grad_() for s in shapes]


def _grads(params, k):
    gen = torch.Generator().manual_seed(100 + k)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)


def _round_trip(state_dict):
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _assert_same_state(opt_a, params_a, opt_b, params_b, tol=0.0):
    for pa, pb in zip(params_a, params_b):
        torch.testing.assert_close(pa, pb, rtol=tol, atol=tol)
        sa, sb = opt_a.state[pa], opt_b.state[pb]
        assert sa.keys() == sb.keys()
        for k in sa:
            assert sa[k].dtype == sb[k].dtype and sa[k].device == sb[k].device, k
            torch.testing.assert_close(sa[k], sb[k], rtol=tol, atol=tol, msg=lambda m: f"state {k!r}: {m}")


# -- options -----------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [Lamb, Lars])
@pytest.mark.parametrize("option, value", [("foreach", 0), ("foreach", 1), ("fused", 0), ("fused", 1)])
def test_foreach_and_fused_take_none_true_or_false_only(cls, option, value):
    # 0 == False, but "fused is False" / "foreach is False" select the paths: fused=0 ran the fused kernel
    with pytest.raises(ValueError, match=rf"Invalid {option}: {value}; allowed values are None \(auto\), True, False"):
        cls(_params(), **{option: value})


def test_a_lars_group_with_an_unknown_mode_is_refused_naming_the_mode():
    p = _params()
    with pytest.raises(ValueError, match=r"Invalid mode: 'Classic'; allowed values are 'paper', 'classic'"):
        Lars([{"params": p[:2]}, {"params": p[2:], "mode": "Classic"}], lr=0.1)


def test_fused_true_says_why_non_contiguous_cpu_tensors_have_no_fused_backend():
    p = torch.randn(6, 4).t().detach().requires_grad_()
    opt = Lamb([p], lr=0.1, fused=True)
    p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match=r"non-contiguous CPU tensors.*use fused=None to fall back"):
        opt.step()


# -- parameter groups --------------------------------------------------------------------------


@pytest.mark.parametrize("cls, kw", OPTIMIZERS, ids=OPTIMIZER_IDS)
@pytest.mark.parametrize("bad", [{"lr": -1.0}, {"weight_decay": -0.5}, {"adapt": "no"}], ids=["lr", "wd", "adapt"])
def test_a_refused_param_group_is_not_added(cls, kw, bad):
    params = _params()
    twin = clone_params(params)
    opt = cls(params[:3], **kw)
    with pytest.raises(ValueError, match="Invalid"):
        opt.add_param_group({"params": params[3:], **bad})
    assert len(opt.param_groups) == 1
    before = [p.detach().clone() for p in params[3:]]
    _grads(params, 0)
    opt.step()
    for p, b in zip(params[3:], before):  # the refused group is not stepped (with lr=-1: ascent)
        assert torch.equal(p, b)
        assert len(opt.state[p]) == 0
    # the same parameters can then be added with valid options
    opt.add_param_group({"params": params[3:], "lr": 0.05})
    ref = cls(twin[:3], **kw)
    _grads(twin, 0)
    ref.step()
    ref.add_param_group({"params": twin[3:], "lr": 0.05})
    for k in (1, 2):
        _grads(params, k)
        _grads(twin, k)
        opt.step()
        ref.step()
    _assert_same_state(opt, params, ref, twin)


@pytest.mark.filterwarnings("ignore:optimizer contains a parameter group with duplicate parameters")
@pytest.mark.parametrize("cls", [Lamb, Lars])
def test_the_same_tensor_twice_in_a_group_is_refused(cls):
    """torch.optim only warns; the paths would step such a tensor differently (twice, or racing)."""
    a, b = _params()[:2]
    with pytest.raises(ValueError, match=r"parameters 0 and 2 are the same tensor"):
        cls([a, b, a], lr=0.1)
    opt = cls([b], lr=0.1)
    with pytest.raises(ValueError, match=r"parameters 1 and 2 are the same tensor"):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True), a, a]})
    assert len(opt.param_groups) == 1


# -- state dicts -------------------------------------------------------------------------------


def _run(cls, kw, path, dtype, master_weights=True):
    """Steps with a None gradient, then a group added after some steps: a state with gaps."""
    params = _params(dtype)
    opt = cls(params[:3], master_weights=master_weights, **kw, **path)
    for k in range(2):
        _grads(params[:3], k)
        params[1].grad = None
        opt.step()
    opt.add_param_group({"params": params[3:], "lr": kw["lr"] * 0.5, "weight_decay": 0.0})
    for k in range(2, 4):
        _grads(params, k)
        params[4].grad = None
        opt.step()
    return params, opt


@pytest.mark.parametrize("cls, kw", OPTIMIZERS, ids=OPTIMIZER_IDS)
@pytest.mark.parametrize("saved_on, loaded_on", list(itertools.product(range(3), range(3))))
def test_a_resume_across_paths_continues_as_without_saving(cls, kw, saved_on, loaded_on):
    a, opt_a = _run(cls, kw, PATHS[saved_on], torch.float32)
    b, opt_b = _run(cls, kw, PATHS[saved_on], torch.float32)
    saved = _round_trip(opt_b.state_dict())
    c = clone_params(b)
    opt_c = cls(c[:3], **kw, **PATHS[loaded_on])
    opt_c.add_param_group({"params": c[3:], "lr": 123.0})
    opt_c.load_state_dict(saved)
    assert opt_c.param_groups[1]["lr"] == kw["lr"] * 0.5
    for k in (4, 5):
        _grads(a, k)
        _grads(c, k)
        opt_a.step()
        opt_c.step()
    _assert_same_state(opt_a, a, opt_c, c, tol=0.0 if saved_on == loaded_on else 1e-5)


@pytest.mark.parametrize("cls, kw", OPTIMIZERS[:2], ids=OPTIMIZER_IDS[:2])
def test_a_resume_with_master_weights_creates_the_master_copy(cls, kw):
    """A state saved with master_weights=False, loaded with True: the 16-bit parameters are then
    updated through a float32 copy, exactly as float32 parameters with that state would be."""
    params, opt = _run(cls, kw, dict(foreach=False), torch.bfloat16, master_weights=False)
    saved = opt.state_dict()
    assert all("master" not in s for s in saved["state"].values())
    resumed = clone_params(params)
    opt_r = cls(resumed[:3], **kw, foreach=False)
    opt_r.add_param_group({"params": resumed[3:]})
    opt_r.load_state_dict(_round_trip(saved))  # each its own copy: a loaded state dict is not copied
    wide = [p.detach().float().requires_grad_() for p in params]
    opt_w = cls(wide[:3], **kw, foreach=False)
    opt_w.add_param_group({"params": wide[3:]})
    opt_w.load_state_dict(_round_trip(saved))
    for p, w in zip(resumed, wide):
        if opt_r.state[p]:
            assert opt_r.state[p]["master"].dtype == torch.float32
            assert torch.equal(opt_r.state[p]["master"], w.detach())
    for k in (4, 5, 6):
        _grads(resumed, k)
        _grads(wide, k)
        for p, w in zip(resumed, wide):
            w.grad = p.grad.float()
        opt_r.step()
        opt_w.step()
    for p, w in zip(resumed, wide):
        assert torch.equal(opt_r.state[p]["master"], w.detach())
        assert torch.equal(p.detach(), w.detach().bfloat16())
    assert any(not torch.equal(p.detach().float(), w.detach()) for p, w in zip(resumed, wide))


def test_a_resume_without_master_weights_drops_the_master_copy():
    params, opt = _run(Lamb, dict(lr=0.01, weight_decay=0.1), dict(foreach=False), torch.bfloat16)
    saved = opt.state_dict()
    assert any("master" in s for s in saved["state"].values())
    resumed = clone_params(params)
    opt_r = Lamb(resumed[:3], lr=0.01, weight_decay=0.1, foreach=False, master_weights=False)
    opt_r.add_param_group({"params": resumed[3:], "lr": 0.005, "weight_decay": 0.0})
    opt_r.load_state_dict(_round_trip(saved))
    assert all("master" not in s for s in opt_r.state.values())
    # it continues as an optimizer that never had master weights, from the same moments
    plain = clone_params(params)
    opt_p = Lamb(plain[:3], lr=0.01, weight_decay=0.1, foreach=False, master_weights=False)
    opt_p.add_param_group({"params": plain[3:], "lr": 0.005, "weight_decay": 0.0})
    saved_plain = {**saved, "state": {i: {k: v for k, v in s.items() if k != "master"} for i, s in saved["state"].items()}}
    opt_p.load_state_dict(_round_trip(saved_plain))
    for k in (4, 5):
        _grads(resumed, k)
        _grads(plain, k)
        opt_r.step()
        opt_p.step()
    _assert_same_state(opt_r, resumed, opt_p, plain)


def test_a_loaded_step_counter_is_moved_to_its_parameters_device():
    """torch.optim leaves "step" where it was loaded (map_location="cpu"); the moments move to the
    parameter. The step must follow them (the meta device stands in for an accelerator here)."""
    cpu = _params(shapes=((3, 2), (4,)))
    opt = Lamb(cpu, lr=0.1)
    for k in range(3):
        _grads(cpu, k)
        opt.step()
    meta = [torch.empty(p.shape, device="meta", requires_grad=True) for p in cpu]
    opt_meta = Lamb(meta, lr=0.1)
    opt_meta.load_state_dict(_round_trip(opt.state_dict()))
    for p in meta:
        assert {k: v.device.type for k, v in opt_meta.state[p].items()} == dict.fromkeys(Lamb._STATE_KEYS, "meta")
    # on the same device nothing is moved or changed
    again = clone_params(cpu)
    opt_again = Lamb(again, lr=0.1)
    opt_again.load_state_dict(_round_trip(opt.state_dict()))
    for p, q in zip(cpu, again):
        assert float(opt_again.state[q]["step"]) == float(opt.state[p]["step"]) == 3.0
