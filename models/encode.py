"""Embed a corpus with a model into an embedding file or a sharded embedding dataset that carries its fingerprint;
keep it up to date.

    python -m twinfold.models.encode --model DIR --input FILE.jsonl [--field text] [--id-field _id]
        --output FILE.safetensors [--dim N] [--precision int8|binary] [--kind query|document]
        [--prompt NAME | --prompt-text TEXT] [--compute {float32,bf16,int8,onnx,onnx-int8}] [--format parquet]
        [--unpad auto|true|false]
        [--overwrite]
    python -m twinfold.models.encode --model DIR --input FILE.jsonl --update EXISTING.safetensors [--output NEW]
    python -m twinfold.models.encode --model DIR --check FILE.safetensors
    [accelerate launch [--num_processes N] ...] -m twinfold.models.encode --model DIR --input FILES --output OUT_DIR
        --format parquet [--part-rows 10000] [--calibration-sample 10000] [other options as above]

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

`--output DIR --format parquet` (a folder, or a name without `.parquet`) writes a sharded dataset
(`models.shards`) in bounded memory: the input (JSONL, CSV/TSV, Parquet, or a folder of them,
`models.files.rows`) is read as a stream, part by part of `--part-rows` rows. Under `accelerate launch`, process r
of N encodes parts r, r + N, r + 2N, ...; the main process writes the manifest first (settings, row count, int8
calibration) and last (the parts). int8 rows are calibrated on `--calibration-sample` rows drawn with seed 0 from
the whole input: the calibration `calibrate_int8(all embeddings, sample_size, seed=0)` would give. The same command
run again resumes: complete parts whose input rows are unchanged are kept, the others encoded; other settings or
another model, or changed input rows, are refused (`--update DIR` brings the dataset in step with changed input).
"""
import argparse
import contextlib
import math
import os
import shlex
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch

from twinfold.models.bi_encoder import BiEncoder
from twinfold.models.embeddings import FORMATS, EmbeddingSet, check_embedding_output, content_hash, file_format
from twinfold.models.files.atomic import LEFTOVERS, check_writable
from twinfold.models.files.rows import InputError, Row, count_rows, input_files, iter_rows
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
from twinfold.models.runtime import keep_freed_memory, share_cpu_cores
from twinfold.models.shards import (
    OVERWRITE_REMEDY,
    PartsProgress,
    calibration_of,
    check_dataset_output,
    clear_dataset,
    complete_record,
    finish,
    input_digest,
    is_dataset_path,
    load_embeddings,
    part_file,
    read_header,
    repeated_id,
    settings_difference,
    write_header,
    write_part,
)
from twinfold.models.unpad import UNPAD_HELP, cli_setting

PART_ROWS = 10_000  # rows per part of a sharded dataset
CALIBRATION_SAMPLE = 10_000  # int8 calibration rows drawn from a sharded dataset's input
CALIBRATION_SEED = 0
DISTRIBUTED_TIMEOUT = timedelta(days=7)  # a process done with its parts waits this long for the others


def read_texts(path: Path, field: str, id_field: str) -> tuple[list[str], list[str]]:
    """Texts and ids of an input (`models.files.rows`), with errors naming the file, line and field."""
    rows = unique_ids(list(iter_rows(input_files(path), field, id_field)))
    if not rows:
        raise InputError(f"{path}: no rows to embed")
    return [r.text for r in rows], [r.id for r in rows]


def unique_ids(rows: list[Row]) -> list[Row]:
    """`rows`, or InputError at the first id given twice (naming both places)."""
    place_of = {}
    for row in rows:
        if row.id in place_of:
            raise InputError(f"{row.place}: duplicate id {row.id!r} (first at {place_of[row.id]}); ids must be unique")
        place_of[row.id] = row.place
    return rows


def too_few_to_calibrate(source, count: int) -> InputError:
    """The error for int8 embeddings of fewer documents than a calibration needs."""
    return InputError(f"{source}: int8 embeddings are calibrated on the documents encoded, and {count} cannot give "
                      f"each dimension a range: encode at least {MIN_CALIBRATION_ROWS} documents together, or use "
                      "--precision float32")


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


def check_updatable(fingerprint: str, compute: str, has_hashes: bool, path: Path, model: BiEncoder,
                    model_name: str, rebuild: str) -> None:
    """Raise ValueError, saying how to rebuild, unless embeddings with this `fingerprint` (made with `compute`) were
    made by `model` and store content hashes."""
    if not has_hashes:
        raise ValueError(f"{path} stores no content hashes (written by an older twinfold); rebuild it: {rebuild}")
    if fingerprint != model.fingerprint(compute):
        raise ValueError(f"{path} was made by another model or settings (fingerprint {fingerprint}, "
                         f"{model_name} has {model.fingerprint(compute)}); an index must be searched with the model "
                         f"that built it, so rebuild it: {rebuild}")


