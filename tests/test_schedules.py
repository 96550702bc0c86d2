"""Schedules against their closed forms, recipes against the paper's numbers, the torch adapter
against an uninterrupted run, and the ``schedule`` command."""

from __future__ import annotations

import io
import math

import pytest
import torch

from largebatch import cli
from largebatch.schedules import (
    BERT_UNTUNED_TABLE,
    Constant,
    CosineDecay,
    LinearWarmup,
    MixedBatchRecipe,
    Phased,
    PolynomialDecay,
    Recipe,
    Scaled,
    ScheduleLR,
    Stage,
    StepDecay,
    WarmupDecay,
    bert_two_phase,
    join,
    preset,
    scale_lr,
    scale_warmup,
    steps_per_epoch,
    warmup_then_decay,
)

STEPS = list(range(0, 130)) + [997, 998, 999, 1000, 1001, 5000]


def _assert_floats(schedule, steps=STEPS):
    for t in steps:
        assert type(schedule(t)) is float, (schedule, t)


# ---------------------------------------------------------------------------------- warmup


@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("init", [0.0, 0.25])
@pytest.mark.parametrize("w", [0, 1, 7, 100])
def test_linear_warmup_closed_form(w, init, offset):
    s = LinearWarmup(w, init_value=init, offset=offset)
    for t in STEPS:
        expected = 1.0 if t >= w else init + (1 - init) * (t + offset) / w
        assert s(t) == pytest.approx(expected, abs=1e-15), t
    _assert_floats(s)


