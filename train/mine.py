"""Hard-negative mining: for each (anchor, positive) row, documents that a model ranks high for the anchor but
that are not relevant to it, written as an ordinary pair file with `negative` columns.

    python -m twinfold.train.mine --model M --data PAIRS --out TRIPLETS.jsonl [--corpus BEIR_DIR|DOCS.jsonl]
        [--columns question=anchor,answer=positive] [--num-negatives 1] [--range-min 0] [--range-max 50]
        [--max-score-ratio 0.95] [--candidates dense|bm25] [--sampling top|random] [--seed 42]
        [--teacher CROSS_OR_BI_ENCODER [--teacher-margin 0] [--teacher-kind auto|cross-encoder|bi-encoder]]

Never mined for an anchor: any positive of a row with the same anchor, the anchor itself, and, with a BEIR
`--corpus`, every document judged relevant (grade > 0, any split) for a query whose text is the anchor (texts
compared after whitespace/case normalisation). Ranks count the remaining documents only. The guard drops
candidates whose cosine with the anchor exceeds `max_score_ratio` x the row's positive's. With `--teacher` (a
cross-encoder or bi-encoder, found as `twinfold score` finds it), a second guard then drops candidates the teacher
scores above the row's positive's teacher score minus `--teacher-margin`; it scores every candidate left in the
rank range (with a cross-encoder, one forward per pair: keep `--range-max` small). Rows with fewer
eligible candidates than `num_negatives` are dropped. The output has `anchor`, `positive` and `negative`
(`negative_1..k` for k > 1) and sits beside `OUT.provenance.json` (model fingerprint, settings, inputs, counts,
the file's SHA-256). An existing OUT is replaced only if it is such a mined file, unchanged (`--overwrite` replaces
anything else); OUT is never the `--data` file.
"""
import argparse
import dataclasses
import hashlib
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from twinfold.models import BiEncoder, ModelLoadError
from twinfold.models.encode import non_positive_option
from twinfold.models.files.atomic import OverwriteRefused, atomic_write_bytes, check_writable, file_sha256
from twinfold.train.config import ConfigError, DatasetConfig, HardNegativesConfig
from twinfold.train.data.pairs import DataError, PairDataset, load_pairs
from twinfold.train.eval.beir import BeirFormatError, load_beir, load_corpus
from twinfold.train.eval.bm25 import BM25Index

log = logging.getLogger("twinfold")
CACHE_NEUTRAL = ("cache_dir",)  # settings that do not change the mined file
TEACHER_SETTINGS = ("teacher", "teacher_margin")  # recorded (and part of the cache key) only with a teacher
TeacherScores = Callable[[list[str], list[str]], torch.Tensor]  # the teacher's score of each (anchor, text) pair


def normalize_text(text: str) -> str:
    """Lowercase with runs of whitespace as one space: the key under which two texts are "equal"."""
    return " ".join(text.lower().split())


class MemoEncoder:
    """`model.encode` remembering each (kind, prompt, text)'s embedding, so that one run encodes a text once
    (`prompt`: a text in place of the kind's prefix, None: the prefix)."""

    def __init__(self, model: BiEncoder, batch_size: int = 64, show_progress_bar: bool = False):
        self.model, self.batch_size, self.show_progress_bar = model, batch_size, show_progress_bar
        self._memo: dict[tuple[str, str | None, str], torch.Tensor] = {}

    def remember(self, texts: list[str], kind: str, embeddings: torch.Tensor, prompt: str | None = None) -> None:
        """Use `embeddings` (computed elsewhere, e.g. a stored index) for `texts` instead of encoding them."""
        self._memo.update({(kind, prompt, t): e for t, e in zip(texts, torch.as_tensor(embeddings))})

    def __call__(self, texts: list[str], kind: str, prompt: str | None = None) -> torch.Tensor:
        missing = list(dict.fromkeys(t for t in texts if (kind, prompt, t) not in self._memo))
        if missing:
            emb = self.model.encode(missing, self.batch_size, kind=kind, prompt=prompt, convert_to_tensor=True,
                                    show_progress_bar=self.show_progress_bar)
            self.remember(missing, kind, emb, prompt)
        return torch.stack([self._memo[(kind, prompt, t)] for t in texts]) if texts \
            else torch.empty(0, self.model.dim)


