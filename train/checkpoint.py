"""Checkpoints: an atomic folder per step holding all a run needs to continue exactly."""
import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from models.atomic import atomic_directory
from models.export import write_model_folder
from models.head import read_head

STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def save_checkpoint(output_dir: str | Path, step: int, model, optimizer, scheduler, loss_module,
                    rng_states: list, state: dict) -> Path:
    """Write `checkpoints/step-N/` atomically: a crash mid-write leaves no folder that looks complete."""
    folder = checkpoints_dir(output_dir) / f"step-{step}"
    with atomic_directory(folder) as tmp:
        (tmp / "model").mkdir()
        write_model_folder(model, tmp / "model")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(loss_module.state_dict(), tmp / "loss.pt")
        torch.save(rng_states, tmp / "rng.pt")
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))  # written last: marks completeness
    return folder


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary `.tmp-*` folders of interrupted writes are skipped)."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / STATE_FILE).exists()]
    return [p for _, p in sorted(found)]


def load_checkpoint(folder: Path, model, optimizer, scheduler, loss_module) -> tuple[dict, list]:
    """Restore weights and optimizer, scheduler and loss states in place; return (trainer state, RNG states)."""
    model.encoder.load_state_dict(load_file(folder / "model" / "model.safetensors"))
    model.head.load_state_dict(read_head(folder / "model").state_dict())
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
    loss_module.load_state_dict(torch.load(folder / "loss.pt", weights_only=True))
    rng_states = torch.load(folder / "rng.pt", weights_only=True)
    return json.loads((folder / STATE_FILE).read_text()), rng_states


def prune_checkpoints(output_dir: str | Path, keep_last: int, keep: Path | None = None) -> None:
    """Delete all but the newest `keep_last` complete checkpoints, and never `keep` (the best one)."""
    complete = complete_checkpoints(output_dir)
    for folder in complete[:-keep_last] if keep_last > 0 else complete:
        if keep is None or folder.resolve() != Path(keep).resolve():
            shutil.rmtree(folder, ignore_errors=True)
    for tmp in checkpoints_dir(output_dir).glob(".tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)
