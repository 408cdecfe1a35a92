"""Checkpoints: an atomic folder per step holding all a run needs to continue exactly."""
import json
import logging
import re
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from twinfold.models.export import CHECKPOINT_STATE, write_model_folder
from twinfold.models.files.atomic import atomic_directory, remove_tree
from twinfold.models.head import read_head
from twinfold.models.lora import has_lora, load_adapter_weights

STATE_FILE = CHECKPOINT_STATE
CONFIG_FILE = "config.yaml"
SCALER_FILE = "scaler.pt"
STREAMS_FILE = "streams.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")
log = logging.getLogger("twinfold")


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def save_checkpoint(output_dir: str | Path, step: int, model, optimizer, scheduler, loss_module,
                    rng_states: list, state: dict, config: dict, scaler=None, streams: list | None = None) -> Path:
    """Write `checkpoints/step-N/` atomically: a crash mid-write leaves no folder that looks complete.

    It holds the resolved `config` it was trained with, the mixed-precision `scaler`'s state (fp16), in streamed
    runs each process's stream position (`train.streams`), and a manifest of checksums of all its files
    (`models.atomic`). Its `model/` holds the weights, or of a LoRA model the adapter alone (the base is loaded
    again on resume).
    """
    folder = checkpoints_dir(output_dir) / f"step-{step}"
    with atomic_directory(folder, overwrite=True) as tmp:  # checkpoints/ belongs to the run
        (tmp / "model").mkdir()
        write_model_folder(model, tmp / "model", adapter=has_lora(model.encoder))  # LoRA: the adapter alone
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(loss_module.state_dict(), tmp / "loss.pt")
        torch.save(rng_states, tmp / "rng.pt")
        if scaler is not None:
            torch.save(scaler.state_dict(), tmp / SCALER_FILE)
        if streams is not None:
            (tmp / STREAMS_FILE).write_text(json.dumps(streams))
        (tmp / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False))
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))  # written last: marks completeness
    return folder


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary `.tmp-*` folders of interrupted writes are skipped)."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / STATE_FILE).exists()]
    return [p for _, p in sorted(found)]


def load_checkpoint(folder: Path, model, optimizer, scheduler, loss_module, scaler=None) -> tuple[dict, list]:
    """Restore weights and optimizer, scheduler, loss and scaler states in place; return (trainer state, RNG states).

    Everything is read onto the CPU first (a checkpoint written on any GPU loads on any machine); each state
    then moves to the device of what it belongs to (the optimizer's to its parameters', the rest by copy).
    """
    if has_lora(model.encoder):
        load_adapter_weights(model.encoder, folder / "model")
    else:
        model.encoder.load_state_dict(load_file(folder / "model" / "model.safetensors", device="cpu"))
    model.head.load_state_dict(read_head(folder / "model").state_dict())
    optimizer.load_state_dict(_load(folder / "optimizer.pt"))
    scheduler.load_state_dict(_load(folder / "scheduler.pt"))
    loss_module.load_state_dict(_load(folder / "loss.pt"))
    if scaler is not None and (folder / SCALER_FILE).exists():
        scaler.load_state_dict(_load(folder / SCALER_FILE))
    rng_states = _load(folder / "rng.pt")
    return json.loads((folder / STATE_FILE).read_text()), rng_states


def checkpoint_config(folder: Path) -> dict | None:
    """The resolved config a checkpoint was trained with (None for checkpoints written before it was kept)."""
    path = folder / CONFIG_FILE
    return yaml.safe_load(path.read_text()) if path.exists() else None


def checkpoint_streams(folder: Path) -> list[dict]:
    """Each process's stream position at the checkpoint (streamed runs)."""
    return json.loads((folder / STREAMS_FILE).read_text())


def checkpoint_processes(folder: Path) -> int:
    """How many processes trained the checkpoint (it holds one RNG state per process)."""
    return len(_load(folder / "rng.pt"))


def _load(path: Path):
    return torch.load(path, map_location="cpu", weights_only=True)


def prune_checkpoints(output_dir: str | Path, keep_last: int, keep: Path | None = None) -> None:
    """Delete all but the newest `keep_last` complete checkpoints, and never `keep` (the best one); nothing
    reached through a symbolic link is deleted (`models.atomic.remove_tree`)."""
    complete = complete_checkpoints(output_dir)
    doomed = [f for f in (complete[:-keep_last] if keep_last > 0 else complete)
              if keep is None or f.resolve() != Path(keep).resolve()]
    for folder in doomed + sorted(checkpoints_dir(output_dir).glob(".tmp-*")):
        if not remove_tree(folder, output_dir):
            log.warning("%s is reached through a symbolic link; it is not deleted", folder)
