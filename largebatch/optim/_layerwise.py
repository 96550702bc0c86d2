"""The base class of Lamb and Lars: gathering, global clipping, non-finite policy, master weights.

Subclasses supply ``_init_state(p, state)`` and ``_update(group, xs, grads, states, ok, grad_scale)``;
the base class does everything that is the same for every layer-wise optimizer.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import torch
from torch import Tensor
from torch.optim import Optimizer

from largebatch.optim._fused import fused_available, fused_unavailable_reason
from largebatch.optim._common import (
    NONFINITE_POLICIES,
    SquaredSumReducer,
    Telemetry,
    all_finite,
    check_choice,
    check_grad,
    check_max_grad_norm,
    check_nonneg,
    clip_coefficient,
    compute_dtype,
    global_grad_norm,
    is_dtensor,
    local_tensor,
    run_together,
)


class LayerwiseOptimizer(Optimizer):
    """Shared machinery; see :class:`largebatch.Lamb` for the options documented in full."""

    # torch.amp.GradScaler.step() hands the step its scale and its inf flag (the attributes
    # grad_scale and found_inf) instead of unscaling the gradients in place: see _amp_scaling.
    _step_supports_amp_scaling = True

    def __init__(
        self,
        params,
        defaults: dict,
        *,
        max_grad_norm: float | None,
        clip_eps: float,
        nonfinite: str,
        foreach: bool | None,
        fused: bool | None,
        master_weights: bool,
        norm_reducer: SquaredSumReducer | None,
    ) -> None:
        check_max_grad_norm(max_grad_norm)
        check_nonneg("clip_eps", clip_eps)
        check_choice("nonfinite", nonfinite, NONFINITE_POLICIES)
        if foreach is not None and not isinstance(foreach, bool):  # 0 == False, but `foreach is False` selects the path
            raise ValueError(f"Invalid foreach: {foreach!r}; allowed values are None (auto), True, False")
        if norm_reducer is not None and not callable(norm_reducer):
            raise ValueError(f"Invalid norm_reducer: {norm_reducer!r}; it must be None or a callable Tensor -> Tensor")
        if fused is not None and not isinstance(fused, bool):
            raise ValueError(f"Invalid fused: {fused!r}; allowed values are None (auto), True, False")
        if fused and foreach is False:
            raise ValueError("fused=True and foreach=False contradict each other; choose one path")
        if not isinstance(master_weights, bool):  # "no" would be true
            raise ValueError(f"Invalid master_weights: {master_weights!r}; it must be True or False")
        self._check_group(self._resolve_group(dict(defaults), defaults))
        super().__init__(params, defaults)  # validates every group through add_param_group
        self.fused = fused
        self.max_grad_norm = max_grad_norm
        self.clip_eps = clip_eps
        self.nonfinite = nonfinite
        self.foreach = foreach
        self.master_weights = master_weights
        # DTensor (FSDP2) parameters imply their reducer: one all-reduce over the shard group.
        self.norm_reducer = norm_reducer if norm_reducer is not None else _placement_reducer(self.param_groups)
        self.telemetry = Telemetry()
        # Cumulative count of (group, step) pairs skipped because of non-finite gradients; a 0-d
        # tensor so that counting needs no host sync. Read it with int(opt.skipped_steps).
        self.skipped_steps = torch.zeros((), dtype=torch.int64)
        self.last_grad_norm: Tensor | None = None

    def state_dict(self) -> dict:
        """torch.optim's state dict, plus ``skipped_steps`` (the count continues after a resume)."""
        state_dict = super().state_dict()
        state_dict["skipped_steps"] = self.skipped_steps.detach().clone()
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        """torch.optim's loader, then state restored in the dtype our step keeps it in.

        torch.optim casts every floating state entry to its parameter's dtype, which would turn the
        float32 moments and master weights of a bfloat16 parameter into bfloat16 on every resume.
        A 16-bit parameter's master copy follows this optimizer's ``master_weights`` (made from the
        parameter when the saved state has none, dropped when it is False), and ``step`` is moved to
        its parameter's device.
        Options that a saved group does not have (it predates them) take the constructor's value.
        A saved state that does not fit the parameters (another model's shapes, another optimizer's
        entries) is refused before anything changes; torch.optim would only fail at the next step.
        """
        self._check_saved_state(state_dict)
        super().load_state_dict(state_dict)
        if "skipped_steps" in state_dict:  # absent from state dicts written before it was saved
            self.skipped_steps = torch.as_tensor(state_dict["skipped_steps"], dtype=torch.int64).detach().clone()
        for group in self.param_groups:
            resolved = self._resolve_group(group, self.defaults)
            for key, value in self.defaults.items():
                group.setdefault(key, resolved.get(key, value))
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params):
            saved = state_dict["state"].get(saved_id)
            if not saved:
                continue
            state = self.state[p]
            step = state.get("step")
            if isinstance(step, Tensor) and not is_dtensor(step) and step.device != p.device:
                # torch.optim leaves "step" where it was saved (a checkpoint loaded with map_location="cpu");
                # it is kept beside the parameter, where a fresh state has it
                state["step"] = step.to(p.device)
            if p.dtype == compute_dtype(p):
                continue
            for k, v in saved.items():
                if k != "step" and isinstance(v, Tensor) and v.is_floating_point():
                    state[k] = v.to(device=p.device, dtype=compute_dtype(p), copy=True)
            # the state follows this optimizer's master_weights, whatever the saving one had
            if self.master_weights and "master" not in state:
                state["master"] = p.detach().to(compute_dtype(p)).clone()
            elif not self.master_weights:
                state.pop("master", None)

    def _check_saved_state(self, state_dict: dict) -> None:
        name = type(self).__name__
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= state_dict.keys():
            raise ValueError(f"{name}.load_state_dict: expected a dict with 'state' and 'param_groups' (from state_dict())")
        saved_ids = [i for g in state_dict["param_groups"] for i in g.get("params", ())]
        params = [p for g in self.param_groups for p in g["params"]]
        if len(saved_ids) != len(params):
            return  # torch.optim's loader says which group does not match
        for index, (saved_id, p) in enumerate(zip(saved_ids, params)):
            saved = state_dict["state"].get(saved_id)
            if not saved:
                continue
            missing = [k for k in self._STATE_KEYS if k not in saved]
            if missing:
                raise ValueError(
                    f"{name}.load_state_dict: the saved state of parameter {index} has {sorted(saved)}, without "
                    f"{missing}; a {name} state has {list(self._STATE_KEYS)} (was it saved by another optimizer?)"
                )
            for key, value in saved.items():
                if key != "step" and isinstance(value, Tensor) and value.shape != p.shape:
                    raise ValueError(
                        f"{name}.load_state_dict: parameter {index} has shape {tuple(p.shape)} but its saved "
                        f"{key!r} has shape {tuple(value.shape)}; the state dict belongs to other parameters"
                    )

    def add_param_group(self, param_group: dict) -> None:
        """torch.optim's add_param_group, then the group (defaults filled in) is validated.

        A group that is refused is not added: the optimizer stays as it was.
        """
        super().add_param_group(self._resolve_group(param_group, self.defaults))
        try:
            self._check_new_group(self.param_groups[-1])
        except BaseException:
            self.param_groups.pop()
            raise

    def _check_new_group(self, group: dict) -> None:
        self._check_group(group)
        seen: dict[int, int] = {}
        for i, p in enumerate(group["params"]):
            if not p.is_floating_point():
                hint = " (optimize torch.view_as_real(p) for complex ones)" if p.is_complex() else ""
                raise ValueError(
                    f"Invalid parameter of dtype {p.dtype}: {type(self).__name__} takes real floating-point "
                    f"parameters (float16, bfloat16, float32, float64){hint}"
                )
            if id(p) in seen:  # it would be updated twice per step, differently on each path
                raise ValueError(
                    f"Invalid parameter group: parameters {seen[id(p)]} and {i} are the same tensor; "
                    f"{type(self).__name__} takes each tensor once"
                )
            seen[id(p)] = i

    @staticmethod
    def _resolve_group(group: dict, defaults: dict) -> dict:
        """The group with defaults that depend on its other options filled in (none here)."""
        return group

    # -- per-subclass hooks -------------------------------------------------------------------
    _STATE_KEYS: tuple[str, ...] = ()  # the entries _init_state creates (checked when a state dict is loaded)

    @staticmethod
    def _check_group(group: dict) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _init_state(self, p: Tensor, state: dict) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    @staticmethod
    def _check_grads(group: dict, params: list[Tensor], grads: list[Tensor], states: list[dict]) -> None:
        """Raise ValueError if the group's options cannot take these gradients (of the parameters,
        or of their float32 masters in ``states``); called for every group before anything changes."""

    def _update(self, group: dict, xs, grads, states, ok, grad_scale, unscale, use_foreach: bool):  # pragma: no cover
        """The update of one bucket: (weight norms, update norms, trust ratios), or with a norm
        reducer a Pending request that finishes with them (see largebatch.optim._common.run_together).
        ``unscale`` (a GradScaler's 1 / scale, or None) multiplies the gradients in place first, as
        ``GradScaler.unscale_`` would; ``grad_scale`` (global clipping) applies on top, without
        changing them."""
        raise NotImplementedError

    # -- helpers ------------------------------------------------------------------------------
    def _use_foreach(self, params: list[Tensor]) -> bool:
        # The multi-tensor path is the default on every device; foreach=False selects the
        # readable single-tensor reference path.
        return True if self.foreach is None else self.foreach

    def _use_fused(self, xs: list[Tensor]) -> bool:
        """fused=None: the fused backend when it supports these tensors and foreach is not False."""
        if self.fused is False or self.foreach is False:
            return False
        available = fused_available(xs)
        if self.fused and not available:
            raise RuntimeError(
                f"{type(self).__name__}(fused=True): no fused backend for tensors of "
                f"{sorted({(str(x.device), str(x.dtype)) for x in xs})}: {fused_unavailable_reason(xs)}; "
                "use fused=None to fall back"
            )
        return available

    def _gather(self, group: dict):
        params, grads, states = [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            check_grad(p, type(self).__name__)
            state = self.state[p]
            if len(state) == 0:
                self._init_state(p, state)
                if self.master_weights and p.dtype != compute_dtype(p):
                    state["master"] = p.detach().to(compute_dtype(p)).clone()
            params.append(p)
            grads.append(local_tensor(p.grad))
            states.append(state)
        return params, grads, states

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        """Perform one optimisation step. ``closure`` re-evaluates the model and returns the loss."""
        try:
            return self._step(closure)
        except BaseException:
            # A GradScaler deletes the grad_scale and found_inf it set only after a step that returns;
            # left behind, they would unscale the next step (or a retried scaler.step) a second time.
            for name in ("grad_scale", "found_inf"):
                self.__dict__.pop(name, None)
            raise

    def _step(self, closure: Callable[[], float] | None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.telemetry.clear()
        gathered = [self._gather(g) for g in self.param_groups]
        for group, (params, grads, states) in zip(self.param_groups, gathered):
            self._check_grads(group, params, grads, states)

        grad_scale = None
        global_ok = None
        inv_scale, amp_ok = self._amp_scaling()
        if self.max_grad_norm is not None:
            all_grads = [g for _, grads, _ in gathered for g in grads]
            norm = global_grad_norm(all_grads, self._totals_reducer())
            if inv_scale is not None:  # the norm of the unscaled gradients
                norm = norm * inv_scale.to(norm.dtype)
            self.last_grad_norm = norm
            # With global clipping a non-finite gradient anywhere poisons the clip factor, so the
            # whole step is skipped; without it each group is checked on its own.
            global_ok = torch.isfinite(norm) if amp_ok is None else torch.isfinite(norm) & amp_ok
            grad_scale = torch.where(global_ok, clip_coefficient(norm, self.max_grad_norm, self.clip_eps), 1.0)

        oks = [global_ok] * len(gathered)
        if global_ok is None and amp_ok is not None:  # the scaler has checked every gradient already
            oks = [amp_ok] * len(gathered)
        elif self.nonfinite != "none" and global_ok is None:
            oks = self._groups_ok([grads for _, grads, _ in gathered])
        active = [(i, group, g, ok) for i, (group, g, ok) in enumerate(zip(self.param_groups, gathered, oks)) if g[0]]
        if self.nonfinite == "raise" and amp_ok is None:  # documented: this policy syncs; checked before anything changes
            for i, _, _, ok in active:
                if not bool(ok):
                    what = f"non-finite gradient in parameter group {i}"
                    if global_ok is not None:  # the clipping norm covers every group: name the one at fault
                        bad = [j for j, (_, grads, _) in enumerate(gathered) if grads and not bool(all_finite(grads))]
                        what = (f"non-finite gradient in parameter group {bad[0]}" if bad else
                                "non-finite gradient norm (this process's gradients are finite: the norm "
                                "overflowed, or another rank's gradients are not)")  # fmt: skip
                    raise FloatingPointError(
                        f"{type(self).__name__}: {what} (nonfinite='raise'); nothing was updated. "
                        "Use nonfinite='skip' to skip such steps instead"
                    )
        # Each group's update returns its result, or (sharded parameters) a request for its global
        # squared sums: running them together answers the requests of all groups with ONE collective.
        updates = []
        for _, group, (params, grads, states), ok in active:
            if self.nonfinite != "none" or global_ok is not None or amp_ok is not None:  # clipping: the norm is a free check
                if self.skipped_steps.device != ok.device:  # kept where the flags are: no copy to the host
                    self.skipped_steps = self.skipped_steps.to(ok.device)
                self.skipped_steps += (~ok).to(torch.int64)
            updates.extend(self._group_updates(group, params, grads, states, ok, grad_scale, inv_scale))
        results = run_together([update for *_, update in updates])
        for (params, xs, bucket, _), norms in zip(updates, results):
            self._record(params, xs, bucket, norms)
        for params, _, states in gathered:
            for p, s in zip(params, states):
                if "master" in s:  # the float32 master, copied back into the 16-bit parameter
                    local_tensor(p).copy_(local_tensor(s["master"]))
        return loss

    def _amp_scaling(self) -> tuple[Tensor | None, Tensor | None]:
        """(1 / scale, steps ok) from a torch.amp.GradScaler calling this step, else (None, None).

        ``GradScaler.step`` sets ``grad_scale`` (its scale; None when ``unscale_`` was called
        already) and ``found_inf`` (non-zero when it found an inf/nan in any gradient) on the
        optimizer for the duration of the step. The gradients are then multiplied by
        ``1 / scale`` (computed as ``GradScaler.unscale_`` does) inside the update, and a step with
        ``found_inf`` is skipped under every ``nonfinite`` policy and counted in ``skipped_steps``
        (overflow is how the scaler finds its scale); the optimizer's own non-finite check, which
        the scaler has done, is not repeated. No device tensor is read on the host.
        """
        found_inf = getattr(self, "found_inf", None)
        if found_inf is None:
            return None, None
        ok = found_inf == 0
        reduce = self._totals_reducer()
        if reduce is not None:  # every rank takes the same decision (a no-op after ShardedGradScaler)
            ok = reduce((~ok).float().reshape(1)).reshape(()) == 0
        scale = getattr(self, "grad_scale", None)
        inv_scale = None if scale is None else scale.double().reciprocal().float()
        return inv_scale, ok

    def _record(self, params, xs, updated, norms) -> None:
        owner = {id(x): p for p, x in zip(params, xs)}
        w_norm, u_norm, ratio = norms
        self.telemetry.record([owner[id(x)] for x in updated], w_norm, u_norm, ratio)

    def _totals_reducer(self) -> SquaredSumReducer | None:
        return getattr(self.norm_reducer, "reduce_totals", self.norm_reducer)

    def _groups_ok(self, grads_per_group: list[list[Tensor]]) -> list[Tensor]:
        """A 0-d bool per group: all its gradients are finite. With a reducer the flags of all
        groups are summed over ranks in one call, so every rank takes the same decision."""
        oks = [all_finite(grads) for grads in grads_per_group]
        reduce = self._totals_reducer()
        if reduce is None:
            return oks
        device = next((grads[0].device for grads in grads_per_group if grads), None)
        bad = reduce(torch.stack([(~ok).float().to(device) for ok in oks]))
        return list((bad == 0).unbind())

    def _group_updates(self, group, params, grads, states, ok, grad_scale, unscale) -> list[tuple]:
        """[(params, xs, bucket, update result or Pending)] for one group: one bucket per device and dtype
        on the multi-tensor path, the whole group on the reference path. ``xs`` are the tensors
        updated: float32 masters of 16-bit parameters, local shards of DTensors."""
        # Parameters are updated through their float32 master copy when they are 16-bit.
        xs = [s.get("master", p) for p, s in zip(params, states)]
        if any(is_dtensor(x) for x in xs):
            # Sharded parameters are updated shard by shard on plain tensors; the norm_reducer makes
            # each norm whole (DTensor ops would issue one collective per norm).
            xs = [local_tensor(x) for x in xs]
            states = [{k: local_tensor(v) for k, v in s.items()} for s in states]
        use_foreach = self._use_foreach(params)
        if not use_foreach:
            return [(params, xs, xs, self._update(group, xs, grads, states, ok, grad_scale, unscale, False))]
        # The multi-tensor path needs tensors of one device and dtype per call.
        buckets: dict = defaultdict(lambda: ([], [], []))
        for x, g, s in zip(xs, grads, states):
            b = buckets[(x.device, x.dtype)]
            b[0].append(x)
            b[1].append(g)
            b[2].append(s)
        return [(params, xs, bx, self._update(group, bx, bg, bs, ok, grad_scale, unscale, True))
                for bx, bg, bs in buckets.values()]  # fmt: skip


def _placement_reducer(param_groups: list[dict]) -> SquaredSumReducer | None:
    """The reducer implied by DTensor parameters (FSDP2), or None when no parameter is a DTensor."""
    params = [p for g in param_groups for p in g["params"]]
    if not any(is_dtensor(p) for p in params):
        return None
    from largebatch.distributed.norms import dtensor_norm_reducer  # imported only when DTensors are in use

    return dtensor_norm_reducer(params)
