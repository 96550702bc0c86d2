"""Sharded trust ratios and the torchrun helpers.

The multi-process tests launch the scripts in tests/dist_scripts/ with
``torchrun --standalone --nproc-per-node 2`` (gloo on CPU, float64, a free port picked by torchrun),
once per script; each script writes what it measured and the tests here assert on it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from largebatch import Lamb, Lars
from largebatch.distributed import (
    DistInfo,
    FlatLayout,
    FlatShard,
    ShardNormReducer,
    ZeroNormReducer,
    all_reduce_sum,
    barrier,
    cleanup,
    dtensor_norm_reducer,
    flat_layer_norms,
    flat_squared_sums,
    init_from_env,
    no_sync_if,
    shard_indices,
)

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).resolve().parent / "dist_scripts"
EXACT = 1e-12  # float64; the measured differences are ~1e-16
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")  # fmt: skip

multiprocess = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()), reason="needs torch.distributed with gloo"
)


def torchrun(script: str, tmp_path_factory, timeout: float = 120) -> dict:
    out = tmp_path_factory.mktemp(script.removesuffix(".py")) / "result.json"
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(SCRIPTS / script), "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not out.exists():
        pytest.fail(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory):
    return torchrun("fsdp_parity.py", tmp_path_factory)


@pytest.fixture(scope="module")
def zero(tmp_path_factory):
    return torchrun("zero_parity.py", tmp_path_factory)


@pytest.fixture(scope="module")
def flat(tmp_path_factory):
    return torchrun("flat_parity.py", tmp_path_factory)


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    return torchrun("ddp_parity.py", tmp_path_factory)


# -- FSDP2 ------------------------------------------------------------------------------------


@multiprocess
@pytest.mark.parametrize(
    "case",
    ["lamb", "lamb_multi_tensor", "lamb_nesterov_no_clip", "lamb_nonfinite_none", "lamb_reference_path", "lars_paper",
     "lars_paper_multi_tensor", "lars_paper_nonfinite_none", "lars_classic", "lars_classic_multi_tensor",
     "lamb_hsdp_mesh", "lamb_decay_first_bounds", "lamb_decay_first_bounds_multi_tensor",
     "lars_classic_combined_lr_in_momentum", "lamb_update_in_grad"],
)  # fmt: skip
def test_fsdp2_matches_single_process(fsdp, case):
    r = fsdp[case]
    if case.endswith("multi_tensor"):
        assert r["path"] == "multi_tensor"
    if case == "lamb_reference_path":
        assert r["path"] == "reference"
    assert r["reducer"] == "ShardNormReducer"  # detected from the DTensor parameters
    assert r["param_diff"] <= EXACT
    assert r["state_diff"] <= EXACT
    assert r["grad_diff"] <= EXACT  # the local shard of u where update_in_grad; else the gradient, unchanged


@multiprocess
def test_fsdp2_bfloat16_with_float32_master_weights(fsdp):
    r = fsdp["lamb_bf16_master_weights"]
    assert r["param_dtype"] == "torch.bfloat16" and r["master_type"] == "DTensor"
    assert r["master_diff"] <= 1e-6  # float32 rounding of the norms (measured 3e-8)
    assert r["state_diff"] <= 1e-6
    assert r["param_diff"] <= 2**-8  # at most one bfloat16 rounding step apart (measured 0)


@multiprocess
def test_fsdp2_run_covers_uneven_and_empty_shards_and_active_clipping(fsdp):
    rank0, rank1 = fsdp["lamb"]["local_shapes"]
    assert rank0[0] == [5, 6] and rank1[0] == [4, 6]  # dim 0 of 9 over 2 ranks: FSDP2 pads, norms must not see it
    assert rank0[1] == [5] and rank1[1] == [4]  # a 1-d bias, uneven too
    assert rank0[6] == [1, 5] and rank1[6] == [0, 5]  # rank 1 holds nothing of this weight
    assert fsdp["lamb"]["first_grad_norm"] > 0.05  # max_grad_norm=0.05 really clips
    assert fsdp["lamb_hsdp_mesh"]["placements"] == "(Replicate(), Shard(dim=0))"


@multiprocess
def test_fsdp2_local_shard_norms_differ(fsdp):
    """The control: per-tensor norms of the local shards only (totals still reduced) go wrong."""
    assert fsdp["lamb_local_norms"]["param_diff"] > 1e-4


@multiprocess
def test_fsdp2_collectives_per_step(fsdp):
    groups, tensors = fsdp["lamb"]["n_groups"], fsdp["lamb"]["n_tensors"]
    assert (groups, tensors) == (2, 8)
    # ONE all-reduce for the weight and update norms of every tensor of every group ...
    assert set(fsdp["lamb_nonfinite_none"]["comms_per_step"]) == {1}
    assert set(fsdp["lars_paper_nonfinite_none"]["comms_per_step"]) == {1}
    # ... and, before it, one for the global gradient norm (max_grad_norm) or, without clipping, for
    # the non-finite flags of all groups (nonfinite="skip", the default): every path (fused,
    # multi-tensor, the single-tensor reference), every mode
    for case in ("lamb", "lamb_multi_tensor", "lamb_reference_path", "lars_paper", "lars_paper_multi_tensor",
                 "lars_classic", "lars_classic_multi_tensor", "lamb_nesterov_no_clip"):  # fmt: skip
        assert set(fsdp[case]["comms_per_step"]) == {2}, case


@multiprocess
def test_fsdp2_state_is_dtensor_and_checkpoints_resume_exactly(fsdp):
    ck = fsdp["checkpoint"]
    assert ck["state_types"] == ["exp_avg:DTensor", "exp_avg_sq:DTensor", "step:Tensor"]
    assert ck["full_state_types"] == ["exp_avg:Tensor", "exp_avg_sq:Tensor", "step:Tensor"]
    for how in ("load_state_dict", "dcp_full"):
        assert ck[how]["param_diff"] == 0.0
        assert ck[how]["state_diff"] == 0.0


@multiprocess
def test_fsdp2_mixed_dtensor_and_plain_params_are_refused(fsdp):
    assert "8 of 10 parameters are DTensors" in fsdp["errors"]["mixed_dtensor_and_plain"]


# -- ZeRO-1 -----------------------------------------------------------------------------------


@multiprocess
@pytest.mark.parametrize("case", ["lamb", "lars_paper", "lars_classic", "lamb_nonfinite_skip"])
def test_zero1_matches_single_process(zero, case):
    r = zero[case]
    assert r["param_diff"] <= EXACT
    assert r["reducer_calls_per_step"] == 1.0  # the totals only; per-tensor norms need no collective


@multiprocess
def test_zero1_ranks_own_whole_tensors(zero):
    rank0, rank1 = zero["lamb"]["owned_shapes"]
    everything = [[9, 6], [9], [9], [9], [5, 9], [5], [1, 5], [1]]
    assert sorted(rank0 + rank1) == sorted(everything) and rank0 and rank1


@multiprocess
def test_zero1_nonfinite_skip_is_taken_on_every_rank(zero):
    r = zero["lamb_nonfinite_skip"]
    assert r["skipped_steps_ref"] == r["skipped_steps_local"] == 1


@multiprocess
def test_zero1_without_reducer_clips_by_a_partial_norm(zero):
    assert zero["lamb_without_reducer"]["param_diff"] > 1e-5


# -- flat sharded buffers ---------------------------------------------------------------------


@multiprocess
@pytest.mark.parametrize("case", ["norms_packed", "norms_aligned", "norms_offsets"])
def test_flat_layer_norms_equal_unsharded_norms(flat, case):
    assert flat[case]["diff"] <= EXACT
    assert flat[case]["collectives"] == 1  # weights and updates of all tensors in one all-reduce


@multiprocess
def test_flat_layout_has_a_tensor_straddling_the_shard_boundary(flat):
    assert flat["layout"] == {"numel": 137, "padded": 138, "starts": [0, 54, 63, 72, 81, 126, 131, 136]}
    assert flat["norms_packed"]["straddling_my_end"] == ["2.weight"]


@multiprocess
@pytest.mark.parametrize("case", ["lamb", "lars_paper"])
def test_flat_shard_optimizer_matches_single_process(flat, case):
    assert flat[case]["param_diff"] <= EXACT
    assert set(flat[case]["comms_per_step"]) == {2}  # the grad norm, then the norms of both groups


@multiprocess
def test_flat_shard_without_reducer_differs(flat):
    assert flat["lamb_local_norms"]["param_diff"] > 1e-4


# -- DDP and the torchrun helpers -------------------------------------------------------------


@multiprocess
def test_ddp_two_ranks_half_batch_with_accumulation_equal_one_process(ddp):
    assert ddp["param_diff"] <= EXACT
    assert ddp["info"] == {"rank": 0, "world_size": 2, "local_rank": 0, "device": "cpu", "is_main": True,
                           "distributed": True, "backend": "gloo"}  # fmt: skip
    assert ddp["all_reduce_sum"] == 3.0  # 1 + 2
    assert all(ddp["grads_differ_after_no_sync_microstep"])  # no all-reduce under no_sync_if(.., True)
    assert not any(ddp["grads_differ_after_final_microstep"])


def test_init_from_env_without_torchrun_is_a_single_process(monkeypatch):
    for var in TORCHRUN_VARS:
        monkeypatch.delenv(var, raising=False)
    info = init_from_env(device="cpu")
    assert info == DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), is_main=True)
    assert not info.distributed
    t = torch.tensor([2.0])
    assert all_reduce_sum(t) is t and t.item() == 2.0
    barrier()
    cleanup()


def test_init_from_env_names_the_missing_variables(monkeypatch):
    for var in TORCHRUN_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="LOCAL_RANK, MASTER_ADDR, MASTER_PORT are not"):
        init_from_env(device="cpu")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "localhost")
    monkeypatch.setenv("MASTER_PORT", "1")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match=r"RANK=2 is not in \[0, WORLD_SIZE=2\)"):
        init_from_env(device="cpu")


def test_shard_indices_are_contiguous_equal_slices():
    batch = list(range(12))
    parts = [shard_indices(batch, r, 3) for r in range(3)]
    assert parts == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert torch.equal(shard_indices(torch.arange(10, 18), 1, 2), torch.arange(14, 18))
    assert shard_indices(range(6), 0, 1) == range(6)
    with pytest.raises(ValueError, match="10 examples does not split evenly over 3 ranks"):
        shard_indices(range(10), 0, 3)
    with pytest.raises(ValueError, match="Invalid rank 2 for world_size 2"):
        shard_indices(range(4), 2, 2)


def test_no_sync_if_enters_the_models_no_sync_only_when_asked():
    events = []

    class FakeDDP(nn.Module):
        def no_sync(self):
            class Ctx:
                def __enter__(self):
                    events.append("enter")

                def __exit__(self, *exc):
                    events.append("exit")

            return Ctx()

    class FakeFSDP2(nn.Module):
        def set_requires_gradient_sync(self, flag):
            events.append(("sync", flag))

    with no_sync_if(FakeDDP(), False):
        events.append("body")
    with no_sync_if(FakeDDP(), True):
        events.append("body")
    with no_sync_if(FakeFSDP2(), True):
        events.append("body")
    with no_sync_if(nn.Linear(1, 1), True):  # a plain module: nothing to skip
        events.append("body")
    assert events == ["body", "enter", "body", "exit", ("sync", False), "body", ("sync", True), "body"]


# -- reducers and flat layouts, in one process ---------------------------------------------------


class CountingReducer:
    """Identity per tensor and for totals, counting the calls (each would be one collective)."""

    def __init__(self):
        self.per_tensor_calls, self.total_calls = 0, 0

    def __call__(self, sq):
        self.per_tensor_calls += 1
        return sq

    def reduce_totals(self, sq):
        self.total_calls += 1
        return sq


def _two_group_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    groups = [{"params": [p for p in model.parameters() if p.ndim > 1]},
              {"params": [p for p in model.parameters() if p.ndim <= 1], "weight_decay": 0.0}]  # fmt: skip
    return model, groups


@pytest.mark.parametrize(
    "kwargs, per_tensor, totals",
    [
        (dict(max_grad_norm=1.0), 1, 1),  # grad norm: one total; its finiteness is the skip flag
        (dict(nonfinite="skip"), 1, 1),  # the flags of both groups in one call
        (dict(nonfinite="none"), 1, 0),  # the norms of both groups in one call
        (dict(nonfinite="none", foreach=False), 1, 0),  # the reference path too
        (dict(nonfinite="none", fused=False), 1, 0),  # the multi-tensor path
    ],
)
@pytest.mark.parametrize("cls", [Lamb, Lars])
def test_reducer_calls_per_step(cls, kwargs, per_tensor, totals):
    model, groups = _two_group_model()
    reducer = CountingReducer()
    opt = cls(groups, lr=0.01, weight_decay=0.1, norm_reducer=reducer, **kwargs)
    model(torch.randn(5, 4, dtype=torch.float64)).square().sum().backward()
    opt.step()
    assert (reducer.per_tensor_calls, reducer.total_calls) == (per_tensor, totals)


def test_plain_reducer_without_reduce_totals_is_used_for_totals_too():
    model, groups = _two_group_model()
    calls = []
    opt = Lamb(groups, lr=0.01, max_grad_norm=1.0, norm_reducer=lambda sq: calls.append(sq.numel()) or sq)
    model(torch.randn(5, 4, dtype=torch.float64)).square().sum().backward()
    opt.step()
    assert calls == [1, 8]  # the grad norm, then [w; u] of the 2 tensors of each of the 2 groups


def test_identity_reducers_change_nothing():
    model, groups = _two_group_model()
    ref_model, ref_groups = _two_group_model()
    opt = Lamb(groups, lr=0.01, weight_decay=0.1, max_grad_norm=0.5, norm_reducer=lambda sq: sq)
    ref = Lamb(ref_groups, lr=0.01, weight_decay=0.1, max_grad_norm=0.5)
    x = torch.randn(5, 4, dtype=torch.float64)
    for m, o in ((model, opt), (ref_model, ref)):
        for _ in range(3):
            o.zero_grad()
            m(x).square().sum().backward()
            o.step()
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=EXACT)
    assert ZeroNormReducer()(torch.ones(3)).equal(torch.ones(3))  # ZeRO: per-tensor sums are already global


def test_optimizers_keep_no_reducer_for_plain_tensors():
    assert dtensor_norm_reducer([torch.zeros(2, requires_grad=True)]) is None
    assert Lamb([torch.zeros(2, requires_grad=True)]).norm_reducer is None
    assert repr(ShardNormReducer()) == "ShardNormReducer(group=None)"


def test_empty_parameter_is_stepped():
    """An empty tensor (what a rank holds of a small FSDP2 parameter) passes the non-finite check."""
    w = torch.zeros(0, 3, dtype=torch.float64, requires_grad=True)
    b = torch.ones(2, dtype=torch.float64, requires_grad=True)
    opt = Lamb([w, b], lr=0.1)
    w.grad, b.grad = torch.zeros(0, 3, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    opt.step()
    assert int(opt.skipped_steps) == 0 and b.lt(1).all()


def test_flat_layout_offsets_and_segments():
    layout = FlatLayout.from_shapes([("a", (2, 3)), ("b", (3,)), ("c", (1,))], align=4)
    assert layout.starts == (0, 8, 12) and layout.numels == (6, 3, 1) and layout.numel == 13
    assert layout.padded_numel(2) == 14 and layout.shard_range(1, 2) == (7, 14)
    # rank 1 holds nothing of a, all of b (from local offset 1) and c; the gap 6..8 is nobody's
    assert layout.local_segments(7, 7) == [(0, 0), (1, 4), (5, 6)]
    assert layout.local_segments(0, 7) == [(0, 6), (7, 7), (7, 7)]
    by_offsets = FlatLayout.from_boundaries([0, 6, 9, 10])
    assert by_offsets.starts == (0, 6, 9) and by_offsets.numels == (6, 3, 1)
    with pytest.raises(ValueError, match="inside the previous tensor"):
        FlatLayout(("a", "b"), ((4,), (2,)), (0, 3))
    with pytest.raises(ValueError, match="non-decreasing"):
        FlatLayout.from_boundaries([0, 5, 3])


def test_flat_squared_sums_of_slices_add_up_to_the_norms():
    torch.manual_seed(0)
    tensors = [torch.randn(2, 3, dtype=torch.float64), torch.randn(3, dtype=torch.float64), torch.randn(1, dtype=torch.float64)]
    layout = FlatLayout.from_shapes([(str(i), t.shape) for i, t in enumerate(tensors)])
    flat = torch.cat([t.reshape(-1) for t in tensors] + [torch.full((2,), 99.0, dtype=torch.float64)])  # tail padding
    world = 4
    flat = flat[: layout.padded_numel(world)]
    total = sum(flat_squared_sums(flat[slice(*layout.shard_range(r, world))], layout, layout.shard_range(r, world)[0])
                for r in range(world))  # fmt: skip
    expect = torch.stack([t.norm() for t in tensors])
    torch.testing.assert_close(total.sqrt(), expect, rtol=0, atol=EXACT)
    # without a process group the slice is the whole buffer
    w, u = flat_layer_norms([flat, 2 * flat], layout, 0)
    torch.testing.assert_close(w, expect, rtol=0, atol=EXACT)
    torch.testing.assert_close(u, 2 * expect, rtol=0, atol=EXACT)
    torch.testing.assert_close(flat_layer_norms(flat, [0, 6, 9, 10], 0), expect, rtol=0, atol=EXACT)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_flat_norms_of_16bit_buffers_are_float32_norms(dtype):
    """The norm of a 16-bit slice is computed in float32, not rounded to 8 or 11 bits."""
    torch.manual_seed(0)
    flat = torch.randn(3000).to(dtype)
    layout = FlatLayout.from_boundaries([0, 1000, 3000])
    sq = flat_squared_sums(flat, layout, 0)
    assert sq.dtype == torch.float32
    expect = torch.stack([flat[:1000].float().square().sum(), flat[1000:].float().square().sum()])
    torch.testing.assert_close(sq, expect, rtol=1e-5, atol=0)


def test_flat_shard_pieces_write_through_and_take_gradients():
    layout = FlatLayout.from_shapes([("w", (2, 2)), ("b", (2,))])
    local = torch.arange(3, dtype=torch.float64)  # elements 3..5 of the flat buffer
    shard = FlatShard(local, layout, 3)
    names = [(n, s, tuple(p.shape)) for n, s, p in shard.named_pieces()]
    assert names == [("w", (2, 2), (1,)), ("b", (2,), (2,))]
    shard.attach_grad(torch.ones(3, dtype=torch.float64))
    opt = Lars([p for _, _, p in shard.named_pieces()], lr=1.0, momentum=0.0, foreach=True, norm_reducer=lambda s: s)
    opt.step()
    assert not torch.equal(local, torch.arange(3, dtype=torch.float64))  # the update reached the buffer
    with pytest.raises(ValueError, match="gradient slice of shape"):
        shard.attach_grad(torch.ones(4))


def test_groups_of_different_dtypes_share_one_reducer_call():
    """run_together concatenates the requests of all groups (float32 and float64 here) into one
    call and hands each group its slice back in its own dtype."""
    torch.manual_seed(0)
    a, b = nn.Linear(4, 3), nn.Linear(3, 2).double()
    sizes = []
    opt = Lamb([{"params": a.parameters()}, {"params": b.parameters()}], lr=0.01, weight_decay=0.1,
               nonfinite="none", norm_reducer=lambda sq: sizes.append((sq.numel(), sq.dtype)) or sq)  # fmt: skip
    ref_a, ref_b = nn.Linear(4, 3), nn.Linear(3, 2).double()
    ref_a.load_state_dict(a.state_dict())
    ref_b.load_state_dict(b.state_dict())
    ref = Lamb([{"params": ref_a.parameters()}, {"params": ref_b.parameters()}], lr=0.01, weight_decay=0.1, nonfinite="none")
    x = torch.randn(5, 4)
    for m, n in ((a, b), (ref_a, ref_b)):
        n(m(x).double()).square().sum().backward()
    opt.step()
    ref.step()
    assert sizes == [(8, torch.float64)]  # 2 tensors x (w, u) x 2 groups, promoted to float64
    assert opt.state[a.weight]["exp_avg"].dtype == torch.float32
    for p, q in zip([*a.parameters(), *b.parameters()], [*ref_a.parameters(), *ref_b.parameters()]):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)  # sqrt(norm^2) vs norm: float32 rounding
