"""Training data built from texts in memory, for hand-made test cases (the library builds the same from files), and
small evaluation sets cut from the shared data."""
import hashlib
import json
from pathlib import Path

import numpy as np

from twinfold.losses import text_keys
from twinfold.train.data.batches import assemble
from twinfold.train.data.pairs import KIND, PairDataset
from twinfold.train.data.plan import RowKeys


def pairs_from_texts(name: str, anchor: list[str], positive: list[str], negatives: list[list[str]] | None = None,
                     weight: float = 1.0) -> PairDataset:
    """A dataset whose row i is anchor[i], positive[i], negatives[i]."""
    import datasets

    k = len(negatives[0]) if negatives else 0
    columns = {"anchor": list(anchor), "positive": list(positive),
               **{f"negative_{j}": [row[j] for row in negatives] for j in range(k)}}
    fingerprint = hashlib.sha256(json.dumps(columns).encode()).hexdigest()[:16]
    return PairDataset(name, datasets.Dataset.from_dict(columns), weight, fingerprint)


def row_keys(name: str, anchor: list[str], positive: list[str], negatives: list[list[str]] | None = None,
             weight: float = 1.0) -> RowKeys:
    """The text keys a batch plan needs, of rows given as texts."""
    k = len(negatives[0]) if negatives else 0
    negative = text_keys([t for row in negatives for t in row]).numpy().reshape(len(anchor), k) if k \
        else np.zeros((len(anchor), 0), dtype=np.int64)
    return RowKeys(name, text_keys(anchor).numpy(), text_keys(positive).numpy(), negative, weight)


def assemble_texts(model, texts: dict[str, list[str]], token_budget: int, max_texts: int | None = None) -> dict:
    """`train.batches.assemble` from texts by role, tokenized with the model's prefixes and max_length."""
    tokens = {role: (model.token_ids(v, KIND[role]), text_keys(v).tolist()) for role, v in texts.items()}
    return assemble(tokens, model.padder, token_budget, max_texts)


def count_truncated(model, texts: list[str], kind: str) -> int:
    """How many of `texts` (with the kind's prefix) are longer than the model's `max_length` tokens."""
    return sum(n > model.max_length for n in model.text_tokenizer.lengths(texts, kind))


def small_beir(nano: Path, folder: Path, queries: int = 10, others: int = 100) -> Path:
    """The first `queries` judged queries of SciFact-nano with their judged documents and `others` more documents."""
    qrels = (nano / "qrels" / "test.tsv").read_text().splitlines()
    kept = [line for line in qrels[1:] if line.split("\t")[0] in {q.split("\t")[0] for q in qrels[1:queries + 1]}]
    judged = {line.split("\t")[1] for line in kept}
    corpus = (nano / "corpus.jsonl").read_text().splitlines()
    docs = [d for i, d in enumerate(corpus) if i < others or json.loads(d)["_id"] in judged]
    (folder / "qrels").mkdir(parents=True)
    (folder / "qrels" / "test.tsv").write_text("\n".join([qrels[0], *kept]) + "\n")
    (folder / "corpus.jsonl").write_text("\n".join(docs) + "\n")
    (folder / "queries.jsonl").write_text((nano / "queries.jsonl").read_text())
    return folder


def small_sts(source: Path, path: Path, pairs: int = 100) -> Path:
    """The first `pairs` sentence pairs of an STS file (with its header)."""
    path.write_text("".join(source.read_text().splitlines(keepends=True)[:pairs + 1]))
    return path