@dataclasses.dataclass
class MinedPairs:
    """The mined rows (`source_rows[j]` is the input row of row j), their scores and the counts for provenance."""

    anchor: list[str]
    positive: list[str]
    negatives: list[list[str]]
    source_rows: list[int]
    positive_scores: list[float]
    negative_scores: list[list[float]]
    counts: dict


def judged_relevant(folder: str | Path) -> dict[str, set[str]]:
    """Normalised query text -> normalised texts of the documents judged relevant to it in any split of a BEIR
    folder."""
    folder = Path(folder)
    relevant: dict[str, set[str]] = {}
    for qrels in sorted((folder / "qrels").glob("*.tsv")):
        data = load_beir(folder, qrels.stem)
        text_of = dict(zip(data.corpus_ids, data.corpus_texts))
        for qid, query in zip(data.query_ids, data.query_texts):
            relevant.setdefault(normalize_text(query), set()).update(
                normalize_text(text_of[d]) for d, grade in data.qrels[qid].items() if grade > 0)
    return relevant


def mine(pairs: PairDataset, settings: HardNegativesConfig, encoder: MemoEncoder,
         corpus: list[str] | None = None, judged: dict[str, set[str]] | None = None,
         query_prompt: str | None = None, teacher: TeacherScores | None = None) -> MinedPairs:
    """Hard negatives for every row of `pairs` from `corpus` (default: the positives), as the module says; anchors
    are encoded with `query_prompt` in place of the model's query prefix when given. `teacher(anchors, texts)`
    (the teacher's score of each pair): candidates it scores above the row's positive's score minus
    `settings.teacher_margin` are dropped, after the model's guard."""
    judged = judged or {}
    first: dict[str, str] = {}
    for text in corpus or pairs.positive:
        first.setdefault(normalize_text(text), text)
    documents = list(first.values())
    position = {normalize_text(t): i for i, t in enumerate(documents)}
    relevant: dict[str, set[str]] = {}
    for a, p in zip(pairs.anchor, pairs.positive):
        relevant.setdefault(normalize_text(a), {normalize_text(a)}).add(normalize_text(p))
    for key, texts in relevant.items():
        texts.update(judged.get(key, ()))
    anchors = list(dict.fromkeys(pairs.anchor))
    anchor_row = {a: i for i, a in enumerate(anchors)}
    excluded = [sorted(position[t] for t in relevant[normalize_text(a)] if t in position) for a in anchors]
    doc_emb, anchor_emb = encoder(documents, "document"), encoder(anchors, "query", query_prompt)
    positive_emb = encoder(pairs.positive, "document")
    ranked = _ranked_candidates(anchors, documents, anchor_emb, doc_emb, excluded, settings)

    rng = np.random.default_rng(settings.seed)
    counts = {"rows_in": len(pairs), "too_few_candidates": 0, "guard_dropped": 0,
              "relevant_excluded": sum(map(len, excluded)), "documents": len(documents)}
    out = MinedPairs([], [], [], [], [], [], counts)
    positive_scores, eligible = [], []
    for row, (a, p) in enumerate(zip(pairs.anchor, pairs.positive)):
        k = anchor_row[a]
        positive_scores.append(float(anchor_emb[k] @ positive_emb[row]))
        candidates = ranked[k]
        if settings.max_score_ratio is not None:
            limit = settings.max_score_ratio * positive_scores[-1]
            kept = [(i, s) for i, s in candidates if s <= limit]
            out.counts["guard_dropped"] += len(candidates) - len(kept)
            candidates = kept
        eligible.append(candidates)
    if teacher is not None:
        kept = _teacher_guard(teacher, pairs, documents, eligible, settings.teacher_margin)
        out.counts["teacher_dropped"] = sum(map(len, eligible)) - sum(map(len, kept))
        eligible = kept
    for row, (a, p) in enumerate(zip(pairs.anchor, pairs.positive)):
        candidates, positive_score = eligible[row], positive_scores[row]
        if len(candidates) < settings.num_negatives:
            out.counts["too_few_candidates"] += 1
            continue
        if settings.sampling == "random":
            chosen = sorted(rng.choice(len(candidates), settings.num_negatives, replace=False).tolist())
            candidates = [candidates[i] for i in chosen]
        chosen = candidates[:settings.num_negatives]
        out.anchor.append(a)
        out.positive.append(p)
        out.negatives.append([documents[i] for i, _ in chosen])
        out.source_rows.append(row)
        out.positive_scores.append(positive_score)
        out.negative_scores.append([s for _, s in chosen])
    out.counts["rows_out"] = len(out.anchor)
    return out


