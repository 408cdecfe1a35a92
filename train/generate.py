"""Pseudo-queries for a corpus (`twinfold pairs --method generate`): a generator model writes queries for each
document, and each (query, document) becomes a training pair, as in GPL (Wang et al. 2022).

The pair file has `anchor` (a generated query) and `positive` (the document's title and text); `OUT.provenance.json`
goes beside it. Generation is resumable: rows go to `OUT.generating.jsonl` as each batch of documents is done,
after a first line with the settings' key; a run started again with the same corpus, generator, settings and seed
continues after the last finished batch (a torn last batch is generated again), and the finished file replaces the
partial one. A partial file of other settings is started over. Each batch samples with its own seed, from
(seed, its first document's id), so a resumed file equals an uninterrupted one.
"""
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

from twinfold.models.files.atomic import atomic_file, atomic_write_bytes
from twinfold.models.generator import QueryGenerator
from twinfold.train.data.pairs import DataError
from twinfold.train.eval.beir import Document, corpus_file, iter_documents
from twinfold.train.mine import provenance_path

log = logging.getLogger(__name__)


def partial_path(out: str | Path) -> Path:
    """Where the rows of an unfinished generation go."""
    return Path(out).with_name(Path(out).name + ".generating.jsonl")


def batch_seed(seed: int, doc_id: str) -> int:
    """The sampling seed of the batch that starts with document `doc_id`."""
    return int(hashlib.sha256(f"{seed}\0generate\0{doc_id}".encode()).hexdigest()[:15], 16)


def _batches(docs: Iterator[Document], size: int) -> Iterator[list[Document]]:
    while batch := list(islice(docs, size)):
        yield batch


def _resume_point(partial: Path, key: str) -> int:
    """Documents finished in `partial` (0: none, or other settings); the file is cut after its last finished batch."""
    if not partial.exists():
        return 0
    done, keep = 0, 0
    with open(partial, "rb") as f:
        lines = iter(f)
        first = next(lines, b"")
        try:
            same = json.loads(first).get("key") == key
        except ValueError:
            same = False
        if not same:
            log.info("%s: written with other settings; generating again", partial)
            return 0
        keep = len(first)
        for line in lines:
            if not line.endswith(b"\n"):
                break
            try:
                row = json.loads(line)
            except ValueError:
                break
            if "documents_done" in row:
                done, keep = row["documents_done"], f.tell()
    os.truncate(partial, keep)
    return done


def write_generated_pairs(out: str | Path, corpus: str | Path, generator: QueryGenerator, name: str, per_doc: int = 3,
                          seed: int = 42, batch_size: int = 16) -> dict:
    """Write the pair file and `OUT.provenance.json` as the module says (`name`: the generator's, for the
    provenance); return the provenance."""
    source, partial = corpus_file(corpus), partial_path(out)
    settings = {**generator.settings(), "per_doc": per_doc, "seed": seed, "batch_size": batch_size}
    key = hashlib.sha256(json.dumps({"corpus": str(source), "generator": generator.fingerprint(), **settings},
                                    sort_keys=True).encode()).hexdigest()[:16]
    done = _resume_point(partial, key)
    if done:
        log.info("%s: resuming after %d documents", partial, done)
    else:
        atomic_write_bytes(partial, (json.dumps({"key": key, "settings": settings}) + "\n").encode())
    documents = iter_documents(source)
    for _ in islice(documents, done):
        pass
    with open(partial, "ab") as f:
        for batch in _batches(documents, batch_size):
            queries = generator.generate([d.full_text for d in batch], per_doc, batch_seed(seed, batch[0].id))
            done += len(batch)
            rows = [{"anchor": q, "positive": d.full_text, "doc": d.id}
                    for d, qs in zip(batch, queries) for q in dict.fromkeys(qs)]
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())
            f.write((json.dumps({"documents_done": done}) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())
    return _finish(out, partial, source, {"name": name, "fingerprint": generator.fingerprint()}, settings, done)


def _finish(out: Path, partial: Path, source: Path, generator: dict, settings: dict, documents: int) -> dict:
    """Write the pair file from the partial one (then removed) and its provenance."""
    digest, rows, with_query = hashlib.sha256(), 0, set()
    with atomic_file(out) as f, open(partial, "rb") as rows_in:
        next(rows_in)
        for line in rows_in:
            row = json.loads(line)
            if "documents_done" in row:
                continue
            with_query.add(row.pop("doc"))
            text = (json.dumps(row, ensure_ascii=False) + "\n").encode()
            f.write(text)
            digest.update(text)
            rows += 1
        if not rows:
            raise DataError(f"{source}: the generator wrote no query for any of its {documents} documents; nothing "
                            f"was written (partial rows stay in {partial})")
    partial.unlink()
    provenance = {"corpus": str(source), "method": "generate", "generator": generator, "settings": settings,
                  "documents": documents, "skipped": documents - len(with_query), "rows_out": rows,
                  "skipped_because": "no query generated (every sample empty)", "sha256": digest.hexdigest(),
                  "columns": {"anchor": "anchor", "positive": "positive"}}
    atomic_write_bytes(provenance_path(out), (json.dumps(provenance, indent=2) + "\n").encode())
    return provenance
