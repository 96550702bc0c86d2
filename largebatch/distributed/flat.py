"""Per-tensor norms of parameters packed into one flat buffer that is sharded across ranks.

FSDP1 ``FlatParameter``, ZeRO-2/3 and DeepSpeed keep many logical tensors end to end in one 1-d
buffer, pad it to a multiple of the world size and give rank ``r`` the slice
``[r * n / world, (r + 1) * n / world)``. A tensor may straddle a slice boundary, so its norm is a
sum of pieces held by different ranks. :class:`FlatLayout` records the boundaries explicitly;
:func:`flat_layer_norms` sums the local pieces (segment sums over views of the local slice) and
adds them up across ranks with ONE all-reduce; :class:`FlatShard` exposes the local pieces as
tensors that :class:`largebatch.Lamb` / :class:`largebatch.Lars` can optimise directly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from largebatch.distributed.norms import ShardNormReducer

__all__ = ["FlatLayout", "FlatShard", "flat_squared_sums", "flat_layer_norms"]


@dataclass(frozen=True)
class FlatLayout:
    """Where each logical tensor lives in a flat buffer: ``names[i]`` of ``shapes[i]`` occupies
    ``[starts[i], starts[i] + numel(shapes[i]))``. Gaps (alignment padding) and the tail padding
    belong to no tensor and never enter a norm."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    starts: tuple[int, ...]

    def __post_init__(self) -> None:
        if not (len(self.names) == len(self.shapes) == len(self.starts)):
            raise ValueError("FlatLayout: names, shapes and starts must have the same length")
        end = 0
        for name, start, n in zip(self.names, self.starts, self.numels):
            if start < end:
                raise ValueError(f"FlatLayout: tensor {name!r} starts at {start}, inside the previous tensor (ends at {end})")
            end = start + n

    @classmethod
    def from_shapes(cls, named_shapes: Sequence[tuple[str, Sequence[int]]], align: int = 1) -> FlatLayout:
        """Tensors end to end in the given order, each start rounded up to a multiple of ``align``."""
        if align < 1:
            raise ValueError(f"Invalid align: {align!r}; it must be >= 1")
        names, shapes, starts, pos = [], [], [], 0
        for name, shape in named_shapes:
            pos = -(-pos // align) * align
            names.append(name)
            shapes.append(tuple(int(s) for s in shape))
            starts.append(pos)
            pos += math.prod(shapes[-1])
        return cls(tuple(names), tuple(shapes), tuple(starts))

    @classmethod
    def from_boundaries(cls, offsets: Sequence[int]) -> FlatLayout:
        """Tensor i is ``[offsets[i], offsets[i+1])`` (n + 1 increasing offsets, no gaps)."""
        offsets = [int(o) for o in offsets]
        if len(offsets) < 1 or any(b < a for a, b in zip(offsets, offsets[1:])):
            raise ValueError(f"Invalid offsets {offsets!r}; they must be n + 1 non-decreasing element offsets")
        n = len(offsets) - 1
        return cls(tuple(str(i) for i in range(n)), tuple((b - a,) for a, b in zip(offsets, offsets[1:])), tuple(offsets[:-1]))

    @property
    def numels(self) -> tuple[int, ...]:
        return tuple(math.prod(s) for s in self.shapes)

    @property
    def numel(self) -> int:
        """Elements up to the end of the last tensor (without tail padding)."""
        return self.starts[-1] + self.numels[-1] if self.starts else 0

    def padded_numel(self, world_size: int) -> int:
        return -(-self.numel // world_size) * world_size

    def shard_range(self, rank: int, world_size: int) -> tuple[int, int]:
        """``(start, stop)`` of rank's equal slice of the padded buffer (the FSDP1 / ZeRO convention)."""
        size = self.padded_numel(world_size) // world_size
        return rank * size, (rank + 1) * size

    def local_segments(self, shard_start: int, shard_numel: int) -> list[tuple[int, int]]:
        """For every tensor, the ``(lo, hi)`` range of the local slice it covers (``lo == hi``: none)."""
        stop = shard_start + shard_numel
        out = []
        for start, n in zip(self.starts, self.numels):
            lo = min(max(start, shard_start), stop) - shard_start
            hi = min(max(start + n, shard_start), stop) - shard_start
            out.append((lo, hi))
        return out


def _as_layout(layout: FlatLayout | Sequence[int]) -> FlatLayout:
    return layout if isinstance(layout, FlatLayout) else FlatLayout.from_boundaries(layout)


def flat_squared_sums(local_flat: Tensor, layout: FlatLayout | Sequence[int], shard_start: int) -> Tensor:
    """The local part of ``sum(x**2)`` of every tensor of ``layout``: a 1-d tensor, 0 for tensors
    outside the slice. Float32 for 16-bit buffers; no host sync."""
    layout = _as_layout(layout)
    if local_flat.dim() != 1:
        raise ValueError(f"local_flat must be 1-d, got shape {tuple(local_flat.shape)}")
    pieces = [local_flat[lo:hi] for lo, hi in layout.local_segments(shard_start, local_flat.numel())]
    if not pieces:
        return local_flat.new_zeros(0)
    dt = torch.float32 if local_flat.dtype in (torch.float16, torch.bfloat16) else local_flat.dtype
    norms = torch._foreach_norm(pieces, 2, dtype=dt)  # a 16-bit norm would keep only 8-11 bits
    return torch.stack(norms).square()


def flat_layer_norms(
    local_flat: Tensor | Sequence[Tensor],
    layout: FlatLayout | Sequence[int],
    shard_start: int,
    group: dist.ProcessGroup | None = None,
) -> Tensor | tuple[Tensor, ...]:
    """Global l2 norm of each logical tensor of a flat buffer from this rank's slice.

    Args:
        local_flat: this rank's 1-d slice, starting at element ``shard_start`` of the (padded) flat
            buffer; or several such slices with the same layout (e.g. weights and updates), whose
            norms are then reduced together in the same single collective.
        layout: a :class:`FlatLayout`, or n + 1 element offsets (tensor i is ``[offsets[i], offsets[i+1])``).
        shard_start: offset of ``local_flat[0]`` in the flat buffer.
        group: the process group over which the buffer is sharded (None: the default group; when
            torch.distributed is not initialised the slice is taken to be the whole buffer).

    Returns: one 1-d tensor of norms per slice given (a tensor for a single slice, else a tuple).
    Exactly one all-reduce is issued, whatever the number of tensors and slices.
    """
    single = isinstance(local_flat, Tensor)
    flats = [local_flat] if single else list(local_flat)
    layout = _as_layout(layout)
    sq = torch.stack([flat_squared_sums(f, layout, shard_start) for f in flats])
    if dist.is_available() and dist.is_initialized():
        sq = ShardNormReducer(group)(sq.reshape(-1)).reshape(sq.shape)
    norms = sq.sqrt()
    return norms[0] if single else tuple(norms.unbind())


class FlatShard:
    """This rank's slice of a flat buffer as per-tensor pieces that Lamb / Lars can optimise.

    ``pieces[i]`` is a 1-d view of ``local_flat`` covering the part of tensor ``i`` that this rank
    holds (empty when it holds none: every rank has one piece per tensor, in the same order, so the
    optimizers issue the same collectives on every rank). Updates to the pieces write through to
    ``local_flat``. ``norm_reducer`` sums each piece's squared sums over ``group``, so the trust
    ratios are those of the whole logical tensors.

    Example (a flat buffer sharded over the default group)::

        shard = FlatShard(local_flat, layout, shard_start)
        decay = [p for n, s, p in shard.named_pieces() if len(s) > 1]
        no_decay = [p for n, s, p in shard.named_pieces() if len(s) <= 1]
        opt = Lamb([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                   lr=1e-3, norm_reducer=shard.norm_reducer)
        ...; shard.attach_grad(local_flat_grad); opt.step()
    """

    def __init__(
        self, local_flat: Tensor, layout: FlatLayout | Sequence[int], shard_start: int, group: dist.ProcessGroup | None = None
    ) -> None:
        if local_flat.dim() != 1:
            raise ValueError(f"local_flat must be 1-d, got shape {tuple(local_flat.shape)}")
        self.layout = _as_layout(layout)
        self.shard_start = shard_start
        self.local_flat = local_flat
        self.segments = self.layout.local_segments(shard_start, local_flat.numel())
        with torch.no_grad():  # leaf views that the optimizer accepts; writes go to local_flat
            self.pieces = [local_flat.detach()[lo:hi] for lo, hi in self.segments]
        self.norm_reducer = ShardNormReducer(group)

    def named_pieces(self) -> list[tuple[str, tuple[int, ...], Tensor]]:
        """``(name, logical shape, piece)`` for every tensor of the layout."""
        return list(zip(self.layout.names, self.layout.shapes, self.pieces))

    def attach_grad(self, local_flat_grad: Tensor) -> None:
        """Give each piece the matching view of this rank's slice of the flat gradient."""
        if local_flat_grad.shape != self.local_flat.shape:
            raise ValueError(f"gradient slice of shape {tuple(local_flat_grad.shape)} for a slice of shape {tuple(self.local_flat.shape)}")
        for piece, (lo, hi) in zip(self.pieces, self.segments):
            piece.grad = local_flat_grad[lo:hi]
