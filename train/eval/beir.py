"""Load a retrieval set in the BEIR layout: corpus.jsonl, queries.jsonl, qrels/<split>.tsv."""
import csv
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from twinfold.models.files.jsonl import iter_json_lines

log = logging.getLogger(__name__)


class BeirFormatError(ValueError):
    """A BEIR folder that cannot be evaluated: the message names the file, the line and what to do."""


@dataclass
class BeirData:
    """Corpus, the judged queries of one split and their graded judgments (grade > 0 is relevant).

    `ignore_identical_ids`: the queries are also corpus documents, so a hit whose id equals the query's is skipped.
    """

    corpus_ids: list[str]
    corpus_texts: list[str]
    query_ids: list[str]
    query_texts: list[str]
    qrels: dict[str, dict[str, int]]
    folder: Path
    split: str = "test"
    ignore_identical_ids: bool = False
    warnings: list[str] = field(default_factory=list)

    def describe(self) -> dict:
        """What was evaluated, for reports."""
        return {"data": str(self.folder), "split": self.split, "queries": len(self.query_ids),
                "documents": len(self.corpus_ids), "judgments": sum(len(d) for d in self.qrels.values()),
                "ignore_identical_ids": self.ignore_identical_ids, "warnings": list(self.warnings)}


def load_beir(folder: str | Path, split: str = "test", strict: bool = False,
              ignore_identical_ids: bool = False) -> BeirData:
    """Read a BEIR folder; only queries with a judgment in `split` are kept.

    A document's text is `(title + " " + text).strip()`, as BEIR and MTEB build it. Judgments that name
    queries or documents missing from the files are dropped with a warning, or raise with `strict`.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise BeirFormatError(f"{folder}: not a folder (expected corpus.jsonl, queries.jsonl, qrels/{split}.tsv)")
    qrels_file = folder / "qrels" / f"{split}.tsv"
    if not qrels_file.exists():
        found = sorted(p.stem for p in (folder / "qrels").glob("*.tsv"))
        raise BeirFormatError(f"{qrels_file}: not found; splits in this folder: {', '.join(found) or 'none'}")
    corpus = _read_jsonl(folder / "corpus.jsonl", title=True)
    if not corpus:
        raise BeirFormatError(f"{folder / 'corpus.jsonl'}: no documents")
    queries = _read_jsonl(folder / "queries.jsonl", title=False)
    qrels, unknown = _read_qrels(qrels_file, queries, corpus)
    warnings = []
    for what, source in (("queries", "queries.jsonl"), ("documents", "corpus.jsonl")):
        if unknown[what]:
            line, name = unknown[what][0]
            message = (f"{qrels_file}: judgments naming {what} not in {source}: {len(unknown[what])} "
                       f"(first at line {line}: {name!r})")
            if strict:
                raise BeirFormatError(f"{message}; fix the files, or drop strict (--strict) to skip them")
            warnings.append(f"{message}; skipped")
            log.warning("%s; skipped", message)
    if not qrels:
        raise BeirFormatError(f"{qrels_file}: no judgment names a query of queries.jsonl and a document of "
                              "corpus.jsonl, so there is nothing to evaluate")
    if not any(grade > 0 for judged in qrels.values() for grade in judged.values()):
        raise BeirFormatError(f"{qrels_file}: no judgment has a grade above 0, so no query has a relevant document "
                              "and every metric would be 0; check the score column (relevant: 1 or more)")
    query_ids = [qid for qid in queries if qid in qrels]
    return BeirData(list(corpus), list(corpus.values()), query_ids, [queries[q] for q in query_ids], qrels,
                    folder, split, ignore_identical_ids, warnings)


def load_corpus(path: str | Path) -> dict[str, str]:
    """id -> "title text" of a BEIR folder's corpus.jsonl, or of a JSONL file in that layout."""
    return _read_jsonl(corpus_file(path), title=True)