def test_linear_warmup_boundaries():
    s = LinearWarmup(4)  # (t + 1) / W: no update at lr 0, peak at the last warmup update
    assert [s(t) for t in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    s0 = LinearWarmup(4, offset=0)  # t / W: first update at lr 0, peak at t = W
    assert [s0(t) for t in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]


def test_linear_warmup_from_epochs_rounds_half_up():
    # 2.5 epochs of 1 step: half up gives 3 (Python's round would give 2)
    assert LinearWarmup.from_epochs(2.5, 1).warmup_steps == 3
    assert LinearWarmup.from_epochs(5, 157).warmup_steps == 785
    assert LinearWarmup.from_epochs(0.3, 10).warmup_steps == 3
    # the step count follows the batch size at a fixed number of warmup epochs
    for batch in (128, 1024, 8192):
        spe = steps_per_epoch(60000, batch)
        assert LinearWarmup.from_epochs(1.0, spe).warmup_steps == spe


# ---------------------------------------------------------------------------------- decays


@pytest.mark.parametrize("power", [1.0, 2.0, 0.5])
@pytest.mark.parametrize("end", [0.0, 0.1])
def test_polynomial_decay_closed_form(power, end):
    T = 1000
    s = PolynomialDecay(T, power=power, end_value=end)
    for t in STEPS:
        expected = end + (1 - end) * (1 - min(t, T) / T) ** power
        assert s(t) == pytest.approx(expected, rel=1e-14, abs=1e-15), t
    assert s(0) == 1.0
    assert s(T - 1) == pytest.approx(end + (1 - end) * (1 / T) ** power)
    assert s(T) == end
    assert s(T + 1) == end and s(10 * T) == end  # clamped past the end
    _assert_floats(s)


def test_polynomial_decay_power_one_is_the_paper_bert_schedule():
    # eta_t = eta_0 * (1 - t/T)
    s = PolynomialDecay(8)
    assert [s(t) for t in range(10)] == [1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0.0, 0.0]


@pytest.mark.parametrize("end", [0.0, 0.05])
def test_cosine_decay_closed_form(end):
    T = 1000
    s = CosineDecay(T, end_value=end)
    for t in STEPS:
        expected = end + (1 - end) * 0.5 * (1 + math.cos(math.pi * min(t, T) / T))
        assert s(t) == pytest.approx(expected, rel=1e-14, abs=1e-15), t
    assert s(0) == 1.0 and s(T // 2) == pytest.approx(end + (1 - end) / 2)
    assert s(T) == end and s(T + 5) == end
    _assert_floats(s)


def test_step_decay_and_constant():
    s = StepDecay((30, 60, 80), 0.1)
    for t in STEPS:
        expected = 0.1 ** sum(t >= b for b in (30, 60, 80))
        assert s(t) == pytest.approx(expected, rel=1e-15), t
    assert s(29) == 1.0 and s(30) == pytest.approx(0.1) and s(80) == pytest.approx(1e-3)
    assert StepDecay.from_epochs((30, 60, 80), 5005).boundaries == (150150, 300300, 400400)
    assert StepDecay.from_epochs((0.25,), 10).boundaries == (3,)  # 2.5 rounds half up
    c = Constant(0.5)
    assert [c(t) for t in (0, 1, 10**9)] == [0.5, 0.5, 0.5]
    assert Constant()(3) == 1.0
    _assert_floats(s)
    _assert_floats(c)


# ---------------------------------------------------------------------------------- composition


@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("power", [1.0, 2.0])
def test_warmup_then_decay_bert_practice(offset, power):
    """Warmup inside the T total steps, then decay over the T - W remaining steps to 0 at T."""
    W, T = 100, 1000
    s = warmup_then_decay(W, T, "poly", power=power, warmup_offset=offset)
    for t in STEPS:
        if t < W:
            expected = (t + offset) / W
        else:
            expected = max(0.0, 1 - (t - W) / (T - W)) ** power
        assert s(t) == pytest.approx(expected, rel=1e-14, abs=1e-15), t
    assert s(W - 1) == (1.0 if offset == 1 else (W - 1) / W)
    assert s(W) == 1.0  # the peak is at the end of the warmup
    assert s(T - 1) == pytest.approx((1 / (T - W)) ** power)  # the last update is not wasted
    assert s(T) == 0.0 and s(T + 10) == 0.0
    _assert_floats(s)


def test_warmup_then_decay_over_total_steps():
    """decay_over='total': the decay ignores the warmup (TF BERT): it drops to 1 - W/T at W."""
    W, T = 100, 1000
    s = warmup_then_decay(W, T, "poly", decay_over="total", end_value=0.1)
    for t in STEPS:
        expected = (t + 1) / W if t < W else 0.1 + 0.9 * max(0.0, 1 - t / T)
        assert s(t) == pytest.approx(expected, rel=1e-14), t
    assert s(W) == pytest.approx(0.1 + 0.9 * (1 - W / T))
    assert s(T) == pytest.approx(0.1)


def test_warmup_then_cosine_and_constant():
    W, T = 10, 110
    s = warmup_then_decay(W, T, "cosine", end_value=0.0)
    for t in range(0, 120):
        expected = (t + 1) / W if t < W else 0.5 * (1 + math.cos(math.pi * min(t - W, T - W) / (T - W)))
        assert s(t) == pytest.approx(expected, abs=1e-15), t
    c = warmup_then_decay(W, T, "constant")
    assert [c(t) for t in (0, 9, 10, 200)] == [0.1, 1.0, 1.0, 1.0]


def test_warmup_decay_object_matches_helper():
    s = WarmupDecay(LinearWarmup(2), PolynomialDecay(4))
    assert [s(t) for t in range(7)] == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0]
    assert s == warmup_then_decay(2, 6)


def test_phased_local_steps_and_rewarmup():
    a = warmup_then_decay(4, 12)
    b = Scaled(warmup_then_decay(2, 6), 0.5)
    s = join([(12, a), (6, b)])
    assert isinstance(s, Phased) and s.starts == (0, 12) and s.total_steps == 18
    for t in range(12):
        assert s(t) == a(t)
    for t in range(12, 30):  # phase 2 sees its local step; past the end it keeps its clock
        assert s(t) == 0.5 * warmup_then_decay(2, 6)(t - 12)
    assert s(11) == pytest.approx(1 / 8)  # end of phase 1
    assert s(12) == 0.25  # re-warmed from zero: 0.5 * (0 + 1) / 2
    assert s(13) == 0.5
    assert s.phase_at(11) == (0, 11) and s.phase_at(12) == (1, 0) and s.phase_at(40) == (1, 28)
    _assert_floats(s)


# ---------------------------------------------------------------------------------- scaling rules


def test_scale_lr_rules():
    assert scale_lr(0.1, 256, 8192, "linear") == pytest.approx(3.2)
    assert scale_lr(1e-3, 128, 8192, "sqrt") == pytest.approx(8e-3)
    assert scale_lr(1e-3, 128, 8192, "none") == 1e-3
    assert scale_lr(1e-3, 128, 32, "sqrt") == pytest.approx(5e-4)


def test_scale_warmup_rules():
    assert scale_warmup(5.0, 256, 8192, "constant") == 5.0
    assert scale_warmup(1 / 320, 512, 32768, "linear") == 1 / 5
    assert scale_warmup(0.5, 128, 1024, "linear") == 4.0


def test_steps_per_epoch_rounding():
    assert steps_per_epoch(60000, 8192) == 8  # ceil: the partial batch is an update
    assert steps_per_epoch(60000, 8192, drop_last=True) == 7
    assert steps_per_epoch(60000, 60000) == 1
    assert steps_per_epoch(1_281_167, 256) == 5005


# ---------------------------------------------------------------------------------- recipes


def test_recipe_interface_for_the_harness():
    recipe = Recipe(base_lr=1e-3, base_batch=128, rule="sqrt", warmup_epochs=1.0, decay="poly",
                    power=1.0)
    plan = recipe.resolve(batch_size=8192, dataset_size=60000, epochs=10)
    assert plan.lr == pytest.approx(8e-3)
    assert plan.steps_per_epoch == 8 and plan.warmup_steps == 8 and plan.total_steps == 80
    assert plan.batch_size == 8192 and plan.epochs == 10
    for t in range(0, 90):
        expected = (t + 1) / 8 if t < 8 else max(0.0, 1 - (t - 8) / 72)
        assert plan.schedule(t) == pytest.approx(expected, abs=1e-15)
        assert 0.0 <= plan.schedule(t) <= 1.0
        assert plan.lr_at(t) == pytest.approx(plan.lr * expected)
    drop = Recipe(base_lr=1e-3, base_batch=128, warmup_epochs=1.0, drop_last=True)
    p = drop.resolve(batch_size=8192, dataset_size=60000, epochs=10)
    assert (p.steps_per_epoch, p.warmup_steps, p.total_steps) == (7, 7, 70)


def test_step_decay_boundaries_inside_the_warmup_all_act():
    """Two x0.1 epochs inside a 3-epoch warmup: both act at its end, on either decay clock."""
    assert StepDecay((0, 0, 5), 0.5)(0) == 0.25 and StepDecay((0, 0, 5), 0.5)(5) == 0.125
    for over in ("remaining", "total"):
        plan = Recipe(base_lr=0.1, base_batch=100, rule="none", warmup_epochs=3.0, decay="step",
                      decay_epochs=(1.0, 2.0, 4.0), decay_over=over).resolve(100, dataset_size=1000, epochs=5)
        assert plan.warmup_steps == 30
        assert plan.schedule(29) == 1.0  # the warmup's last step, on either clock
        assert [plan.schedule(t) for t in (30, 39, 40)] == pytest.approx([0.01, 0.01, 0.001])


def test_presets_take_a_warmup_or_decay_that_replaces_theirs():
    bert = preset("bert", warmup_epochs=0.1).resolve(512)  # the preset states a warmup_ratio
    assert bert.warmup_steps == 100_000
    goyal = preset("goyal", warmup_ratio=0.05, decay="poly")  # states warmup_epochs and decay_epochs
    assert goyal.warmup_epochs is None and goyal.warmup_ratio == 0.05 and goyal.decay_epochs == ()


def test_epochs_reported_are_the_ones_the_steps_cover():
    assert Recipe(base_lr=1e-3, base_batch=128, epochs=10).resolve(128, total_steps=100).epochs is None
    assert Recipe(base_lr=1e-3, base_batch=128).resolve(128, dataset_size=1280, total_steps=100).epochs == 10.0
    explicit = bert_two_phase(num_steps=(7038, 1563)).resolve()
    assert explicit.epochs == pytest.approx(7038 / 7813 + 1563 / 15625)
    assert bert_two_phase().resolve().epochs == 1.0


def test_recipe_warmup_rules_and_total_steps():
    base = dict(base_lr=1e-3, base_batch=128, warmup_epochs=1.0)
    const = Recipe(**base, warmup_rule="constant").resolve(1024, dataset_size=12800, epochs=20)
    linear = Recipe(**base, warmup_rule="linear").resolve(1024, dataset_size=12800, epochs=20)
    assert const.steps_per_epoch == 13 and const.warmup_steps == 13  # 1 epoch
    assert linear.warmup_steps == 104  # 8 epochs = the 100 steps of batch 128, at ceil'd epochs
    ratio = Recipe(base_lr=1e-3, base_batch=128, warmup_ratio=0.1).resolve(512, total_steps=250)
    assert ratio.warmup_steps == 25 and ratio.total_steps == 250 and ratio.steps_per_epoch is None
    cos = Recipe(base_lr=1.0, base_batch=1, rule="none", decay="cosine", end_value=0.1)
    p = cos.resolve(4, dataset_size=40, epochs=1)
    assert p.warmup_steps == 0 and p.schedule(0) == 1.0 and p.schedule(10) == pytest.approx(0.1)


def test_bert_preset_reproduces_the_paper_table():
    """lr = 5/(2^k 10^3), ratio 1/320 ... 1/5: the sqrt rule and linear-epoch warmup from 512."""
    ks = (3.0, 2.5, 2.0, 1.5, 1.0, 0.5, 0.0)
    ratios = (1 / 320, 1 / 160, 1 / 80, 1 / 40, 1 / 20, 1 / 10, 1 / 5)
    steps = (1_000_000, 500_000, 250_000, 125_000, 62_500, 31_250, 15_625)
    assert [r.batch_size for r in BERT_UNTUNED_TABLE] == [512 * 2**j for j in range(7)]
    recipe = preset("bert")
    for row, k, ratio, total in zip(BERT_UNTUNED_TABLE, ks, ratios, steps, strict=True):
        assert row.lr == 5 / (2**k * 10**3)
        assert row.warmup_ratio == ratio and row.total_steps == total
        plan = recipe.resolve(batch_size=row.batch_size)
        # sqrt(2^j) is exact for even j; for odd j the two closed forms differ by at most 1 ulp
        assert abs(plan.lr - row.lr) <= math.ulp(row.lr)
        assert scale_warmup(recipe.warmup_ratio, 512, row.batch_size, "linear") == ratio
        assert plan.total_steps == total
        assert plan.warmup_steps == round(ratio * total) == 3125  # same warmup steps in every row
        assert plan.schedule(3124) == 1.0 and plan.schedule(total) == 0.0
    assert BERT_UNTUNED_TABLE[0].lr == 6.25e-4 and BERT_UNTUNED_TABLE[-1].lr == 5e-3


def test_goyal_preset():
    plan = preset("goyal").resolve(batch_size=8192)
    spe = math.ceil(1_281_167 / 8192)
    assert spe == 157 and plan.steps_per_epoch == spe
    assert plan.lr == pytest.approx(3.2)
    assert plan.warmup_steps == 5 * spe and plan.total_steps == 90 * spe
    init = 0.1 / 3.2  # warmup from the small-batch lr
    assert plan.schedule(0) == pytest.approx(init + (1 - init) / 785)
    assert plan.schedule(784) == 1.0
    assert plan.schedule(30 * spe - 1) == 1.0
    assert plan.schedule(30 * spe) == pytest.approx(0.1)
    assert plan.schedule(60 * spe) == pytest.approx(0.01)
    assert plan.schedule(80 * spe) == pytest.approx(0.001)
    assert plan.schedule(90 * spe + 10) == pytest.approx(0.001)
    base = preset("goyal").resolve(batch_size=256)
    assert base.lr == 0.1 and base.schedule(0) == 1.0  # no ramp at the base batch


def test_bert_two_phase_preset():
    plan = preset("bert-two-phase").resolve()
    p1, p2 = plan.phases
    assert (p1.batch_size, p1.seq_len, p2.batch_size, p2.seq_len) == (65536, 128, 32768, 512)
    # 9/10 of one pass over 512M sequences at 64K, 1/10 at 32K
    assert p1.steps_per_epoch == 7813 and p1.total_steps == 7032
    assert p2.steps_per_epoch == 15625 and p2.total_steps == 1563
    assert plan.total_steps == 8595 and plan.batch_size is None
    assert p1.warmup_steps == 1999 and p2.warmup_steps == 200  # 0.2843 and 0.128 of each
    assert plan.lr == 6e-3 and p1.lr == 6e-3 and p2.lr == 4e-3
    assert plan.lr_at(0) == pytest.approx(6e-3 / 1999)
    assert plan.lr_at(1998) == pytest.approx(6e-3)
    assert plan.lr_at(7031) == pytest.approx(6e-3 / (7032 - 1999))
    assert plan.lr_at(7032) == pytest.approx(4e-3 / 200)  # re-warmed from zero
    assert plan.lr_at(7032 + 199) == pytest.approx(4e-3)
    assert plan.lr_at(8594) == pytest.approx(4e-3 / (1563 - 200))
    assert plan.lr_at(8595) == 0.0
    assert plan.phase_at(7031) == (p1, 7031) and plan.phase_at(7032) == (p2, 0)
    assert max(plan.schedule(t) for t in range(0, 8600, 7)) <= 1.0
    published = bert_two_phase(num_steps=(7038, 1563)).resolve()
    assert published.total_steps == 8601
    assert [p.warmup_steps for p in published.phases] == [2001, 200]


def test_mixed_batch_recipe_custom_stages():
    r = MixedBatchRecipe(
        stages=(Stage(100, 0.5, 1.0, 0.1), Stage(50, 0.5, 0.5, 0.0)), dataset_size=1000, epochs=2
    )
    plan = r.resolve()
    assert [p.total_steps for p in plan.phases] == [10, 20]
    assert plan.epoch_at(10) == pytest.approx(1.0) and plan.epoch_at(30) == pytest.approx(2.0)
    assert plan.schedule(10) == 0.5  # phase 2: no warmup, peak 0.5 of phase 1's


# ---------------------------------------------------------------------------------- torch adapter


def _model_and_opt(lr_scale=(1.0, 0.1)):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    groups = [
        {"params": model[0].parameters(), "lr_scale": lr_scale[0]},
        {"params": model[1].parameters(), "lr_scale": lr_scale[1]},
    ]
    opt = torch.optim.AdamW(groups, lr=0.01)
    return model, opt


def _train(model, opt, sched, steps, lrs):
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
        sched.step()


def test_adapter_sets_float_lrs_with_lr_scale():
    plan = Recipe(base_lr=0.01, base_batch=32, warmup_epochs=1.0).resolve(32, 320, 3)
    model, opt = _model_and_opt()
    sched = plan.scheduler(opt)
    lrs: list = []
    _train(model, opt, sched, 35, lrs)
    for t, (lr0, lr1) in enumerate(lrs):
        assert type(lr0) is float and type(lr1) is float
        assert lr0 == pytest.approx(0.01 * plan.schedule(t), rel=1e-15, abs=0)
        assert lr1 == pytest.approx(0.1 * 0.01 * plan.schedule(t), rel=1e-15, abs=0)
    assert sched.last_epoch == 35


def test_adapter_peak_lr_options():
    model, opt = _model_and_opt(lr_scale=(1.0, 1.0))
    ScheduleLR(opt, LinearWarmup(4))  # initial_lr of each group (0.01)
    assert [g["lr"] for g in opt.param_groups] == [0.0025, 0.0025]
    model, opt = _model_and_opt(lr_scale=(1.0, 1.0))
    ScheduleLR(opt, LinearWarmup(4), peak_lr=[0.4, 0.8])
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.2]