def non_positive_option(values: dict[str, int | None]) -> str | None:
    """`OPTION: VALUE must be a positive integer` for the first given option below 1 (checked before any work)."""
    return next((f"{option}: {value} must be a positive integer" for option, value in values.items()
                 if value is not None and value < 1), None)


# --- sharded datasets -----------------------------------------------------------------------------------
def dataset_header(model: BiEncoder, args, prompt: str | None, rows: int) -> dict:
    """The manifest entry of a new dataset: the fingerprint, the settings and the input's row count."""
    return {"fingerprint": model.fingerprint(args.compute), "precision": args.precision, "dim": args.dim or model.dim,
            "similarity": model.settings.similarity, "kind": args.kind, "compute": args.compute, "prompt": prompt,
            "field": args.field, "id_field": args.id_field, "part_rows": args.part_rows, "rows": rows,
            "input": str(args.input), "calibration": None, "complete": False, "parts": []}


def start_dataset(model: BiEncoder, args, prompt: str | None, files: list[Path], out: Path) -> None:
    """The main process, before any part: check the settings against an earlier run's (or take the updated
    dataset's), count the input rows, calibrate int8 and write the manifest that every process reads."""
    rows = count_rows(files)
    if rows == 0:
        raise InputError(f"{args.input}: no rows to embed")
    if args.overwrite and not args.update:
        clear_dataset(out)
    old = read_header(out)
    if args.update:
        header = {**old, "field": args.field, "id_field": args.id_field, "rows": rows, "input": str(args.input),
                  "complete": False}
    else:
        header = dataset_header(model, args, prompt, rows)
        if old is not None:
            if difference := settings_difference(old, header):
                raise ValueError(f"{out} holds embeddings of other settings, another model or another input: "
                                 f"{'; '.join(difference)}. Run the command that made it to finish it, bring it "
                                 f"in step with --update {out}, or {OVERWRITE_REMEDY}")
            header["calibration"] = old["calibration"]
        if args.precision == "int8" and header["calibration"] is None:
            header["calibration"] = sample_calibration(model, files, header, args.batch_size, args.calibration_sample)
    for leftover in out.glob(f"{LEFTOVERS[0]}part-*"):  # a part whose writing was killed
        leftover.unlink(missing_ok=True)
    if old is None or args.update:  # a resumed run leaves the manifest as it is until every part is there
        write_header(out, header)


def sample_calibration(model: BiEncoder, files: list[Path], header: dict, batch_size: int,
                       sample_size: int) -> dict:
    """int8 calibration from `sample_size` input rows drawn with `CALIBRATION_SEED`: what `calibrate_int8(all
    embeddings, sample_size, CALIBRATION_SEED)` gives, without holding them all."""
    rows = header["rows"]
    if rows < MIN_CALIBRATION_ROWS:
        raise too_few_to_calibrate(header["input"], rows)
    picked = np.arange(rows) if sample_size >= rows else \
        np.random.default_rng(CALIBRATION_SEED).choice(rows, sample_size, replace=False)
    wanted = set(picked.tolist())
    texts = [r.text for r in iter_rows(files, header["field"], header["id_field"], wanted.__contains__)]
    emb, _ = encode_texts(model, texts, header["kind"], header["dim"], "float32", header["compute"], batch_size,
                          prompt=header["prompt"])
    calibration = calibrate_int8(emb)
    return {"sample_size": len(texts), "seed": CALIBRATION_SEED, "starts": calibration.starts.tolist(),
            "steps": calibration.steps.tolist()}