def _teacher_guard(teacher: TeacherScores, pairs: PairDataset, documents: list[str],
                   eligible: list[list[tuple[int, float]]], margin: float) -> list[list[tuple[int, float]]]:
    """Each row's candidates less those the teacher scores above its positive's score minus `margin` (every pair
    scored in one call: a bi-encoder teacher encodes each text once)."""
    anchors = [a for a, candidates in zip(pairs.anchor, eligible) for _ in range(1 + len(candidates))]
    texts = [t for p, candidates in zip(pairs.positive, eligible) for t in (p, *(documents[i] for i, _ in candidates))]
    scores = teacher(anchors, texts).tolist() if texts else []
    kept, at = [], 0
    for candidates in eligible:
        positive, own = scores[at], scores[at + 1:at + 1 + len(candidates)]
        kept.append([c for c, s in zip(candidates, own) if s < positive - margin])
        at += 1 + len(candidates)
    return kept


def load_teacher_scores(name_or_path: str, batch_size: int = 32, kind: str = "auto") -> tuple[TeacherScores, str]:
    """`teacher(anchors, texts)` of a cross-encoder or bi-encoder (`kind`, or found as `twinfold score` finds it),
    and its fingerprint."""
    from twinfold.train.score import load_teacher, pair_scores, teacher_kind  # score.py imports this module

    model = load_teacher(name_or_path, teacher_kind(name_or_path, kind))
    return (lambda anchors, texts: pair_scores(model, anchors, texts, batch_size)), model.fingerprint()


def _ranked_candidates(anchors, documents, anchor_emb, doc_emb, excluded, settings) -> list[list[tuple[int, float]]]:
    """Per anchor: (document index, model score) of the candidates ranked range_min..range_max-1, best first."""
    deepest = settings.range_max + max(map(len, excluded), default=0)
    if settings.candidates == "bm25":
        indices, scores = BM25Index(documents).search(anchors, deepest)
        # documents sharing no term with the anchor (NaN) are no BM25 candidates
        order = [[i for i, s in zip(row, row_scores) if not np.isnan(s)]
                 for row, row_scores in zip(indices.tolist(), scores.tolist())]
    else:
        order = []
        for start in range(0, len(anchors), 256):
            scores = anchor_emb[start:start + 256] @ doc_emb.T
            order += scores.topk(min(deepest, len(documents)), dim=1).indices.tolist()
    ranked = []
    for k, row in enumerate(order):
        skip = set(excluded[k])
        kept = [i for i in row if i not in skip][settings.range_min:settings.range_max]
        scores = (anchor_emb[k] @ doc_emb[kept].T).tolist() if kept else []
        ranked.append(list(zip(kept, scores)))
    return ranked


def write_mined(path: str | Path, mined: MinedPairs, provenance: dict) -> dict[str, str]:
    """Write the pair file and `PATH.provenance.json`; return the file's columns -> roles."""
    path = Path(path)
    k = len(mined.negatives[0]) if mined.negatives else 1
    names = ["negative"] if k == 1 else [f"negative_{j + 1}" for j in range(k)]
    lines = [json.dumps({"anchor": a, "positive": p, **dict(zip(names, n))}, ensure_ascii=False)
             for a, p, n in zip(mined.anchor, mined.positive, mined.negatives)]
    data = "".join(line + "\n" for line in lines).encode()
    atomic_write_bytes(path, data)
    provenance = {**provenance, **mined.counts, "sha256": hashlib.sha256(data).hexdigest(),
                  "mean_positive_score": float(np.mean(mined.positive_scores)) if mined.positive_scores else None,
                  "mean_negative_score": float(np.mean(mined.negative_scores)) if mined.negative_scores else None,
                  "columns": {"anchor": "anchor", "positive": "positive", **{n: "negative" for n in names}}}
    atomic_write_bytes(provenance_path(path), (json.dumps(provenance, indent=2) + "\n").encode())
    return provenance["columns"]


def provenance_path(path: str | Path) -> Path:
    return Path(f"{path}.provenance.json")


