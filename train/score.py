"""Teacher scores for a pair file: each row gets score_positive and score_negative_1..k, for distillation.

A row's scores are the teacher's score of its anchor against the positive and against each negative.

    python -m twinfold.train.score --teacher M --data PAIRS.jsonl --out SCORED.jsonl [--teacher-kind auto]
        [--batch-size 32] [--max-length N] [--overwrite]

The data is a JSONL pair file with `anchor`, `positive` and optionally `negative` or `negative_1..k` columns (what
`twinfold mine` and `twinfold pairs` write); every field of a row is kept, score fields already there are replaced.
Negatives are scored in the order `negative`, `negative_1`, `negative_2`, ... The teacher (`--teacher-kind auto`):
a cross-encoder when its config names a sequence-classification model (a sentence-transformers CrossEncoder folder,
or any `AutoModelForSequenceClassification` with one output; score: the raw logit), a bi-encoder when it is a
sentence-transformers or twinfold folder (score: the model's similarity, cosine or dot, of the anchor as a query
and the text as a document); `--teacher-kind bi-encoder` embeds with any other encoder. The file is read and
written a block of rows at a time, through a temporary file (a failed run writes nothing), beside
`OUT.provenance.json` (teacher, kind, fingerprint, data, rows, the file's SHA-256). An existing OUT is replaced only
if it is a pair file twinfold wrote, unchanged (`--overwrite`: anything but the data file).
"""
import argparse
import hashlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from twinfold.models import BiEncoder, ModelLoadError
from twinfold.models.cross_encoder import CrossEncoder, is_cross_encoder
from twinfold.models.encode import non_positive_option
from twinfold.models.files.atomic import OverwriteRefused, atomic_file, atomic_write_bytes, check_writable
from twinfold.models.files.jsonl import iter_json_lines
from twinfold.models.resolve import resolve_model_path
from twinfold.train.data.pairs import DataError, teacher_score_names, text_problem
from twinfold.train.mine import check_pair_output, provenance_path

KINDS = ("auto", "cross-encoder", "bi-encoder")
BLOCK_ROWS = 1024  # rows read, scored and written together


def teacher_kind(name_or_path: str, kind: str = "auto", trust_remote_code: bool = False) -> str:
    """cross-encoder or bi-encoder: `kind`, or for auto what the model is (a `ModelLoadError` names one that is
    neither)."""
    if kind != "auto":
        return kind
    from transformers import AutoConfig

    path = resolve_model_path(name_or_path)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"--teacher {name_or_path}: cannot read its config: {e}") from e
    if is_cross_encoder(config):
        return "cross-encoder"
    if any((Path(path) / name).exists() for name in ("modules.json", "twinfold.json")):
        return "bi-encoder"
    raise ModelLoadError(f"--teacher {name_or_path}: neither a cross-encoder (config.json architectures "
                         f"{config.architectures}: no sequence-classification model) nor a sentence-transformers or "
                         "twinfold bi-encoder (no modules.json); pass --teacher-kind bi-encoder to embed with it")


def load_teacher(name_or_path: str, kind: str, max_length: int | None = None, allow_pickle: bool = False,
                 trust_remote_code: bool = False):
    """The teacher as a `CrossEncoder` or a `BiEncoder`."""
    if kind == "cross-encoder":
        return CrossEncoder.from_pretrained(name_or_path, max_length, allow_pickle, trust_remote_code)
    return BiEncoder.from_pretrained(name_or_path, max_length=max_length, allow_pickle=allow_pickle,
                                     trust_remote_code=trust_remote_code)


def pair_scores(teacher, anchors: list[str], texts: list[str], batch_size: int) -> torch.Tensor:
    """The teacher's score of each (anchors[i], texts[i]); a bi-encoder encodes each distinct text once."""
    if isinstance(teacher, CrossEncoder):
        return teacher.score(anchors, texts, batch_size)
    queries, documents = list(dict.fromkeys(anchors)), list(dict.fromkeys(texts))
    q = teacher.encode(queries, batch_size, kind="query", convert_to_tensor=True).float()
    d = teacher.encode(documents, batch_size, kind="document", convert_to_tensor=True).float()
    if teacher.settings.similarity == "cosine":
        q, d = F.normalize(q, dim=-1), F.normalize(d, dim=-1)
    qi, di = {t: i for i, t in enumerate(queries)}, {t: i for i, t in enumerate(documents)}
    return (q[[qi[a] for a in anchors]] * d[[di[t] for t in texts]]).sum(-1)