def test_adapter_resume_gives_the_same_lrs_as_not_stopping():
    plan = preset("bert-two-phase", num_steps=(20, 10), warmup_ratios=(0.2, 0.3)).resolve()
    total, stop = plan.total_steps, 17

    model, opt = _model_and_opt()
    sched = plan.scheduler(opt)
    straight: list = []
    _train(model, opt, sched, total, straight)

    model, opt = _model_and_opt()
    sched = plan.scheduler(opt)
    first: list = []
    _train(model, opt, sched, stop, first)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                "sched": sched.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)  # the state holds no pickled schedule object

    model, opt = _model_and_opt()
    sched = plan.scheduler(opt)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    sched.load_state_dict(ckpt["sched"])
    assert sched.last_epoch == stop
    rest: list = []
    _train(model, opt, sched, total - stop, rest)
    assert first + rest == straight


def test_adapter_scheduler_state_alone_restores_lrs():
    plan = Recipe(base_lr=0.01, base_batch=32, warmup_epochs=1.0).resolve(32, 320, 3)
    model, opt = _model_and_opt()
    sched = plan.scheduler(opt)
    _train(model, opt, sched, 12, [])
    state = sched.state_dict()
    assert "schedule" not in state and state["last_epoch"] == 12
    model, opt = _model_and_opt()
    fresh = plan.scheduler(opt)
    fresh.load_state_dict(state)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx(
        [0.01 * plan.schedule(12), 0.001 * plan.schedule(12)], rel=1e-15
    )
    assert fresh.get_last_lr() == [g["lr"] for g in opt.param_groups]