def check_pair_output(out: Path, source: str | Path, overwrite: bool, source_option: str = "--data") -> None:
    """Raise `OverwriteRefused` if `out` is the `source` file (always), or if it or its provenance file exists and
    `out` is not a pair file twinfold wrote (mined, or made from a corpus), unchanged since (its provenance's
    SHA-256), unless `overwrite`."""
    out = Path(out)
    if out.exists() and Path(source).exists() and os.path.samefile(out, source):
        raise OverwriteRefused(f"--out: {out} is the {source_option} file; a pair file never replaces its input. "
                               "Choose another --out")
    provenance = provenance_path(out)
    if overwrite or not (out.exists() or out.is_symlink() or provenance.exists() or provenance.is_symlink()):
        return
    try:
        ours = json.loads(provenance.read_text())["sha256"] == file_sha256(out)
    except (OSError, ValueError, KeyError, TypeError):
        ours = False
    if not ours:
        raise OverwriteRefused(f"--out: {out} (or {provenance.name}) exists and is not a pair file twinfold wrote; "
                               "nothing was changed. Choose another path or pass --overwrite to replace it")


def mining_inputs(ds: DatasetConfig) -> tuple[PairDataset, list[str] | None, dict[str, set[str]]]:
    """The pairs of `ds`, the corpus of `ds.hard_negatives` (None: the positives) and its judgments."""
    corpus = ds.hard_negatives.corpus
    judged = judged_relevant(corpus) if corpus and Path(corpus).is_dir() else {}
    return load_pairs(ds), list(load_corpus(corpus).values()) if corpus else None, judged


def provenance_of(ds: DatasetConfig, model_name: str, fingerprint: str, query_prompt: str | None = None,
                  teacher_fingerprint: str | None = None) -> dict:
    """What the provenance file records besides the counts (`query_prompt`: the anchors' prompt, and the teacher's
    fingerprint, when given)."""
    h = ds.hard_negatives
    prompt = {"query_prompt": query_prompt} if query_prompt is not None else {}
    teacher = {"teacher_fingerprint": teacher_fingerprint} if teacher_fingerprint is not None else {}
    return {"model": model_name, "fingerprint": fingerprint, **teacher,
            "settings": {**{k: v for k, v in dataclasses.asdict(h).items() if k not in CACHE_NEUTRAL
                            and not (h.teacher is None and k in TEACHER_SETTINGS)}, **prompt},
            "data": ds.path, "corpus": h.corpus or "the positives of the data"}


def mine_dataset(ds: DatasetConfig, encoder: MemoEncoder, out_dir: Path, model_name: str,
                 key_name: str = "data.train[i]") -> DatasetConfig:
    """Mine `ds` (cached in `out_dir` by a hash of the model, the data, the corpus and the settings); return the
    config of the mined pair file, which `train.data.load_pairs` reads like any other.

    `ds.name` names the mined file, so it must be a plain file name (`key_name`: its config key, for the error).
    """
    if ds.name is not None and (not ds.name.strip() or ds.name in (".", "..") or
                                any(sep in ds.name for sep in ("/", "\\", os.sep))):
        raise ConfigError(f"{key_name}.name: {ds.name!r} names the mined pair file in {out_dir}; use a plain name "
                          "(no path separators, not '.' or '..')")
    h = ds.hard_negatives
    pairs, corpus, judged = mining_inputs(ds)
    query_prompt = encoder.model.prompt_text(ds.query_prompt_name, ds.query_prompt)
    teacher, teacher_fingerprint = load_teacher_scores(h.teacher, encoder.batch_size) if h.teacher else (None, None)
    provenance = provenance_of(ds, model_name, encoder.model.fingerprint(), query_prompt, teacher_fingerprint)
    key = _digest({"model": provenance["fingerprint"], "settings": provenance["settings"],
                   **({"teacher": teacher_fingerprint} if teacher else {}),
                   "rows": [pairs.anchor, pairs.positive], "corpus": corpus,
                   "judged": sorted((q, sorted(d)) for q, d in judged.items())})
    path = out_dir / f"{pairs.name}.{key[:16]}.jsonl"
    if path.exists() and provenance_path(path).exists():
        provenance = json.loads(provenance_path(path).read_text())
        log.info("%s: hard negatives from cache %s (%d of %d rows)", pairs.name, path, provenance["rows_out"],
                 provenance["rows_in"])
    else:
        mined = mine(pairs, h, encoder, corpus, judged, query_prompt, teacher)
        if not mined.anchor:
            raise DataError(f"{ds.path}: hard-negative mining left no row ({mined.counts}); widen "
                            "hard_negatives.range_max, raise max_score_ratio or give a larger corpus")
        write_mined(path, mined, {**provenance, "key": key})
        provenance = json.loads(provenance_path(path).read_text())
        log.info("%s: mined %d hard negative(s) for %d of %d rows into %s (guard dropped %d candidates, %d rows "
                 "had too few)", pairs.name, h.num_negatives, mined.counts["rows_out"], len(pairs), path,
                 mined.counts["guard_dropped"], mined.counts["too_few_candidates"])
    return dataclasses.replace(ds, path=str(path), columns=provenance["columns"], name=pairs.name, hard_negatives=None)


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _columns(text: str) -> dict[str, str]:
    pairs = [item.split("=", 1) for item in text.split(",") if item.strip()]
    if not pairs or any(len(p) != 2 for p in pairs):
        raise argparse.ArgumentTypeError(f"expected source=role pairs, e.g. question=anchor,answer=positive; "
                                         f"got {text!r}")
    return {k.strip(): v.strip() for k, v in pairs}