def rows_by_part(files: list[Path], header: dict, parts) -> Iterator[tuple[int, list[Row]]]:
    """(k, rows) of each part k in `parts`, in order, read as a stream: one part's rows in memory at a time."""
    size, wanted = header["part_rows"], set(parts)
    current, rows = None, []
    for row in iter_rows(files, header["field"], header["id_field"], lambda i: i // size in wanted):
        if row.index // size != current and rows:
            yield current, rows
            rows = []
        current = row.index // size
        rows.append(row)
    if rows:
        yield current, rows


def previous_part(out: Path, k: int, header: dict) -> EmbeddingSet | None:
    """Part k as a killed or earlier run left it, if it holds rows of these settings to keep."""
    try:
        part = EmbeddingSet.load(out / part_file(k))
    except (OSError, ValueError):
        return None
    same = all(getattr(part, key) == header[key] for key in ("fingerprint", "precision", "dim", "kind", "prompt"))
    return part if same and part.hashes is not None else None


def encode_parts(model: BiEncoder, files: list[Path], out: Path, header: dict, rank: int, world: int,
                 update_input: bool, batch_size: int) -> dict[str, int]:
    """Write the parts k = rank, rank + world, ... that are not complete (and, `update_input`, those whose input
    rows changed); rows of a part already there are kept when their text is unchanged. Returns the counts."""
    size, rows = header["part_rows"], header["rows"]
    mine = range(rank, math.ceil(rows / size), world)
    done = {k: record for k in mine if (record := complete_record(out, k))}
    changed = {k for k, part in rows_by_part(files, header, done) if input_digest(part) != done[k]["input_hash"]} \
        if done else set()
    if changed and not update_input:
        k = min(changed)
        raise InputError(f"{header['input']}: rows {k * size}-{min(rows, (k + 1) * size) - 1} are not those that "
                         f"part {k} of {out} was made from; a run resumes only on the input it started with (bring "
                         f"the dataset in step with this input: --update {out})")
    todo = [k for k in mine if k not in done or k in changed]
    counts = dict.fromkeys(("new", "changed", "kept", "removed"), 0)
    counts["kept"] = sum(done[k]["rows"] for k in done if k not in changed)
    calibration = calibration_of(header)
    for k, part_rows in rows_by_part(files, header, todo):
        texts, ids = [r.text for r in unique_ids(part_rows)], [r.id for r in part_rows]
        if (old := previous_part(out, k, header)) is not None:
            part, changes = update(old, model, texts, ids, batch_size)
            counts = {key: counts[key] + changes[key] for key in counts}
        else:
            emb, _ = encode_texts(model, texts, header["kind"], header["dim"], header["precision"], header["compute"],
                                  batch_size, calibration, prompt=header["prompt"])
            part = EmbeddingSet(emb, ids, header["fingerprint"], header["precision"], header["dim"], calibration,
                                header["similarity"], [content_hash(t) for t in texts], header["kind"],
                                header["compute"], header["prompt"])
            counts["new"] += len(ids)
        write_part(out, k, part, k * size, input_digest(part_rows))
    return counts


def encode_dataset(args, model: BiEncoder, prompt: str | None) -> int:
    """Write (or resume, or update) a sharded dataset with this process's share of the parts; under `accelerate
    launch` every process runs this, and the main process writes the manifest first and last."""
    from accelerate import PartialState
    from accelerate.utils import gather_object

    cpu_only = not torch.cuda.is_available()
    if cpu_only:
        share_cpu_cores()
    # without GPUs, only cpu=True makes accelerate join the launched processes (over gloo)
    state = PartialState(cpu=cpu_only and int(os.environ.get("WORLD_SIZE", "1")) > 1, timeout=DISTRIBUTED_TIMEOUT)
    out = args.update or args.output
    files = input_files(args.input)
    if args.compute in ("float32", "bf16"):
        model.to(state.device)
    progress = contextlib.nullcontext()
    if state.is_main_process:  # bars for every process, from the parts they write
        start_dataset(model, args, prompt, files, out)
        progress = PartsProgress(out, read_header(out), state.num_processes, enabled=not args.no_progress)
    state.wait_for_everyone()
    header = {**read_header(out), "input": str(args.input)}
    with progress:
        counts = encode_parts(model, files, out, header, state.process_index, state.num_processes,
                              bool(args.update), args.batch_size)
        every = gather_object([counts]) if state.num_processes > 1 else [counts]
    state.wait_for_everyone()
    if not state.is_main_process:
        return 0
    counts = {key: sum(c[key] for c in every) for key in counts}
    parts = math.ceil(header["rows"] / header["part_rows"])
    counts["removed"] += sum(p["rows"] for p in header["parts"] if p["first_row"] >= header["rows"])
    if (repeated := repeated_id(out, parts, header["part_rows"])) is not None:  # each part checked its own ids
        name, first, second = repeated
        place = {r.index: r.place for r in iter_rows(files, args.field, args.id_field, {first, second}.__contains__)}
        raise InputError(f"{place[second]}: duplicate id {name!r} (first at {place[first]}); ids must be unique. The "
                         f"parts written stay: correct the input, then run with --update {out}")
    finish(out, header, parts)
    if args.update:
        print(f"re-encoded {counts['new'] + counts['changed']} documents ({counts['new']} new, {counts['changed']} "
              f"changed), kept {counts['kept']}, removed {counts['removed']}: {out}")
    else:
        print(f"wrote {header['rows']} embeddings ({header['precision']}, dim {header['dim']}) in {parts} parts to "
              f"{out} (encoded {counts['new'] + counts['changed']}, kept {counts['kept']} from an earlier run)")
    return 0


def main(argv: list[str] | None = None, prog: str = "python -m twinfold.models.encode") -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--input", type=Path, help="documents (or queries): JSONL, CSV/TSV, Parquet, or a folder of them")
    p.add_argument("--field", default="text")
    p.add_argument("--id-field", default="_id")
    p.add_argument("--output", type=Path, help="embedding file to write, or with --format parquet a folder: a sharded "
                   "dataset (with --update: default EXISTING)")
    p.add_argument("--update", type=Path, metavar="EXISTING",
                   help="re-embed only new and changed texts of this file or dataset")
    p.add_argument("--check", type=Path, metavar="FILE", help="say whether FILE (or dataset) was made by --model")
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
    p.add_argument("--unpad", choices=("auto", "true", "false"), default="false", help=UNPAD_HELP)
    p.add_argument("--part-rows", type=int, default=PART_ROWS, help="sharded dataset: input rows per part")
    p.add_argument("--calibration-sample", type=int, default=CALIBRATION_SAMPLE,
                   help="sharded dataset with int8: input rows drawn (seed 0) to calibrate on")
    p.add_argument("--allow-pickle", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--overwrite", action="store_true", help="replace --output even if twinfold did not write it")
    args = p.parse_args(argv)
    if not args.check and (args.input is None or (args.output or args.update) is None):
        p.error("give --input and --output (or --update EXISTING), or --check FILE")
    if problem := non_positive_option({"--dim": args.dim, "--batch-size": args.batch_size,
                                       "--part-rows": args.part_rows, "--calibration-sample": args.calibration_sample}):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    dataset = is_dataset_path(args.check or args.update or args.output, args.format)
    try:
        if dataset and args.format == "safetensors":
            raise ValueError(f"--format safetensors: {args.check or args.update or args.output} is a folder, which "
                             "holds a sharded dataset of Parquet parts (--format parquet)")
        if dataset and args.update and args.output not in (None, args.update):
            raise ValueError(f"--output: a sharded dataset is updated in place ({args.update}); leave --output out")
        if args.output and not dataset:  # before the work, not after it
            check_embedding_output(args.output, args.overwrite)
        if args.output and dataset and not args.overwrite:
            check_dataset_output(args.output)
        if args.output or args.update:
            check_writable(args.output or args.update, "--output" if args.output else "--update")
        if dataset and args.update:
            old = read_header(args.update)
            if old is None:
                raise ValueError(f"--update: {args.update} is not a twinfold embedding dataset (no manifest)")
        else:
            old = load_embeddings(args.check or args.update) if args.check or args.update else None
        model = BiEncoder.from_pretrained(args.model, allow_pickle=args.allow_pickle, unpad=cli_setting(args.unpad))
        if args.dim is not None and args.dim > model.dim and not (args.check or args.update):
            raise ValueError(f"--dim: {args.dim} is larger than the model's dimension {model.dim}")
        prompt = model.prompt_text(args.prompt_name, args.prompt)
        texts, ids = read_texts(args.input, args.field, args.id_field) if args.input and not dataset else ([], [])
        if args.precision == "int8" and not args.update and not dataset and len(texts) < MIN_CALIBRATION_ROWS:
            raise too_few_to_calibrate(args.input, len(texts))
        if args.update and dataset:
            rebuild = (f"{prog} --model {args.model} --input {args.input} --output {args.update} --format parquet "
                       f"--precision {old['precision']} --dim {old['dim']} --kind {old['kind']} --overwrite"
                       + (f" --prompt-text {shlex.quote(old['prompt'])}" if old["prompt"] is not None else ""))
            check_updatable(old["fingerprint"], old["compute"], True, args.update, model, args.model, rebuild)
        elif args.update:
            rebuild = (f"{prog} --model {args.model} --input {args.input} --output {args.update} "
                       f"--precision {old.precision} --dim {old.dim} --kind {old.kind} "
                       f"--format {file_format(args.update)}"
                       + (f" --prompt-text {shlex.quote(old.prompt)}" if old.prompt is not None else ""))
            check_updatable(old.fingerprint, old.compute, old.hashes is not None and old.kind is not None,
                            args.update, model, args.model, rebuild)
    except (InputError, ModelLoadError, OSError, UnicodeDecodeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.check:
        fingerprint = model.fingerprint(old.compute)
        if old.fingerprint == fingerprint:
            print(f"{args.check} belongs to {args.model} (fingerprint {fingerprint}, {len(old)} embeddings)")
            return 0
        print(f"{args.check} does not belong to {args.model}: its fingerprint is {old.fingerprint}, the model's is "
              f"{fingerprint}; re-encode it with this model ({prog} --model {args.model} "
              f"--input DOCS.jsonl --output {args.check})")
        return 1
    keep_freed_memory()
    if dataset:
        try:
            return encode_dataset(args, model, prompt)
        except (InputError, OSError, UnicodeDecodeError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
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
