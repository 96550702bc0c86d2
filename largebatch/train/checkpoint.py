"""Atomic checkpoints: write to a temporary file in the same folder, fsync, then rename.

A crash at any moment leaves either the previous checkpoint or the new one, never a torn file.
Loading uses ``torch.load(weights_only=True)``: a checkpoint can hold tensors and plain Python
values only, so loading one cannot execute code.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import torch


# A temporary file of a target untouched for this long was left by a writer that was killed.
STALE_TMP_SECONDS = 600.0


def _remove_stale_temporaries(path: Path) -> None:
    """Remove the temporaries of ``path`` that a killed writer left (SIGKILL skips the cleanup in
    :func:`atomic_write_bytes`): files named exactly as ``mkstemp`` names them for this target
    (``.{name}.XXXXXXXX.tmp``) and not modified for :data:`STALE_TMP_SECONDS`. A newer one may
    belong to a writer at work and is kept; nothing else is touched."""
    pattern = re.compile(re.escape(f".{path.name}.") + r"[a-z0-9_]{8}" + re.escape(".tmp"))
    now = time.time()
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return
    for entry in entries:
        if not pattern.fullmatch(entry.name):
            continue
        try:
            if entry.is_file(follow_symlinks=False) and now - entry.stat(follow_symlinks=False).st_mtime > STALE_TMP_SECONDS:
                os.unlink(entry.path)
        except OSError:  # gone meanwhile, or not ours to remove: leave it
            pass


def atomic_write_bytes(path: str | os.PathLike, write) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, then atomically replace ``path``
    (and remove stale temporaries of ``path`` left by writers that were killed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a plain file would be readable by others
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _remove_stale_temporaries(path)


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    atomic_write_bytes(path, lambda f: torch.save(payload, f))


class CheckpointError(ValueError, RuntimeError):
    """A checkpoint that cannot be loaded (damaged, truncated, or not one of ours)."""


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # a foreign or damaged file: say which and why
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"cannot load checkpoint {str(path)!r} ({first}); it was left as it is: move it away to start "
            f"the run over, or use another output folder"
        ) from exc


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    data = json.dumps(obj, indent=2, sort_keys=True, default=str).encode()
    atomic_write_bytes(path, lambda f: f.write(data))


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state`. The states go back as CPU byte tensors, wherever the checkpoint was
    loaded to (``map_location`` moves them too, and torch refuses a state on a GPU); CUDA states
    only for the devices this machine has."""
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"][: torch.cuda.device_count()]])