def test_adapter_warns_on_a_different_schedule():
    model, opt = _model_and_opt()
    state = ScheduleLR(opt, LinearWarmup(4)).state_dict()
    model, opt = _model_and_opt()
    with pytest.warns(UserWarning, match="saved with schedule LinearWarmup"):
        ScheduleLR(opt, LinearWarmup(8)).load_state_dict(state)


# ---------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: LinearWarmup(-1), r"warmup_steps must be an integer >= 0, got -1"),
        (lambda: LinearWarmup(2.5), r"warmup_steps must be an integer >= 0, got 2\.5"),
        (lambda: LinearWarmup(4, offset=2), r"offset must be 0 or 1, got 2"),
        (lambda: LinearWarmup(4, init_value=1.5), r"init_value must be a real number in \[0\.0, 1\.0\], got 1\.5"),
        (lambda: PolynomialDecay(0), r"decay_steps must be an integer >= 1, got 0"),
        (lambda: PolynomialDecay(10, power=0), r"power must be a real number > 0\.0, got 0\.0"),
        (lambda: PolynomialDecay(10, end_value=-0.1), r"end_value must be a real number in \[0\.0, 1\.0\], got -0\.1"),
        (lambda: CosineDecay(-5), r"decay_steps must be an integer >= 1, got -5"),
        (lambda: StepDecay((60, 30)), r"boundaries must be non-decreasing, got \(60, 30\)"),
        (lambda: Recipe(base_lr=0.1, base_batch=8, decay="step", decay_epochs=(30, 30)),
         r"decay_epochs must be strictly increasing, got \(30, 30\)"),
        (lambda: Recipe(base_lr=0.1, base_batch=8, decay_epochs=(30,)),
         r"decay_epochs=\(30,\) is used only by decay='step', not by decay='poly'"),
        (lambda: Recipe(base_lr=0.1, base_batch=8, drop_last="yes"), r"drop_last must be True or False, got 'yes'"),
        (lambda: MixedBatchRecipe((Stage(8, 1.0, 0.1, 0.1),), epochs=float("inf")), r"epochs must be a real number > 0\.0, got inf"),
        (lambda: MixedBatchRecipe((Stage(8, 1.0, 0.1, 0.1),), warmup_offset=2), r"warmup_offset must be 0 or 1, got 2"),
        (lambda: bert_two_phase(lrs=(1e-3,)), r"lrs must be two values, one per phase, got \(0\.001,\)"),
        (lambda: preset("bert", warmup=3), r"unknown recipe field\(s\) warmup; allowed: base_lr, base_batch"),
        (lambda: StepDecay((30,), factor=0), r"factor must be a real number in \(0\.0, 1\.0\], got 0\.0"),
        (lambda: Phased(()), r"phases must contain at least one"),
        (lambda: join([(0, Constant())]), r"phases\[0\] num_steps must be an integer >= 1, got 0"),
        (lambda: warmup_then_decay(100, 100), r"warmup_steps=100 must be less than total_steps=100 \(warmup longer than training\)"),
        (lambda: warmup_then_decay(10, 100, "exp"), r"unknown decay 'exp'; allowed: 'poly', 'cosine', 'step', 'constant'"),
        (lambda: warmup_then_decay(10, 100, decay_over="all"), r"unknown decay_over 'all'; allowed: 'remaining', 'total'"),
        (lambda: scale_lr(0.1, 256, 1024, "cubic"), r"unknown rule 'cubic'; allowed: 'sqrt', 'linear', 'none'"),
        (lambda: scale_lr(0.1, 256, 0), r"batch must be an integer >= 1, got 0"),
        (lambda: scale_lr(0.1, -256, 1024), r"base_batch must be an integer >= 1, got -256"),
        (lambda: scale_warmup(1.0, 256, 1024, "sqrt"), r"unknown warmup rule 'sqrt'; allowed: 'constant', 'linear'"),
        (lambda: steps_per_epoch(100, 128, drop_last=True), r"batch_size=128 is larger than dataset_size=100"),
        (lambda: Recipe(base_lr=0.1, base_batch=0), r"base_batch must be an integer >= 1, got 0"),
        (lambda: Recipe(base_lr=-1.0, base_batch=256), r"base_lr must be a real number > 0\.0, got -1\.0"),
        (lambda: Recipe(base_lr=0.1, base_batch=256, rule="log"), r"unknown rule 'log'; allowed: 'sqrt', 'linear', 'none'"),
        (lambda: Recipe(base_lr=0.1, base_batch=256, warmup_epochs=1, warmup_ratio=0.1), r"give warmup_epochs or warmup_ratio, not both"),
        (lambda: Recipe(base_lr=0.1, base_batch=256, decay="step"), r"decay='step' needs decay_epochs"),
        (lambda: Recipe(base_lr=0.1, base_batch=256).resolve(0, 1000, 1), r"batch_size must be an integer >= 1, got 0"),
        (lambda: Recipe(base_lr=0.1, base_batch=256).resolve(-8, 1000, 1), r"batch_size must be an integer >= 1, got -8"),
        (lambda: Recipe(base_lr=0.1, base_batch=256).resolve(256), r"the training length is unknown: pass dataset_size and epochs, or total_steps"),
        (lambda: Recipe(base_lr=0.1, base_batch=256, warmup_epochs=5).resolve(256, 2560, 4), r"warmup_epochs=5 \(5 epochs at batch 256\) gives warmup_steps=50, not less than total_steps=40 \(warmup longer than training\)"),
        (lambda: preset("bert").resolve(512 * 320), r"warmup_ratio=0\.003125 \(1 of the steps at batch 163840\) gives warmup_steps=3125, not less than total_steps=3125"),
        (lambda: preset("bert-two-phase").resolve(batch_size=1024), r"batch_size=1024 does not match this recipe's batch sizes \(65536, 32768\)"),
        (lambda: preset("resnet"), r"unknown preset 'resnet'; allowed: 'bert', 'goyal', 'bert-two-phase'"),
        (lambda: MixedBatchRecipe(stages=(Stage(8, 0.5, 0.1),)), r"stage epoch_fraction values must sum to 1, got 0\.5"),
        # a bool is not a number, and a numeric string would be kept as a string
        (lambda: Recipe(base_lr=True, base_batch=256), r"base_lr must be a real number > 0\.0, got True"),
        (lambda: Constant(True), r"value must be a real number >= 0\.0, got True"),
        (lambda: PolynomialDecay(10, power=True), r"power must be a real number > 0\.0, got True"),
        (lambda: Recipe(base_lr=0.1, base_batch=256).resolve(256, 1000, epochs=True), r"epochs must be a real number > 0\.0, got True"),
        (lambda: Recipe(base_lr="0.1", base_batch=256), r"base_lr must be a real number > 0\.0, got '0\.1'"),
        (lambda: Recipe(base_lr=0.1, base_batch=256, decay="step", decay_epochs=("3", "20")), r"decay_epochs\[0\] must be a real number >= 0\.0, got '3'"),
        (lambda: steps_per_epoch(10, 3, drop_last=1), r"drop_last must be True or False, got 1"),
        # the two-phase preset: one count is not two, the phase at fault is named, its own arguments listed
        (lambda: bert_two_phase(num_steps=7038), r"num_steps must be None or two step counts, one per phase, got 7038"),
        (lambda: preset("bert-two-phase", lrs=(6e-3, -1)), r"phase 2 of 2: lr must be a real number > 0\.0, got -1\.0"),
        (lambda: preset("bert-two-phase", num_steps=(0, 1563)), r"phase 1 of 2: num_steps must be an integer >= 1, got 0"),
        (lambda: preset("bert-two-phase", lr=(1e-3, 1e-3)), r"unknown bert-two-phase argument\(s\) lr; allowed: lrs, warmup_ratios, num_steps, batch_sizes, seq_lens, dataset_size, power, stages, epochs"),
    ],
)
def test_bad_arguments_give_clear_errors(build, match):
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize(
    "schedule",
    [Constant(), LinearWarmup(3), PolynomialDecay(3), CosineDecay(3), StepDecay((1,)),
     warmup_then_decay(1, 3), join([(2, Constant())]), Scaled(Constant(), 0.5)],
)
def test_negative_steps_are_rejected(schedule):
    with pytest.raises(ValueError, match=r"step must be a non-negative integer, got -1"):
        schedule(-1)
    with pytest.raises(ValueError, match=r"step must be a non-negative integer, got 1\.5"):
        schedule(1.5)