def text_columns(path: Path, line: int, row: dict) -> list[str]:
    """`positive` then the row's negative columns in order (`negative`, `negative_1`, ...); `DataError` when the
    row lacks `anchor` or `positive`."""
    for name in ("anchor", "positive"):
        if name not in row:
            raise DataError(f"{path}:{line}: no {name!r} field; a pair file to score has anchor, positive and "
                            f"optionally negative or negative_1..k (fields: {sorted(row)})")
    return list(teacher_score_names(row))


def blocks(path: Path) -> Iterator[list[tuple[int, dict]]]:
    """The rows of a JSONL pair file, `BLOCK_ROWS` (line, row) at a time, each text checked."""
    block, columns = [], None
    for n, row in iter_json_lines(path, DataError):
        names = ["anchor", *text_columns(path, n, row)]
        if columns is None:
            columns = names
        elif names != columns:
            raise DataError(f"{path}:{n}: text fields {names} differ from the first row's {columns}; every row "
                            "needs the same negatives")
        for name in names:
            if problem := text_problem(row[name]):
                raise DataError(f"{path}:{n} field {name!r}: text is {problem}")
        block.append((n, row))
        if len(block) == BLOCK_ROWS:
            yield block
            block = []
    if block:
        yield block


def score_file(teacher, data: Path, out: Path, batch_size: int = 32) -> dict:
    """Write `out` (the rows of `data` with their scores, as the module says); return the rows written, the file's
    SHA-256 and its text columns -> roles."""
    digest, rows = hashlib.sha256(), 0
    with atomic_file(out) as f:
        for block in blocks(data):
            columns = text_columns(data, *block[0])
            anchors = [row["anchor"] for _, row in block for _ in columns]
            texts = [row[c] for _, row in block for c in columns]
            scores = pair_scores(teacher, anchors, texts, batch_size).view(len(block), len(columns)).tolist()
            names = list(teacher_score_names(columns).values())
            for (_, row), row_scores in zip(block, scores):
                line = (json.dumps({**row, **dict(zip(names, row_scores))}, ensure_ascii=False) + "\n").encode()
                f.write(line)
                digest.update(line)
            rows += len(block)
        if not rows:
            raise DataError(f"{data}: no rows to score; nothing was written")
    roles = {"anchor": "anchor", "positive": "positive", **{c: "negative" for c in columns[1:]}}
    return {"rows": rows, "sha256": digest.hexdigest(), "columns": roles}


def write_scores(teacher, name: str, kind: str, data: Path, out: Path, batch_size: int = 32) -> dict:
    """`score_file`, then `OUT.provenance.json` (teacher `name`, `kind` and fingerprint, the data, the counts);
    return the provenance."""
    counts = score_file(teacher, data, out, batch_size)
    provenance = {"teacher": name, "kind": kind, "fingerprint": teacher.fingerprint(), "data": str(data), **counts}
    atomic_write_bytes(provenance_path(out), (json.dumps(provenance, indent=2) + "\n").encode())
    return provenance


def main(argv: list[str] | None = None, prog: str = "python -m twinfold.train.score") -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--teacher", required=True, help="cross-encoder or bi-encoder: folder or hub id")
    p.add_argument("--data", required=True, type=Path, help="JSONL pair file (anchor, positive, negative...)")
    p.add_argument("--out", required=True, type=Path, help="the scored pair file (JSONL)")
    p.add_argument("--teacher-kind", choices=KINDS, default="auto")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, help="tokens of a pair (cross-encoder) or a text (bi-encoder)")
    p.add_argument("--allow-pickle", action="store_true", help="accept pytorch_model.bin weights")
    p.add_argument("--trust-remote-code", action="store_true", help="run the teacher's own code")
    p.add_argument("--overwrite", action="store_true", help="replace --out even if twinfold did not write it")
    args = p.parse_args(argv)
    options = {"--batch-size": args.batch_size, **({"--max-length": args.max_length} if args.max_length else {})}
    if problem := non_positive_option(options):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        check_pair_output(args.out, args.data, args.overwrite)
        check_writable(args.out, "--out")
        if not args.data.is_file():
            raise DataError(f"--data {args.data}: not found (a JSONL pair file)")
        kind = teacher_kind(args.teacher, args.teacher_kind, args.trust_remote_code)
        teacher = load_teacher(args.teacher, kind, args.max_length, args.allow_pickle, args.trust_remote_code)
        counts = write_scores(teacher, args.teacher, kind, args.data, args.out, args.batch_size)
    except (DataError, ModelLoadError, OverwriteRefused, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"scored {counts['rows']} rows of {args.data} with the {kind} {args.teacher} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
