"""Embed a JSONL file with a model and write an embedding file that carries its fingerprint; keep it up to date.

    python -m twinfold.models.encode --model DIR --input FILE.jsonl [--field text] [--id-field _id]
        --output FILE.safetensors [--dim N] [--precision int8|binary] [--kind query|document]
        [--prompt NAME | --prompt-text TEXT] [--compute {float32,bf16,int8,onnx,onnx-int8}] [--format parquet]
        [--overwrite]
    python -m twinfold.models.encode --model DIR --input FILE.jsonl --update EXISTING.safetensors [--output NEW]
    python -m twinfold.models.encode --model DIR --check FILE.safetensors

`--update` re-embeds only the documents that are new or whose text changed (the file stores a content hash
per id), drops ids no longer in the input and keeps the other rows; dim, precision, kind, prompt and compute are
the file's, and int8 rows use the file's calibration. It refuses a file made by another model (fingerprint).
`--prompt NAME` (one of the model's named prompts; `--prompt-name` is the same option) or `--prompt-text TEXT`
replaces the kind's prefix, as sentence-transformers' `encode(prompt_name=...)` / `encode(prompt=...)` do; the
file records the prompt text.
`--check` exits 0 when the file's fingerprint is the model's, 1 when it is not.
`--format parquet` writes ids, vectors and content hashes as Parquet columns, the fingerprint and settings as
its schema metadata (see `models.embeddings`); `--update` and `--check` read either format, and an update
writes the format of the file it updates unless `--format` says otherwise.
"""
import argparse
import shlex
import sys
from pathlib import Path

import numpy as np

from twinfold.models.bi_encoder import BiEncoder
from twinfold.models.embeddings import FORMATS, EmbeddingSet, check_embedding_output, content_hash, file_format
from twinfold.models.files.atomic import check_writable
from twinfold.models.files.jsonl import iter_json_lines
from twinfold.models.loading import ModelLoadError
from twinfold.models.quantize import (
    COMPUTE_HELP,
    COMPUTES,
    MIN_CALIBRATION_ROWS,
    PRECISIONS,
    calibrate_int8,
    quantize_binary,
    quantize_int8,
)
from twinfold.models.runtime import keep_freed_memory


class InputError(ValueError):
    """A line of the input file that cannot be embedded."""


def read_texts(path: Path, field: str, id_field: str) -> tuple[list[str], list[str]]:
    """Texts and ids of a JSONL file, with errors naming the file, line and field."""
    texts, ids, line_of = [], [], {}
    for n, row in iter_json_lines(path, InputError):
        text = row.get(field)
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"{path}:{n}: field {field!r} is missing, empty or not a string")
        doc_id = str(row.get(id_field, n - 1))
        if doc_id in line_of:
            raise InputError(f"{path}:{n}: duplicate id {doc_id!r} (first at line {line_of[doc_id]}); ids must be "
                             "unique")
        line_of[doc_id] = n
        texts.append(text)
        ids.append(doc_id)
    if not texts:
        raise InputError(f"{path}: no rows to embed")
    return texts, ids


def encode_texts(model: BiEncoder, texts: list[str], kind: str, dim: int | None, precision: str, compute: str,
                 batch_size: int, calibration=None, show_progress_bar: bool = False, prompt: str | None = None):
    """Embeddings of `texts` in `precision` (int8: with `calibration`, or calibrated on them) and the calibration;
    `prompt`: a text in place of the kind's prefix."""
    emb = model.encode(texts, batch_size, kind=kind, prompt=prompt, dim=dim, compute=compute,
                       show_progress_bar=show_progress_bar)
    if precision == "int8":
        calibration = calibration or calibrate_int8(emb)
        return quantize_int8(emb, calibration), calibration
    return (quantize_binary(emb) if precision == "binary" else emb), None


def update(old: EmbeddingSet, model: BiEncoder, texts: list[str], ids: list[str], batch_size: int,
           show_progress_bar: bool = False) -> tuple[EmbeddingSet, dict[str, int]]:
    """`old` brought in step with (ids, texts): new or changed texts re-embedded, removed ids dropped.

    Raises ValueError when `old` cannot be updated (another model, or no content hashes).
    """
    hashes = [content_hash(t) for t in texts]
    kept = {i: (row, h) for row, (i, h) in enumerate(zip(old.ids, old.hashes or []))}
    redo = [n for n, (i, h) in enumerate(zip(ids, hashes)) if i not in kept or kept[i][1] != h]
    counts = {"new": sum(ids[n] not in kept for n in redo), "changed": sum(ids[n] in kept for n in redo),
              "removed": len(set(old.ids) - set(ids))}
    counts["kept"] = len(ids) - len(redo)
    shape = (len(ids), *old.embeddings.shape[1:])
    emb = np.empty(shape, dtype=old.embeddings.dtype)
    redone = set(redo)
    keep_rows = [n for n in range(len(ids)) if n not in redone]
    emb[keep_rows] = old.embeddings[[kept[ids[n]][0] for n in keep_rows]]
    if redo:
        emb[redo], _ = encode_texts(model, [texts[n] for n in redo], old.kind, old.dim, old.precision, old.compute,
                                    batch_size, old.calibration, show_progress_bar, old.prompt)
    return EmbeddingSet(emb, ids, old.fingerprint, old.precision, old.dim, old.calibration, old.similarity, hashes,
                        old.kind, old.compute, old.prompt), counts


