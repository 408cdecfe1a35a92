"""Training data checked against the eval set and against itself, before training.

Eval overlap: a row whose anchor or positive equals (after whitespace/case normalisation, "exact") or nearly
equals (cosine >= `NEAR` with the base model, "near") an eval query or a judged document of the eval split.
Duplicates: a row whose (anchor, positive) equals an earlier row's ("exact"), or whose anchor and positive both
have cosine >= `NEAR` with an earlier row's ("near"). Each is counted with examples; `data.drop_eval_overlap`
and `data.dedup` drop the rows (duplicates keep their first row). Comparing rows is quadratic in the rows of a
dataset, done in chunks. The findings are cached by the data's content, the eval texts and (for near checks)
the model, so a run over the same data reads them instead.
"""
import hashlib
import json
import logging
import os
from pathlib import Path

import torch

from twinfold.train.data.pairs import PairDataset
from twinfold.train.eval.beir import BeirData
from twinfold.train.mine import MemoEncoder, normalize_text

log = logging.getLogger("twinfold")
NEAR = 0.95
EXAMPLES = 5
CHUNK = 1024
_CACHE_FORMAT = 1


def check_datasets(datasets: list[PairDataset], encoder: MemoEncoder, eval_data: BeirData | None,
                   dedup: bool = False, drop_eval_overlap: bool = False, near_rows: int | None = None,
                   cache_dir: Path | None = None) -> tuple[list[list[int]], list[dict]]:
    """Rows to keep in each dataset, and a report per dataset (counts, examples, rows dropped).

    Exact matches are always checked (hashes of normalised texts); near ones (cosine with the base model, which
    encodes every training text) only in datasets of at most `near_rows` rows (None: all), and the report says so.
    With `cache_dir`, each dataset's findings are read from there when they were found before.
    """
    eval_texts = _eval_texts(eval_data) if eval_data is not None else []
    keep, reports = [], []
    for ds in datasets:
        near = near_rows is None or len(ds) <= near_rows
        if not near:
            log.info("%s: %d rows, more than data.near_check_rows (%d): near-duplicate and near-overlap checks "
                     "skipped, exact ones done", ds.name, len(ds), near_rows)
        overlap, duplicates = _findings(ds, encoder, eval_texts, near, cache_dir)
        drop = set(overlap) if drop_eval_overlap else set()
        drop |= set(duplicates) if dedup else set()
        keep.append([i for i in range(len(ds)) if i not in drop])
        reports.append({"dataset": ds.name, "rows": len(ds), "eval_overlap": _summary(overlap),
                        "duplicates": _summary(duplicates), "dropped": len(drop), "near_checked": near})
    return keep, reports


def _findings(ds: PairDataset, encoder: MemoEncoder, eval_texts: list[tuple[str, str, str]], near: bool,
              cache_dir: Path | None) -> tuple[dict[int, dict], dict[int, dict]]:
    """(eval overlap, duplicates) of a dataset, from `cache_dir` when the same data, eval texts and (with `near`)
    model were checked before."""
    key = json.dumps([_CACHE_FORMAT, ds.fingerprint, len(ds), eval_texts, NEAR, near and encoder.model.fingerprint()])
    path = cache_dir / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json" if cache_dir else None
    if path is not None and path.exists():
        log.info("%s: eval-overlap and duplicate checks read from %s", ds.name, path)
        return tuple(_from_json(found) for found in json.loads(path.read_text()))
    found = (eval_overlap(ds, encoder, eval_texts, near) if eval_texts else {}), duplicate_rows(ds, encoder, near)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
        tmp.write_text(json.dumps(found))
        tmp.replace(path)
    return found


def _from_json(found: dict) -> dict[int, dict]:
    """Findings as the checks give them (JSON keeps rows as text and (kind, id) pairs as lists)."""
    return {int(row): {k: tuple(v) if isinstance(v, list) else v for k, v in hit.items()} for row, hit in found.items()}