def corpus_file(path: str | Path) -> Path:
    """The documents' JSONL file: a BEIR folder's corpus.jsonl, or `path` itself."""
    path = Path(path)
    return path / "corpus.jsonl" if path.is_dir() else path


@dataclass
class Document:
    """One line of a BEIR JSONL file: its line number, id, title ("" when it has none) and text."""

    line: int
    id: str
    title: str
    text: str

    @property
    def full_text(self) -> str:
        """`(title + " " + text).strip()`, the text BEIR and MTEB index."""
        return (self.title + " " + self.text).strip()


def iter_documents(path: Path, title: bool = True) -> Iterator[Document]:
    """The documents of a BEIR JSONL file one at a time (`_id`, `text`, and with `title` an optional `title`); an
    id must be a string or a number, a text (with its title) must not be empty. Ids are not checked for
    uniqueness here (`load_corpus` does)."""
    from twinfold.train.data.pairs import text_problem

    if not path.exists():
        raise BeirFormatError(f"{path}: not found (a BEIR folder holds corpus.jsonl and queries.jsonl)")
    for n, row in iter_json_lines(path, BeirFormatError):
        if "_id" not in row:
            raise BeirFormatError(f"{path}:{n}: no '_id' field; every line needs '_id' and 'text'")
        text = row.get("text")
        if not isinstance(text, str):
            raise BeirFormatError(f"{path}:{n}: field 'text' is missing or not a string")
        if not isinstance(row["_id"], str | int) or isinstance(row["_id"], bool):
            raise BeirFormatError(f"{path}:{n}: '_id' is {json.dumps(row['_id'])}; an id is a string or an integer")
        doc = Document(n, str(row["_id"]), str(row.get("title") or "") if title else "", text)
        if text_problem(doc.full_text if title else text):
            raise BeirFormatError(f"{path}:{n}: the text{' (with its title)' if title else ''} is empty; give it "
                                  "a text or remove the line")
        yield doc


def _read_jsonl(path: Path, title: bool) -> dict[str, str]:
    """id -> text (with its title, for the corpus) of a BEIR JSONL file (`iter_documents`); ids must be unique."""
    texts: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for doc in iter_documents(path, title):
        if doc.id in texts:
            raise BeirFormatError(f"{path}:{doc.line}: duplicate _id {doc.id!r} (first at line {first_line[doc.id]}); "
                                  "ids must be unique")
        texts[doc.id] = doc.full_text if title else doc.text
        first_line[doc.id] = doc.line
    return texts


def _read_qrels(path: Path, queries: dict, corpus: dict) -> tuple[dict[str, dict[str, int]], dict[str, list]]:
    """Judgments qid -> docid -> grade, and the (line, id) of those naming unknown queries or documents."""
    qrels: dict[str, dict[str, int]] = {}
    unknown: dict[str, list] = {"queries": [], "documents": []}
    with open(path, encoding="utf-8", newline="") as f:
        for n, fields in enumerate(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE), 1):
            if not fields or not "".join(fields).strip():
                continue
            if len(fields) != 3:
                raise BeirFormatError(f"{path}:{n}: expected 3 tab-separated fields (query-id, corpus-id, score), "
                                      f"got {len(fields)}")
            qid, doc_id, score = (x.strip() for x in fields)
            if n == 1 and (qid, doc_id) == ("query-id", "corpus-id"):
                continue
            try:
                grade = int(score)
            except ValueError:
                raise BeirFormatError(f"{path}:{n}: score {score!r} is not an integer grade") from None
            if qid not in queries:
                unknown["queries"].append((n, qid))
            elif doc_id not in corpus:
                unknown["documents"].append((n, doc_id))
            elif doc_id in qrels.setdefault(qid, {}):
                raise BeirFormatError(f"{path}:{n}: query {qid!r} judges document {doc_id!r} a second time; "
                                      "keep one line per pair")
            else:
                qrels[qid][doc_id] = grade
    return {q: d for q, d in qrels.items() if d}, unknown
