"""Checkpoints of the reference trainer: written atomically, read with ``weights_only=True``,
resumed exactly.

A checkpoint holds the model, optimizer, schedule, loss scaler and early-stopping state,
every rank's RNG state (DDP: each rank resumes its own dropout stream), the step, the
validation history, and the state of the callbacks that have one (tdiag's Monitor: a resumed
run's history continues at the checkpoint's step, with a restart marker).
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import warnings
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from .config import TrainConfig
from .optim import EarlyStopping

if TYPE_CHECKING:
    from .train import TrainState

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
_REQUIRED = ("model", "optimizer", "scheduler", "scaler", "early_stopping", "rng", "step")


class ResumeError(ValueError):
    """The checkpoint in out_dir cannot be resumed: written for another model, refused by a
    weights-only load, or not a checkpoint of this trainer."""


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write atomically: a crash mid-write leaves the previous checkpoint intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` (tensors and plain containers only: a
    pickle that would build other objects is refused, never run), on the CPU.

    Raises:
        ResumeError: the file is refused by the weights-only unpickler, is not a torch
            checkpoint (truncated, garbage), cannot be read, or lacks this trainer's keys.
            The message names the file and the reason, on one line.
    """
    try:
        with warnings.catch_warnings():
            # a plain pickle (protocol 4+) also gets a "Detected pickle protocol" warning
            # before the refusal below: the one-line error says it all
            warnings.filterwarnings("ignore", message=r"Detected pickle protocol")
            # CPU first: RNG states must stay CPU tensors; load_state_dict moves the rest.
            ck = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights-only refusal, or not a pickle at all
        raise ResumeError(
            f"cannot resume from {path}: refused by the weights-only load ({_reason(e)}); "
            "not a checkpoint written by this trainer, and nothing in it was run. "
            "Delete it or use another --out-dir"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile) as e:  # torn or not a torch file
        raise ResumeError(
            f"cannot resume from {path}: not a readable checkpoint ({_reason(e)}). "
            "Delete it or use another --out-dir"
        ) from None
    except OSError as e:
        raise ResumeError(f"cannot resume from {path}: {e.strerror or e}") from None
    missing = [k for k in _REQUIRED if not isinstance(ck, dict) or k not in ck]
    if missing:
        raise ResumeError(
            f"cannot resume from {path}: not a checkpoint of this trainer "
            f"(missing {', '.join(missing)}). Delete it or use another --out-dir"
        )
    return ck


def _reason(exc: BaseException) -> str:
    """The informative line of a torch.load error (its messages run to a dozen lines)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    line = next(  # a weights-only refusal names the offending global or opcode here
        (ln for ln in lines if "GLOBAL" in ln or ln.startswith("Unsupported")),
        lines[0] if lines else type(exc).__name__,
    )
    return line.split(". ")[0].rstrip(".")  # the first sentence


def check_resumable(path: Path, ck: dict[str, Any], cfg: TrainConfig) -> None:
    """Raises ResumeError when the checkpoint was written for another model."""
    saved = ck.get("config", {}).get("model", {})
    diffs = {
        k: (saved.get(k), v)
        for k, v in asdict(cfg.model).items()
        if k not in ("activation_checkpointing", "dropout") and saved.get(k) != v
    }
    if diffs:
        shown = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(diffs.items()))
        raise ResumeError(
            f"{path} was written for another model ({shown}); "
            "resume with the same model flags or use another --out-dir"
        )


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_rng_states(world: int) -> list[dict[str, Any]]:
    """Every rank's RNG state, in rank order (a collective under DDP; checkpoint steps only)."""
    if world == 1:
        return [rng_state()]
    states: list[Any] = [None] * world
    dist.all_gather_object(states, rng_state())
    return states


def callback_key(index: int, cb: object) -> str:
    return f"{index}:{type(cb).__name__}"


@dataclass
class RunRecord:
    """What a checkpoint carries besides the modules' states."""

    val_history: list[tuple[int, float]] = field(default_factory=list)
    stopped_early: bool = False
    callbacks: dict[str, Any] = field(default_factory=dict)  # callback_key -> state_dict


class Checkpointer:
    """Saves the run to ``path`` and resumes it from there.

    Args:
        path: the checkpoint file (``out_dir/checkpoint.pt``).
        state: the loop's state (model, optimizer, scheduler, scaler, step, rank).
        stopper: the early-stopping state.
        callbacks: the loop's callbacks; those with ``state_dict``/``load_state_dict`` are
            saved and resumed with the run.
    """

    def __init__(
        self,
        path: Path,
        state: TrainState,
        stopper: EarlyStopping,
        callbacks: tuple[object, ...] | list[object],
    ) -> None:
        self.path, self.state, self.stopper, self.callbacks = path, state, stopper, callbacks

    def resume(self) -> RunRecord:
        """Restore the modules, RNG and step from the checkpoint when there is one.

        Raises:
            ResumeError: see :func:`load_checkpoint` and :func:`check_resumable`.
        """
        s = self.state
        if not self.path.exists():
            return RunRecord()
        ck = load_checkpoint(self.path)
        check_resumable(self.path, ck, s.config)
        s.model.load_state_dict(ck["model"])
        s.optimizer.load_state_dict(ck["optimizer"])
        s.scheduler.load_state_dict(ck["scheduler"])
        if ck["scaler"] and s.scaler is not None:  # empty from a disabled scaler (fp32/bf16)
            s.scaler.load_state_dict(ck["scaler"])
        self.stopper.load_state_dict(ck["early_stopping"])
        per_rank = ck.get("rng_per_rank") or []
        set_rng_state(per_rank[s.rank] if len(per_rank) == s.world_size else ck["rng"])
        s.step, s.lr = int(ck["step"]), s.scheduler.get_last_lr()[0]
        record = RunRecord(
            val_history=[(int(step), float(v)) for step, v in ck.get("val_history", [])],
            stopped_early=bool(ck.get("stopped_early", False)),
            callbacks=ck.get("callbacks") or {},
        )
        if s.rank == 0:
            logger.info("resumed from %s at step %d", self.path, s.step)
            if record.stopped_early:
                logger.info("that run had stopped early (no val/loss improvement): not resuming")
        return record

    def restore_callbacks(self, record: RunRecord) -> None:
        """Hand each callback its saved state (after ``on_train_start``: it is set up)."""
        for i, cb in enumerate(self.callbacks):
            key = callback_key(i, cb)
            if key in record.callbacks and callable(getattr(cb, "load_state_dict", None)):
                cb.load_state_dict(record.callbacks[key])

    def save(self, record: RunRecord) -> None:
        """Write the checkpoint (rank 0). A collective under DDP: call it on every rank."""
        s = self.state
        rng_per_rank = gather_rng_states(s.world_size)
        if s.rank != 0:
            return
        payload = {
            "model": s.model.state_dict(),
            "optimizer": s.optimizer.state_dict(),
            "scheduler": s.scheduler.state_dict(),
            "scaler": s.scaler.state_dict() if s.scaler is not None else {},
            "early_stopping": self.stopper.state_dict(),
            "rng": rng_per_rank[0],
            "rng_per_rank": rng_per_rank,  # DDP: every rank resumes its own dropout stream
            "step": s.step,
            "config": asdict(s.config),
            "val_history": [list(x) for x in record.val_history],
            "stopped_early": record.stopped_early,
            # observers with state (the tdiag Monitor): resumed with the run
            "callbacks": {
                callback_key(i, cb): cb.state_dict()
                for i, cb in enumerate(self.callbacks)
                if callable(getattr(cb, "state_dict", None))
            },
        }
        save_checkpoint(self.path, payload)
