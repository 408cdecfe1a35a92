"""Continuing a run: the run folder's rules, the newest intact checkpoint, and recipe changes that break exactness."""
import logging
from pathlib import Path

from accelerate.utils import broadcast_object_list

from twinfold.models.files.atomic import OverwriteRefused, check_output_folder, check_replaceable, verify_manifest
from twinfold.train.checkpoint import checkpoint_config, checkpoint_processes, complete_checkpoints
from twinfold.train.config import Config, ConfigError
from twinfold.train.lock import LOCK_FILE, RunLock

log = logging.getLogger("twinfold")

# everything a run writes into train.output_dir (train.loop); anything else there belongs to someone else
RUN_ENTRIES = {"config.yaml", "metrics.jsonl", "checkpoints", "final", "eval", "mined", "wandb", LOCK_FILE}
OTHERS_WRITE = frozenset({"wandb"})  # filled by wandb (which links its latest run); only the folder itself is checked
# keys (or key prefixes) whose changes leave a resumed run exact; any other change breaks exactness
HARMLESS = ("eval.", "log.", "train.output_dir", "train.resume", "train.save_steps", "train.save_total_limit",
            "train.eval_steps", "train.log_steps", "model.allow_pickle", "model.trust_remote_code", "data.cache_dir")
GROWING = ("train.max_steps", "train.epochs")  # harmless when they grow: the run goes on longer


def claim_run_folder(out: Path, resume: bool) -> RunLock:
    """Lock the run folder for this run, refusing one that holds other files or a symbolic link where the run
    writes, is in use, or holds a previous run that a new (not resumed) run would mix with."""
    try:
        check_output_folder(out, RUN_ENTRIES, "choose a new or empty train.output_dir (it holds a run's files only)",
                            unscanned=OTHERS_WRITE)
        check_replaceable(out / "final", remedy="Move it away or choose another train.output_dir")
    except OverwriteRefused as e:
        raise ConfigError(f"train.output_dir: {e}") from None
    lock = RunLock(out).acquire()
    if not resume and (found := complete_checkpoints(out)):
        lock.release()
        raise ConfigError(f"train.output_dir: {out} already holds a run (checkpoints up to {found[-1].name}); "
                          "continue it with train.resume=true or choose another train.output_dir")
    return lock


def newest_intact_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint whose files match their checksums; each damaged one is reported in one line."""
    found = complete_checkpoints(out)
    damaged = []
    for folder in reversed(found):
        problem = verify_manifest(folder)
        if problem is None:
            return folder
        log.warning("checkpoint %s is damaged (%s); it is not used", folder, problem)
        damaged.append(f"{folder.name}: {problem}")
    if damaged:
        raise ConfigError(f"train.resume: every checkpoint in {out / 'checkpoints'} is damaged ({'; '.join(damaged)}); "
                          "nothing to resume from: start a new run in another train.output_dir")
    return None


def recipe_changes(old: dict, new: dict, old_processes: int, new_processes: int) -> tuple[list[str], list[str]]:
    """(changes that break exact resumption, harmless ones), each as `key: old -> new`. A key `old` lacks (a recipe
    saved before the key existed) counts as its default."""
    before, after, defaults = _flatten(old), _flatten(new), _flatten(Config().to_dict())
    breaking, harmless = [], []
    for key in sorted(before.keys() | after.keys()):
        a, b = before.get(key, defaults.get(key)), after.get(key)
        if a == b or key == "train.resume":  # the instruction to resume, not part of the recipe
            continue
        grows = key in GROWING and isinstance(a, int) and isinstance(b, int) and b > a
        (harmless if grows or key.startswith(HARMLESS) else breaking).append(f"{key}: {a!r} -> {b!r}")
    if old_processes != new_processes:
        breaking.append(f"processes: {old_processes} -> {new_processes}")
    return breaking, harmless


def resume_point(out: Path, config: dict, processes: int) -> tuple[Path | None, list[str]]:
    """The checkpoint to resume from (None: start anew) and the harmless recipe changes since it was written.

    Raises ConfigError naming the changes that would make the resumed run neither the old one nor a new one.
    """
    folder = newest_intact_checkpoint(out)
    if folder is None:
        return None, []
    old = checkpoint_config(folder)
    if old is None:
        log.warning("checkpoint %s does not record its config (written by an older twinfold); the recipe "
                    "is not compared", folder)
        return folder, []
    breaking, harmless = recipe_changes(old, config, checkpoint_processes(folder), processes)
    if breaking:
        raise ConfigError(f"train.resume: {folder} was trained with another recipe; these changes break exact "
                          f"resumption: {', '.join(breaking)}. Undo them, or start a new run in another "
                          "train.output_dir")
    return folder, harmless


def decided_on_main(accelerator, decide):
    """Run `decide()` on the main process only and return its result (or raise its ConfigError) on every process."""
    result = None
    if accelerator.is_main_process:
        try:
            result = ("ok", decide())
        except ConfigError as e:
            result = ("error", str(e))
    if accelerator.num_processes > 1:
        result = broadcast_object_list([result])[0]
    if result[0] == "error":
        raise ConfigError(result[1])
    return result[1]


def _flatten(config: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