def check_updatable(old: EmbeddingSet, path: Path, model: BiEncoder, model_name: str, rebuild: str) -> None:
    """Raise ValueError, saying how to rebuild, unless `old` was made by `model` and stores content hashes."""
    if old.hashes is None or old.kind is None:
        raise ValueError(f"{path} stores no content hashes (written by an older twinfold); rebuild it: {rebuild}")
    fingerprint = model.fingerprint(old.compute)
    if old.fingerprint != fingerprint:
        raise ValueError(f"{path} was made by another model or settings (fingerprint {old.fingerprint}, "
                         f"{model_name} has {fingerprint}); an index must be searched with the model that built "
                         f"it, so rebuild it: {rebuild}")


def non_positive_option(values: dict[str, int | None]) -> str | None:
    """`OPTION: VALUE must be a positive integer` for the first given option below 1 (checked before any work)."""
    return next((f"{option}: {value} must be a positive integer" for option, value in values.items()
                 if value is not None and value < 1), None)


def main(argv: list[str] | None = None, prog: str = "python -m twinfold.models.encode") -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--input", type=Path, help="JSONL of documents (or queries)")
    p.add_argument("--field", default="text")
    p.add_argument("--id-field", default="_id")
    p.add_argument("--output", type=Path, help="embedding file to write (with --update: default EXISTING)")
    p.add_argument("--update", type=Path, metavar="EXISTING", help="re-embed only new and changed texts of this file")
    p.add_argument("--check", type=Path, metavar="FILE", help="say whether FILE was made by --model, and exit")
    p.add_argument("--dim", type=int)
    p.add_argument("--precision", default="float32", choices=PRECISIONS)
    p.add_argument("--kind", default="document", choices=["query", "document"])
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", "--prompt-name", dest="prompt_name", metavar="NAME",
                        help="a named prompt of the model in place of the kind's prefix")
    prompt.add_argument("--prompt-text", dest="prompt", metavar="TEXT",
                        help="a prompt text in place of the kind's prefix")
    p.add_argument("--compute", default="float32", choices=COMPUTES, help=COMPUTE_HELP)
    p.add_argument("--format", choices=FORMATS, help="file format (default: safetensors; with --update: the file's)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--allow-pickle", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--overwrite", action="store_true", help="replace --output even if twinfold did not write it")
    args = p.parse_args(argv)
    if not args.check and (args.input is None or (args.output or args.update) is None):
        p.error("give --input and --output (or --update EXISTING), or --check FILE")
    if problem := non_positive_option({"--dim": args.dim, "--batch-size": args.batch_size}):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        if args.output:  # before the work, not after it
            check_embedding_output(args.output, args.overwrite)
        if args.output or args.update:
            check_writable(args.output or args.update, "--output" if args.output else "--update")
        old = EmbeddingSet.load(args.check or args.update) if args.check or args.update else None
        model = BiEncoder.from_pretrained(args.model, allow_pickle=args.allow_pickle)
        if args.dim is not None and args.dim > model.dim and not (args.check or args.update):
            raise ValueError(f"--dim: {args.dim} is larger than the model's dimension {model.dim}")
        prompt = model.prompt_text(args.prompt_name, args.prompt)
        texts, ids = read_texts(args.input, args.field, args.id_field) if args.input else ([], [])
        if args.precision == "int8" and not args.update and len(texts) < MIN_CALIBRATION_ROWS:
            raise InputError(f"{args.input}: int8 embeddings are calibrated on the documents encoded, and "
                             f"{len(texts)} cannot give each dimension a range: encode at least "
                             f"{MIN_CALIBRATION_ROWS} documents together, or use --precision float32")
        if args.update:
            rebuild = (f"{prog} --model {args.model} --input {args.input} --output {args.update} "
                       f"--precision {old.precision} --dim {old.dim} --kind {old.kind} "
                       f"--format {file_format(args.update)}"
                       + (f" --prompt-text {shlex.quote(old.prompt)}" if old.prompt is not None else ""))
            check_updatable(old, args.update, model, args.model, rebuild)
    except (InputError, ModelLoadError, OSError, UnicodeDecodeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.check:
        fingerprint = model.fingerprint(old.compute)
        if old.fingerprint == fingerprint:
            print(f"{args.check} belongs to {args.model} (fingerprint {fingerprint}, {len(old.ids)} embeddings)")
            return 0
        print(f"{args.check} does not belong to {args.model}: its fingerprint is {old.fingerprint}, the model's is "
              f"{fingerprint}; re-encode it with this model ({prog} --model {args.model} "
              f"--input DOCS.jsonl --output {args.check})")
        return 1
    keep_freed_memory()
    if args.update:
        new, counts = update(old, model, texts, ids, args.batch_size, show_progress_bar=not args.no_progress)
        new.save(args.output or args.update, format=args.format or file_format(args.update))
        print(f"re-encoded {counts['new'] + counts['changed']} documents ({counts['new']} new, {counts['changed']} "
              f"changed), kept {counts['kept']}, removed {counts['removed']}: {args.output or args.update}")
        return 0
    emb, calibration = encode_texts(model, texts, args.kind, args.dim, args.precision, args.compute, args.batch_size,
                                    show_progress_bar=not args.no_progress, prompt=prompt)
    dim = args.dim or model.dim
    EmbeddingSet(emb, ids, model.fingerprint(args.compute), args.precision, dim, calibration,
                 model.settings.similarity, [content_hash(t) for t in texts], args.kind,
                 args.compute, prompt).save(args.output, args.overwrite, args.format or "safetensors")
    print(f"wrote {len(ids)} embeddings ({args.precision}, dim {dim}) to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