def test_adapter_rejects_bad_peaks():
    model, opt = _model_and_opt()
    with pytest.raises(ValueError, match=r"peak_lr has 3 values for 2 param groups"):
        ScheduleLR(opt, Constant(), peak_lr=[0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match=r"peak_lr must be a real number >= 0\.0, got True"):
        ScheduleLR(opt, Constant(), peak_lr=True)
    with pytest.raises(ValueError, match=r"peak_lr must be a real number >= 0 or one per param group, got <object"):
        ScheduleLR(opt, Constant(), peak_lr=object())


def test_adapter_takes_a_0d_tensor_peak():
    model, opt = _model_and_opt()
    sched = ScheduleLR(opt, Constant(0.5), peak_lr=torch.tensor(0.25))
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.125, 0.0125])  # times each group's lr_scale
    assert sched.peak_lrs == [0.25, 0.25]


# ---------------------------------------------------------------------------------- CLI


def test_cli_prints_key_points_and_writes_png(tmp_path, capsys):
    out = tmp_path / "schedule.png"
    rc = cli.main(["schedule", "--recipe", "bert", "--batch-size", "512", "32768",
                   "--plot", str(out), "--steps", "100"])
    assert rc == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = capsys.readouterr().out
    assert "batch 32768, peak lr 0.005, warmup 3125 steps, total 15625 steps" in text
    assert "batch 512, peak lr 0.000625, warmup 3125 steps, total 1000000 steps" in text


