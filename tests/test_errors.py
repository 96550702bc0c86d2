"""The error table: each bad argument and the message it gets."""

import pytest
import torch

from largebatch import Lamb, Lars, create_optimizer, param_groups


def P():
    return [torch.zeros(2, requires_grad=True)]


ERRORS = [
    (Lamb, dict(lr=-1.0), ValueError, r"Invalid learning rate value: -1.0; it must be a finite number >= 0"),
    (Lamb, dict(lr=float("nan")), ValueError, r"Invalid learning rate value: nan"),
    (Lamb, dict(eps=-1e-8), ValueError, r"Invalid epsilon value: -1e-08; it must be a finite number >= 0"),
    (Lamb, dict(weight_decay=-0.1), ValueError, r"Invalid weight_decay value: -0.1"),
    (Lamb, dict(betas=(1.0, 0.999)), ValueError, r"Invalid beta parameter at index 0: 1.0; it must be in \[0, 1\)"),
    (Lamb, dict(betas=(0.9, -0.1)), ValueError, r"Invalid beta parameter at index 1: -0.1"),
    (Lamb, dict(betas=0.9), ValueError, r"Invalid betas: 0.9; it must be a pair"),
    (Lamb, dict(phi=(2.0, 1.0)), ValueError, r"Invalid phi bounds: \(gamma_l=2.0, gamma_u=1.0\); they must satisfy 0 <= gamma_l < gamma_u"),
    (Lamb, dict(phi=(-1.0, 1.0)), ValueError, r"Invalid phi bounds"),
    (Lamb, dict(phi=3.0), ValueError, r"Invalid phi: 3.0; it must be None \(identity\) or a pair"),
    (Lamb, dict(nesterov="second"), ValueError, r"Invalid nesterov: 'second'; allowed values are None, 'first', 'both'"),
    (Lamb, dict(nesterov=True), ValueError, r"Invalid nesterov: True"),
    (Lamb, dict(bias_correction="yes"), ValueError, r"Invalid bias_correction: 'yes'; it must be True or False"),
    (Lamb, dict(decay_in_ratio=None), ValueError, r"Invalid decay_in_ratio: None; it must be True or False"),
    (Lamb, dict(eps_root=-1.0), ValueError, r"Invalid eps_root value: -1.0; it must be a finite number >= 0"),
    (Lamb, dict(update_in_grad="yes"), ValueError, r"Invalid update_in_grad: 'yes'; it must be True or False"),
    (Lamb, dict(grad_averaging=0), ValueError, r"Invalid grad_averaging: 0; it must be True or False"),
    (Lamb, dict(trust_clip="yes"), ValueError, r"Invalid trust_clip: 'yes'; it must be True \(ratio capped at 1\), False, or a pair \(lo, hi\)"),
    (Lamb, dict(trust_clip=(0.5,)), ValueError, r"Invalid trust_clip: \(0.5,\)"),
    (Lamb, dict(trust_clip=(10.0, 0.01)), ValueError, r"Invalid trust_clip bounds: \(lo=10.0, hi=0.01\); they must satisfy 0 <= lo < hi"),
    (Lamb, dict(trust_clip=(-1.0, 2.0)), ValueError, r"Invalid trust_clip bounds: \(lo=-1.0, hi=2.0\)"),
    (Lamb, dict(max_grad_norm=0.0), ValueError, r"Invalid max_grad_norm value: 0.0; it must be None \(no clipping\) or a finite number > 0"),
    (Lamb, dict(clip_eps=-1e-6), ValueError, r"Invalid clip_eps value: -1e-06; it must be a finite number >= 0"),
    (Lamb, dict(nonfinite="ignore"), ValueError, r"Invalid nonfinite: 'ignore'; allowed values are 'skip', 'raise', 'none'"),
    (Lamb, dict(foreach="yes"), ValueError, r"Invalid foreach: 'yes'"),
    (Lamb, dict(fused=True, foreach=False), ValueError, r"fused=True and foreach=False contradict"),
    (Lars, dict(lr=-0.1), ValueError, r"Invalid learning rate value: -0.1"),
    (Lars, dict(momentum=1.0), ValueError, r"Invalid momentum value: 1.0; it must be in \[0, 1\)"),
    (Lars, dict(mode="lars"), ValueError, r"Invalid mode: 'lars'; allowed values are 'paper', 'classic'"),
    (Lars, dict(trust_coefficient=-1.0), ValueError, r"Invalid trust_coefficient value: -1.0"),
    (Lars, dict(eps=-1.0), ValueError, r"Invalid epsilon value: -1.0"),
    (Lars, dict(mode="classic", phi=(0.1, 1.0)), ValueError, r"phi bounds exist only in mode='paper'"),
    (Lars, dict(nesterov=1), ValueError, r"Invalid nesterov: 1; it must be True or False"),
    (Lars, dict(mode="classic", denominator="norm"), ValueError, r"Invalid denominator: 'norm'; allowed values are 'sum', 'combined'"),
    (Lars, dict(denominator="combined"), ValueError, r"Invalid denominator='combined' with mode='paper'; it exists only in mode='classic'"),
    (Lars, dict(lr_in_momentum=True), ValueError, r"Invalid lr_in_momentum=True with mode='paper'; it exists only in mode='classic'"),
    (Lars, dict(denominator="combined", lr_in_momentum=True), ValueError,
     r"Invalid denominator='combined' and lr_in_momentum=True with mode='paper'; they exist only in mode='classic'"),
    (Lars, dict(lr_in_momentum="yes"), ValueError, r"Invalid lr_in_momentum: 'yes'; it must be True or False"),
    (Lars, dict(mode="classic", lr_in_momentum=1), ValueError, r"Invalid lr_in_momentum: 1; it must be True or False"),
]


