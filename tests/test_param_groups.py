import pytest
import torch
from torch import nn

from largebatch import Lamb, create_optimizer, param_groups


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.pos = nn.Parameter(torch.zeros(1, 3, 4))
        self.fc = nn.Linear(4, 4)
        self.LayerNorm = nn.LayerNorm(4)
        self.bn = nn.BatchNorm1d(4)
        self.head = nn.Linear(4, 2, bias=False)

    def no_weight_decay(self):
        return {"pos"}


def names(groups):
    return {(g["weight_decay"], g["adapt"]): sorted(g["param_names"]) for g in groups}


def test_default_excludes_bias_norm_and_model_hook_from_both():
    got = names(param_groups(Net(), 0.01))
    assert got == {
        (0.01, True): ["embed.weight", "fc.weight", "head.weight"],
        (0.0, False): ["LayerNorm.bias", "LayerNorm.weight", "bn.bias", "bn.weight", "fc.bias", "pos"],
    }


def test_exclusions_are_separately_controllable():
    got = names(param_groups(Net(), 0.01, exclude_from_adaptation="none"))
    assert got[(0.0, True)] == ["LayerNorm.bias", "LayerNorm.weight", "bn.bias", "bn.weight", "fc.bias", "pos"]
    got = names(param_groups(Net(), 0.01, exclude_from_weight_decay="none", exclude_from_adaptation="default"))
    assert got[(0.01, False)] == ["LayerNorm.bias", "LayerNorm.weight", "bn.bias", "bn.weight", "fc.bias", "pos"]
    got = names(param_groups(Net(), 0.01, exclude_from_weight_decay=["*bias"], exclude_from_adaptation=["head.*"]))
    assert got == {
        (0.01, True): ["LayerNorm.weight", "bn.weight", "embed.weight", "fc.weight", "pos"],
        (0.0, True): ["LayerNorm.bias", "bn.bias", "fc.bias"],
        (0.01, False): ["head.weight"],
    }


def test_frozen_parameters_are_left_out_and_lr_scale():
    net = Net()
    net.head.weight.requires_grad_(False)
    groups = param_groups(net, 0.01, lr_scale={"embed.*": 0.1})
    all_names = [n for g in groups for n in g["param_names"]]
    assert "head.weight" not in all_names
    assert [g["lr_scale"] for g in groups if "embed.weight" in g["param_names"]] == [0.1]


def test_groups_drive_lamb_adaptation_and_work_for_torch_optimizers():
    net = Net()
    opt = Lamb(param_groups(net, 0.01), lr=0.1)
    x = torch.randint(0, 10, (5, 3))
    out = net.head(net.bn(net.LayerNorm(net.fc(net.embed(x) + net.pos)).reshape(-1, 4)))
    out.sum().backward()
    opt.step()
    ratios = opt.telemetry.read()
    assert ratios[net.fc.bias]["trust_ratio"] == 1.0  # excluded from adaptation
    assert ratios[net.fc.weight]["trust_ratio"] != 1.0
    adamw = create_optimizer("adamw", param_groups(net, 0.01), lr=0.1)
    assert all("adapt" not in g for g in adamw.param_groups)


def test_default_name_patterns_match_layer_names_not_parts_of_words():
    """With ndim ignored (by_ndim=False) the patterns alone decide: short norm-layer names count
    only as whole name components."""
    from largebatch.optim.groups import is_excluded

    w = torch.zeros(2, 2)
    for name in ["bn1.weight", "layer1.0.bn2.weight", "bn.weight", "net.bn.weight", "h.0.ln_1.weight", "ln_f.weight",
                 "transformer.ln_f.weight", "ln.weight", "blocks.3.ln.weight", "enc.LayerNorm.weight",
                 "enc.layer_norm.weight", "x.batchnorm.weight", "final_norm.weight", "fc.bias"]:  # fmt: skip
        assert is_excluded(name, w, by_ndim=False), name
    for name in ["kiln_proj.weight", "model.bnb.weight", "encoder.bneck.weight", "unbn.weight", "kiln.weight",
                 "fc.weight", "attn.c_proj.weight", "embed.weight"]:  # fmt: skip
        assert not is_excluded(name, w, by_ndim=False), name


def _decayed(groups):
    return sorted(n for g in groups if g["weight_decay"] > 0 for n in g["param_names"])


def test_normalisation_modules_are_excluded_whatever_their_names_without_by_ndim():
    """torch's Transformer calls its LayerNorms norm1/norm2; a GroupNorm "gn", an RMSNorm "rms":
    no name pattern catches those, the module type does."""
    layer = torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    groups = param_groups(layer, 0.1, by_ndim=False)
    assert _decayed(groups) == ["linear1.weight", "linear2.weight", "self_attn.in_proj_weight", "self_attn.out_proj.weight"]
    assert sorted(n for g in groups if g["adapt"] for n in g["param_names"]) == _decayed(groups)
    net = torch.nn.Sequential()
    net.add_module("gn", torch.nn.GroupNorm(2, 4))
    net.add_module("rms", torch.nn.RMSNorm(4))
    net.add_module("proj", torch.nn.Linear(4, 4, bias=False))
    net.add_module("scale", torch.nn.Module())
    net.scale.gamma = torch.nn.Parameter(torch.ones(4))  # a 1-D parameter that is no norm's: decayed
    assert _decayed(param_groups(net, 0.1, by_ndim=False)) == ["proj.weight", "scale.gamma"]


def test_no_weight_decay_hook_through_compile_and_its_prefix():
    class ViTish(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.pos_embed = torch.nn.Parameter(torch.zeros(1, 4, 8))
            self.cls_token = torch.nn.Parameter(torch.zeros(1, 1, 8))
            self.head = torch.nn.Linear(8, 8)

        def no_weight_decay(self):
            return {"pos_embed", "cls_token"}

    model = ViTish()
    assert _decayed(param_groups(model, 0.1)) == ["head.weight"]
    assert _decayed(param_groups(torch.compile(model), 0.1)) == ["_orig_mod.head.weight"]  # the hook's names matched


def test_bad_weight_decay_and_patterns_are_refused():
    for value in (float("nan"), -0.1, "0.1", True):
        with pytest.raises(ValueError, match=r"Invalid weight_decay value: .*; it must be a finite number >= 0"):
            param_groups(torch.nn.Linear(2, 2), value)
    with pytest.raises(ValueError, match=r"Invalid exclude_from_weight_decay: \[None\]; the patterns must be strings"):
        param_groups(torch.nn.Linear(2, 2), 0.1, exclude_from_weight_decay=[None])
    with pytest.raises(ValueError, match=r"Invalid exclude_from_adaptation: 5; the patterns must be strings"):
        param_groups(torch.nn.Linear(2, 2), 0.1, exclude_from_adaptation=5)  # a TypeError from tuple(5) before
    with pytest.raises(ValueError, match=r"Invalid exclude_from_weight_decay: 'same'; allowed are 'default', 'none' or"):
        param_groups(torch.nn.Linear(2, 2), 0.1, exclude_from_weight_decay="same")