def test_cli_custom_and_two_phase(tmp_path, capsys):
    rc = cli.main(["schedule", "--recipe", "custom", "--base-lr", "1e-3", "--base-batch", "128",
                   "--warmup-epochs", "1", "--batch-size", "8192", "--dataset-size", "60000",
                   "--epochs", "10"])
    assert rc == 0
    assert "peak lr 0.008, warmup 8 steps, total 80 steps, 8 steps/epoch" in capsys.readouterr().out
    out = tmp_path / "two.png"
    rc = cli.main(["schedule", "--recipe", "bert-two-phase", "--phase-steps", "7038", "1563",
                   "--plot", str(out)])
    assert rc == 0 and out.exists()
    assert "total 8601 steps" in capsys.readouterr().out


def test_cli_reports_errors(capsys):
    assert cli.main(["schedule", "--recipe", "bert", "--batch-size", "0"]) == 2
    assert "batch_size must be an integer >= 1, got 0" in capsys.readouterr().err
    assert cli.main(["schedule", "--recipe", "custom", "--base-lr", "0.1"]) == 2
    assert "--recipe custom needs --base-batch" in capsys.readouterr().err
    assert cli.main(["schedule", "--recipe", "bert-two-phase", "--rule", "sqrt"]) == 2
    assert "does not use --rule" in capsys.readouterr().err
    assert cli.main(["schedule", "--recipe", "goyal", "--power", "2"]) == 2
    assert "does not use --power (read by --decay poly only; this recipe decays with 'step')" in capsys.readouterr().err
    assert cli.main(["schedule", "--recipe", "bert", "--decay-epochs", "30"]) == 2
    assert "decay_epochs=(30.0,) is used only by decay='step'" in capsys.readouterr().err
    assert cli.main(["schedule", "--recipe", "bert-two-phase", "--epochs=-1"]) == 2
    assert "epochs must be a real number > 0.0, got -1.0" in capsys.readouterr().err
    assert cli.main(["schedule", "--recipe", "bert-two-phase", "--decay-epochs", "30"]) == 2
    assert capsys.readouterr().err == "error: --recipe bert-two-phase does not use --decay-epochs\n"  # named once
    assert cli.main(["schedule", "--recipe", "bert", "--batch-size", "512", "--plot", "/nonexistent/dir/x.png"]) == 2
    assert capsys.readouterr().err == "error: cannot write the plot /nonexistent/dir/x.png: No such file or directory\n"
    assert cli.main(["schedule", "--recipe", "bert", "--warmup-epochs", "0.1"]) == 0
    assert "warmup 100000 steps" in capsys.readouterr().out