@pytest.mark.parametrize("cls,kwargs,exc,match", ERRORS, ids=[f"{c.__name__}-{k}" for c, k, _, _ in ERRORS])
def test_constructor_errors(cls, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        cls(P(), **kwargs)


def test_bad_value_in_a_param_group():
    with pytest.raises(ValueError, match=r"Invalid weight_decay value: -1"):
        Lamb([{"params": P(), "weight_decay": -1}])
    opt = Lamb(P())
    with pytest.raises(ValueError, match=r"Invalid beta parameter at index 0: 1.5"):
        opt.add_param_group({"params": P(), "betas": (1.5, 0.9)})


@pytest.mark.parametrize("cls", [Lamb, Lars])
def test_sparse_gradients_are_refused(cls):
    emb = torch.nn.Embedding(10, 3, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match=f"{cls.__name__} does not support sparse gradients"):
        cls(emb.parameters()).step()


def test_unknown_optimizer_name_lists_valid_names():
    with pytest.raises(ValueError, match=r"Unknown optimizer 'lamb2'; valid names are: lamb, lambc, nlamb, nnlamb, lars"):
        create_optimizer("lamb2", P(), lr=0.1)


@pytest.mark.parametrize(
    "name,option,value,message",
    [
        ("sgd", "nesterov", "False", r"nesterov='False' for optimizer 'sgd': it must be true or false \(default False\)"),
        ("adamw", "amsgrad", "no", r"amsgrad='no' for optimizer 'adamw': it must be true or false"),
        ("adamw", "eps", "x", r"eps='x' for optimizer 'adamw': it must be a finite number \(default 1e-08\)"),
        ("momentum", "momentum", True, r"momentum=True for optimizer 'momentum': it must be a finite number"),
        ("adagrad", "lr_decay", float("nan"), r"lr_decay=nan for optimizer 'adagrad': it must be a finite number"),
        ("adam", "betas", [0.9], r"betas=\[0.9\] for optimizer 'adam': it must be a list of 2 finite numbers"),
        ("adamw", "foreach", 1, r"foreach=1 for optimizer 'adamw': it must be null, true or false"),
    ],
)
def test_torch_optimizer_options_of_the_wrong_kind_are_refused(name, option, value, message):
    """A command-line value that is not JSON arrives as text, and torch's optimizers take "False" as true."""
    with pytest.raises(ValueError, match=r"Invalid option " + message):
        create_optimizer(name, P(), lr=0.1, **{option: value})


def test_torch_optimizer_options_of_the_right_kind_are_taken():
    opt = create_optimizer("adamw", P(), lr=0.1, betas=[0.8, 0.9], amsgrad=True, foreach=None, eps=1)
    assert opt.defaults["betas"] == (0.8, 0.9) and opt.defaults["amsgrad"] is True and opt.defaults["eps"] == 1
    assert create_optimizer("sgd", P(), lr=0.1, nesterov=False).defaults["nesterov"] is False


@pytest.mark.parametrize("cls", [Lamb, Lars])
def test_master_weights_must_be_a_bool(cls):
    with pytest.raises(ValueError, match=r"Invalid master_weights: 'no'; it must be True or False"):
        cls(P(), master_weights="no")


def test_fused_true_without_backend_is_a_clear_error(monkeypatch):
    import largebatch.optim._layerwise as lw

    monkeypatch.setattr(lw, "fused_available", lambda xs: False)
    p = P()
    p[0].grad = torch.ones(2)
    with pytest.raises(RuntimeError, match=r"Lamb\(fused=True\): no fused backend for tensors of"):
        Lamb(p, fused=True).step()


def test_param_groups_bad_spec():
    with pytest.raises(ValueError, match=r"Invalid exclude_from_weight_decay: 'all'"):
        param_groups(torch.nn.Linear(2, 2), 0.1, exclude_from_weight_decay="all")
    with pytest.raises(ValueError, match=r"Invalid weight_decay value: -0.1"):
        param_groups(torch.nn.Linear(2, 2), -0.1)


@pytest.mark.parametrize("cls", [Lamb, Lars])
@pytest.mark.parametrize("dtype,hint", [(torch.complex64, "optimize torch.view_as_real"), (torch.int64, "")])
def test_parameters_must_be_real_floating_point(cls, dtype, hint):
    p = torch.zeros(2, dtype=dtype)
    with pytest.raises(ValueError, match=rf"Invalid parameter of dtype {dtype}: {cls.__name__} takes real floating-point parameters.*{hint}"):
        cls([p])


def test_update_in_grad_refuses_16bit_gradients_of_master_weights_before_anything_changes():
    """A bfloat16 gradient cannot hold the float32 update: the step raises and changes nothing
    (the first group, which could take it, is not stepped either)."""
    ok = torch.zeros(3, requires_grad=True)
    half = torch.zeros(3, dtype=torch.bfloat16, requires_grad=True)
    ok.grad, half.grad = torch.ones(3), torch.ones(3, dtype=torch.bfloat16)
    opt = Lamb([{"params": [ok]}, {"params": [half]}], lr=0.1, update_in_grad=True)
    with pytest.raises(ValueError, match=r"a torch.bfloat16 gradient of a torch.float32 tensor .* use update_in_grad=False"):
        opt.step()
    assert torch.equal(ok.detach(), torch.zeros(3)) and torch.equal(ok.grad, torch.ones(3))
    assert all(float(s["step"]) == 0 for s in opt.state.values())
    opt.param_groups[1]["update_in_grad"] = False  # per group: the 16-bit group keeps its gradients
    opt.step()
    assert not torch.equal(ok.grad, torch.ones(3)) and torch.equal(half.grad, torch.ones(3, dtype=torch.bfloat16))