def main(argv: list[str] | None = None, prog: str = "python -m twinfold.train.mine") -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    from twinfold.train.score import KINDS as TEACHER_KINDS  # score.py imports this module
    p.add_argument("--model", required=True, help="model folder or name (the base model of the training run)")
    p.add_argument("--data", required=True, help="pair file (.jsonl/.json/.csv/.tsv/.parquet) or hub id")
    p.add_argument("--out", required=True, type=Path, help="the mined pair file (JSONL)")
    p.add_argument("--corpus", help="BEIR folder or JSONL of documents (default: the positives of the data)")
    p.add_argument("--columns", type=_columns, default={}, help="source=role,..., e.g. question=anchor,answer=positive")
    p.add_argument("--split", default="train", help="split of a hub dataset")
    defaults = HardNegativesConfig()
    for name in ("num_negatives", "range_min", "range_max", "max_score_ratio", "seed"):
        kind = float if name == "max_score_ratio" else int
        p.add_argument(f"--{name.replace('_', '-')}", type=kind, default=getattr(defaults, name))
    p.add_argument("--no-guard", action="store_true", help="keep candidates whatever their score")
    p.add_argument("--teacher", help="cross-encoder or bi-encoder: drop candidates it scores near the positive")
    p.add_argument("--teacher-margin", type=float, default=defaults.teacher_margin,
                   help="drop candidates the teacher scores above the positive's score minus this")
    p.add_argument("--teacher-kind", choices=TEACHER_KINDS, default="auto")
    p.add_argument("--batch-size", type=int, default=64, help="encoding batch")
    p.add_argument("--candidates", choices=("dense", "bm25"), default=defaults.candidates)
    p.add_argument("--sampling", choices=("top", "random"), default=defaults.sampling)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--overwrite", action="store_true", help="replace --out even if twinfold did not mine it")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from twinfold.train.config import check_hard_negatives

    settings = HardNegativesConfig(args.num_negatives, args.range_min, args.range_max,
                                   None if args.no_guard else args.max_score_ratio, args.candidates, args.sampling,
                                   args.corpus, args.seed, teacher=args.teacher, teacher_margin=args.teacher_margin)
    ds = DatasetConfig(path=args.data, columns=args.columns, split=args.split, hard_negatives=settings)
    if problem := non_positive_option({"--batch-size": args.batch_size}):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        check_hard_negatives(ds, "options")
        check_pair_output(args.out, args.data, args.overwrite)
        check_writable(args.out, "--out")
        model = BiEncoder.from_pretrained(args.model)
        encoder = MemoEncoder(model, args.batch_size, show_progress_bar=not args.no_progress)
        pairs, corpus, judged = mining_inputs(ds)
        teacher, teacher_fingerprint = load_teacher_scores(args.teacher, args.batch_size, args.teacher_kind) \
            if args.teacher else (None, None)
        mined = mine(pairs, settings, encoder, corpus, judged, teacher=teacher)
    except (ConfigError, DataError, BeirFormatError, ModelLoadError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not mined.anchor:
        print(f"error: no row kept ({mined.counts}); widen --range-max, raise --max-score-ratio or give --corpus",
              file=sys.stderr)
        return 2
    write_mined(args.out, mined, provenance_of(ds, args.model, model.fingerprint(),
                                               teacher_fingerprint=teacher_fingerprint))
    c = mined.counts
    print(f"wrote {c['rows_out']} of {c['rows_in']} rows with {settings.num_negatives} negative(s) to {args.out} "
          f"({c['documents']} documents; guard dropped {c['guard_dropped']} candidates; "
          + (f"teacher dropped {c['teacher_dropped']}; " if "teacher_dropped" in c else "") +
          f"{c['too_few_candidates']} rows had too few)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
