"""Before training: mine hard negatives with the base model, load the pairs, check them for eval overlap and
duplicates (train.leakage), and drop what `data.drop_eval_overlap` / `data.dedup` ask for. Streamed datasets
(`streaming: true`) are not read here: they are read, checked and tokenized as training goes (train.streams).

The main process does the work; the others receive the mined file paths and the rows to keep.
"""
import json
import logging
from pathlib import Path

from accelerate.utils import broadcast_object_list

from twinfold.models import BiEncoder
from twinfold.train.config import Config
from twinfold.train.data.leakage import check_datasets, summary_lines
from twinfold.train.data.pairs import PairDataset, cache_root, dataset_name, load_pairs
from twinfold.train.data.streams import StreamSource
from twinfold.train.eval.beir import load_beir
from twinfold.train.mine import MemoEncoder, mine_dataset, provenance_path

log = logging.getLogger("twinfold")


def prepare_data(cfg: Config, model: BiEncoder, out: Path,
                 accelerator) -> tuple[list[PairDataset | StreamSource], dict]:
    """The training datasets (streamed ones unread), and what was done to them: {"hard_negatives": [provenance...],
    "leakage": [...]}."""
    configs, keep, report = list(cfg.data.train), None, {}
    scores_for = None if cfg.loss.kind == "infonce" else cfg.loss.kind  # distillation reads the teacher's scores
    if accelerator.is_main_process:
        encoder = MemoEncoder(model.to(accelerator.device), cfg.eval.batch_size)
        configs = [mine_dataset(d, encoder, Path(d.hard_negatives.cache_dir or out / "mined"), cfg.model.name_or_path,
                                f"data.train[{i}]") if d.hard_negatives else d for i, d in enumerate(configs)]
        datasets = [load_pairs(d, scores_for) for d in configs if not d.streaming]
        for d in configs:
            if d.streaming:
                log.info("%s: streamed: the eval-overlap and duplicate checks are not run on it", dataset_name(d))
        e = cfg.eval
        eval_data = load_beir(e.data, e.split, ignore_identical_ids=e.ignore_identical_ids) if e.data else None
        keep, checks = check_datasets(datasets, encoder, eval_data, cfg.data.dedup, cfg.data.drop_eval_overlap,
                                      cfg.data.near_check_rows, cache_root(cfg.data.cache_dir) / "checks")
        for line in summary_lines(checks):
            log.info("%s", line)
        mined = [json.loads(provenance_path(c.path).read_text()) for c, d in zip(configs, cfg.data.train)
                 if d.hard_negatives]
        report = {"hard_negatives": mined, "leakage": checks}
    if accelerator.num_processes > 1:
        configs, keep, report = broadcast_object_list([configs, keep, report])
        if not accelerator.is_main_process:
            datasets = [load_pairs(d, scores_for) for d in configs if not d.streaming]
    kept = iter([_rows(ds, rows) for ds, rows in zip(datasets, keep)])
    return [StreamSource.streamed(d) if d.streaming else next(kept) for d in configs], report


def _rows(ds: PairDataset, rows: list[int]) -> PairDataset:
    return ds if len(rows) == len(ds) else ds.select(rows)
