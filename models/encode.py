"""Embed a JSONL file with a model and write an embedding file that carries its fingerprint.

    python -m models.encode --model DIR --input FILE.jsonl [--field text] [--id-field _id]
        --output FILE.safetensors [--dim N] [--precision int8|binary] [--kind query|document]
        [--compute {float32,bf16,int8}]
"""
import argparse
import sys
from pathlib import Path

from models.bi_encoder import BiEncoder
from models.embeddings import EmbeddingSet, check_embedding_output
from models.jsonl import iter_json_lines
from models.loading import ModelLoadError
from models.quantize import COMPUTES, calibrate_int8, quantize_binary, quantize_int8
from models.runtime import keep_freed_memory


class InputError(ValueError):
    """A line of the input file that cannot be embedded."""


def read_texts(path: Path, field: str, id_field: str) -> tuple[list[str], list[str]]:
    """Texts and ids of a JSONL file, with errors naming the file, line and field."""
    texts, ids = [], []
    for n, row in iter_json_lines(path, InputError):
        text = row.get(field)
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"{path}:{n}: field {field!r} is missing, empty or not a string")
        texts.append(text)
        ids.append(str(row.get(id_field, n - 1)))
    if not texts:
        raise InputError(f"{path}: no rows to embed")
    return texts, ids


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.encode", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--input", required=True, type=Path)
    p.add_argument("--field", default="text")
    p.add_argument("--id-field", default="_id")
    p.add_argument("--output", required=True, type=Path)
    p.add_argument("--dim", type=int)
    p.add_argument("--precision", default="float32", choices=["float32", "int8", "binary"])
    p.add_argument("--kind", default="document", choices=["query", "document"])
    p.add_argument("--compute", default="float32", choices=COMPUTES, help="bf16: autocast (GPUs, CPUs with bf16 units); int8: linear layers in int8 (CPU)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--allow-pickle", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--overwrite", action="store_true", help="replace --output even if twinfold did not write it")
    args = p.parse_args(argv)
    try:
        check_embedding_output(args.output, args.overwrite)  # before the work, not after it
        texts, ids = read_texts(args.input, args.field, args.id_field)
        model = BiEncoder.from_pretrained(args.model, allow_pickle=args.allow_pickle)
    except (InputError, ModelLoadError, OSError, UnicodeDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    keep_freed_memory()
    emb = model.encode(texts, args.batch_size, kind=args.kind, dim=args.dim, compute=args.compute,
                       show_progress_bar=not args.no_progress)
    calibration = None
    if args.precision == "int8":
        calibration = calibrate_int8(emb)
        emb = quantize_int8(emb, calibration)
    elif args.precision == "binary":
        emb = quantize_binary(emb)
    dim = args.dim or model.dim
    embeddings = EmbeddingSet(emb, ids, model.fingerprint(args.compute), args.precision, dim, calibration,
                              model.settings.similarity)
    embeddings.save(args.output, args.overwrite)
    print(f"wrote {len(ids)} embeddings ({args.precision}, dim {dim}) to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