def eval_overlap(ds: PairDataset, encoder: MemoEncoder, eval_texts: list[tuple[str, str, str]],
                 near: bool = True) -> dict[int, dict]:
    """Row -> its strongest match among `eval_texts` (kind, id, text) for rows whose anchor or positive matches
    (exactly after normalisation, or with `near` at cosine >= NEAR)."""
    exact = {normalize_text(text): (kind, eid) for kind, eid, text in eval_texts}
    eval_emb = torch.cat([encoder([t for k, _, t in eval_texts if k == "query"], "query"),
                          encoder([t for k, _, t in eval_texts if k == "document"], "document")]) if near else None
    ordered = [e for e in eval_texts if e[0] == "query"] + [e for e in eval_texts if e[0] == "document"]
    found: dict[int, dict] = {}
    for role, texts, kind in (("anchor", ds.anchor, "query"), ("positive", ds.positive, "document")):
        unique = list(dict.fromkeys(texts))
        best_score, best = torch.full((len(unique),), -2.0), torch.zeros(len(unique), dtype=torch.long)
        for start in range(0, len(unique), CHUNK) if near else ():
            scores = encoder(unique[start:start + CHUNK], kind) @ eval_emb.T
            best_score[start:start + CHUNK], best[start:start + CHUNK] = scores.max(dim=1)
        match = {t: (float(s), int(b)) for t, s, b in zip(unique, best_score.tolist(), best.tolist())}
        for row, text in enumerate(texts):
            score, b = match[text]
            if normalize_text(text) in exact:
                hit = {"kind": "exact", "eval": exact[normalize_text(text)], "cosine": None}
            elif score >= NEAR:
                hit = {"kind": "near", "eval": ordered[b][:2], "cosine": round(score, 4)}
            else:
                continue
            if row not in found or (found[row]["kind"], hit["kind"]) == ("near", "exact"):
                found[row] = {**hit, "row": row, "role": role, "text": _short(text, 200)}
    return found


def duplicate_rows(ds: PairDataset, encoder: MemoEncoder, near: bool = True) -> dict[int, dict]:
    """Row -> the earlier row it duplicates, exactly (normalised anchor and positive) or, with `near`, nearly
    (both cosines >= NEAR)."""
    found: dict[int, dict] = {}
    first: dict[int, int] = {}  # hash of the normalised pair -> its first row; a hit compares the texts
    anchor, positive = ds.anchor, ds.positive
    for row, pair in enumerate(zip(anchor, positive)):
        key = tuple(map(normalize_text, pair))
        earlier = first.setdefault(hash(key), row)
        if earlier != row and tuple(map(normalize_text, (anchor[earlier], positive[earlier]))) == key:
            found[row] = {"kind": "exact", "row": row, "duplicate_of": earlier, "cosine": None,
                          "text": _short(anchor[row], 200)}
    if not near:
        return found
    anchors, positives = encoder(anchor, "query"), encoder(positive, "document")
    for start in range(0, len(ds), CHUNK):
        both = torch.minimum(anchors[start:start + CHUNK] @ anchors.T, positives[start:start + CHUNK] @ positives.T)
        rows = torch.arange(start, start + len(both))
        both[torch.arange(len(ds)).expand(len(rows), -1) >= rows[:, None]] = -2  # earlier rows only
        score, earlier = both.max(dim=1)
        for row, s, j in zip(rows.tolist(), score.tolist(), earlier.tolist()):
            if s >= NEAR and row not in found:
                found[row] = {"kind": "near", "row": row, "duplicate_of": j, "cosine": round(s, 4),
                              "text": _short(anchor[row], 200)}
    return found


def summary_lines(reports: list[dict]) -> list[str]:
    """Markdown lines for the log and the eval report."""
    lines = []
    for r in reports:
        o, d = r["eval_overlap"], r["duplicates"]
        lines.append(f"- {r['dataset']} ({r['rows']} rows): eval overlap {o['exact']} exact, {o['near']} near "
                     f"(cosine >= {NEAR}); duplicates {d['exact']} exact, {d['near']} near; {r['dropped']} dropped")
        for e in o["examples"]:
            what = f"{e['eval'][0]} {e['eval'][1]}" + (f", cosine {e['cosine']}" if e["cosine"] is not None else "")
            lines.append(f"  - row {e['row']} {e['role']} = eval {what} ({e['kind']}): {_short(e['text'])}")
        for e in d["examples"]:
            cos = f", cosine {e['cosine']}" if e["cosine"] is not None else ""
            lines.append(f"  - row {e['row']} duplicates row {e['duplicate_of']} ({e['kind']}{cos}): "
                         f"{_short(e['text'])}")
    return lines


def _eval_texts(data: BeirData) -> list[tuple[str, str, str]]:
    """(kind, id, text) of the eval queries and of every document they judge."""
    text_of = dict(zip(data.corpus_ids, data.corpus_texts))
    judged = dict.fromkeys(d for judgments in data.qrels.values() for d in judgments)
    return ([("query", q, t) for q, t in zip(data.query_ids, data.query_texts)]
            + [("document", d, text_of[d]) for d in judged])


def _summary(found: dict[int, dict]) -> dict:
    hits = sorted(found.values(), key=lambda h: (h["kind"] != "exact", h["row"]))  # exact examples first
    return {"exact": sum(h["kind"] == "exact" for h in hits), "near": sum(h["kind"] == "near" for h in hits),
            "rows": sorted(found), "examples": hits[:EXAMPLES]}


def _short(text: str, limit: int = 100) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"
