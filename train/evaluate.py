"""Retrieval evaluation of bi-encoders on a BEIR folder over every Matryoshka dim x precision, plus BM25 and STS.

    python -m twinfold.train.evaluate --model M [--model M2 ...] --data BEIR_DIR [--split test] [--dims 384,256,128,64]
        [--precision float32,int8,binary] [--bm25] [--sts TSV] [--out DIR] [--k 1,3,5,10,100]
        [--batch-size 64] [--ignore-identical-ids] [--strict] [--compute {float32,bf16,int8,onnx,onnx-int8}]
        [--query-prompt-name NAME | --query-prompt TEXT]

The corpus is encoded once per model at full dimension; every dim and precision is derived from that
encoding, and it is cached by the model's fingerprint for the evaluator's lifetime (training calls the same
evaluator before, during and after). `--corpus-embeddings PATH` (one model) searches a corpus embedded beforehand
instead, an embedding file or a sharded dataset of `models.encode`, part by part: only the queries are encoded.
"""
import argparse
import csv
import logging
import math
import re
import sys
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from twinfold.models import BiEncoder, ModelLoadError, check_same_model, truncate
from twinfold.models.embeddings import EmbeddingSet
from twinfold.models.encode import non_positive_option
from twinfold.models.files.atomic import check_output_folder, refuse_symlinks
from twinfold.models.quantize import (
    COMPUTE_HELP,
    COMPUTES,
    PRECISIONS,
    bytes_per_vector,
    calibrate_int8,
    quantize_binary,
    quantize_int8,
)
from twinfold.models.runtime import keep_freed_memory
from twinfold.models.search import RESCORE_MULTIPLIER, binary_search, exact_search, int8_search, search_parts
from twinfold.models.shards import ShardedEmbeddings, embedding_parts, load_embeddings
from twinfold.models.unpad import UNPAD_HELP, cli_setting
from twinfold.train.eval.beir import BeirData, load_beir
from twinfold.train.eval.bm25 import PRESETS, BM25Index, BM25Settings, settings_from
from twinfold.train.eval.metrics import DEFAULT_K_VALUES, evaluate_run, spearman, write_trec_run
from twinfold.train.eval.report import REPORT_FILES, markdown_table, write_report

log = logging.getLogger(__name__)

TREC_RUNS = "runs"  # the subfolder of `out_dir` holding TREC runs
REPORT_K = (10, 100)  # the report's columns need @10 and @100, so they are always computed


class StsFormatError(ValueError):
    """An STS file that cannot be read: the message names the file, the line and the field."""


class RetrievalEvaluator:
    """Scores models on one retrieval set; `evaluator(model, name)` returns one row per dim x precision.

    `dims`: Matryoshka prefixes to evaluate (default: the model's full dimension). `precisions`: any of
    float32, int8 (corpus-calibrated per-dimension ranges; float32 queries) and binary (Hamming candidates,
    `rescore_multiplier * k` of them, rescored with the float32 query). `sts`: a TSV of sentence pairs whose
    Spearman correlation is added to the float32 rows. `out_dir`: where TREC runs are written
    (`runs/<name>.<dim>.<precision>.trec`). `cache_size`: models whose full-dim embeddings are kept.
    `compute`: "float32", "bf16" or "int8" (see `BiEncoder.encode`).
    `bm25`: the settings of `bm25_rows`. `query_prompt_name` (a named prompt of each model) or `query_prompt` (a
    text): the prompt queries take in place of the model's query prefix.
    """

    def __init__(self, data: BeirData, dims=None, precisions=("float32",), k_values=DEFAULT_K_VALUES,
                 batch_size: int = 64, sts: str | Path | None = None, out_dir: str | Path | None = None,
                 rescore_multiplier: int = RESCORE_MULTIPLIER, cache_size: int = 2, show_progress_bar: bool = False,
                 compute: str = "float32", bm25: BM25Settings = BM25Settings(), query_prompt_name: str | None = None,
                 query_prompt: str | None = None):
        unknown = [p for p in precisions if p not in PRECISIONS]
        if unknown:
            raise ValueError(f"unknown precision {', '.join(unknown)}: choose from {', '.join(PRECISIONS)}")
        if any(int(k) < 1 for k in k_values) or (dims and any(int(d) < 1 for d in dims)):
            raise ValueError(f"k values and dims must be positive integers, got k={list(k_values)}, dims={dims}")
        self.data = data
        self.dims = sorted({int(d) for d in dims}, reverse=True) if dims else None
        self.precisions = tuple(precisions)
        self.k_values = tuple(sorted({int(k) for k in k_values} | set(REPORT_K)))
        self.batch_size = batch_size
        self.sts = load_sts(sts) if sts else None
        self.out_dir = Path(out_dir) if out_dir else None
        self.rescore_multiplier = rescore_multiplier
        self.cache_size = cache_size
        self.show_progress_bar = show_progress_bar
        self.compute = compute
        self.bm25 = bm25
        self.query_prompt_name, self.query_prompt = query_prompt_name, query_prompt
        self._cache: OrderedDict[str, dict] = OrderedDict()
        self._bm25_rows: list[dict] | None = None

    def describe(self) -> dict:
        """The data and settings behind the rows, for the report."""
        return {**self.data.describe(), "k_values": list(self.k_values), "precisions": list(self.precisions),
                "rescore_multiplier": self.rescore_multiplier, "compute": self.compute,
                "bm25": self.bm25.to_dict(), "sts": self.sts["path"] if self.sts else None,
                **{k: v for k, v in (("query_prompt_name", self.query_prompt_name),
                                     ("query_prompt", self.query_prompt)) if v is not None}}

    def __call__(self, model: BiEncoder, name: str) -> list[dict]:
        """Encode with `model` (corpus once, at full dim) and score every dim x precision; rows named `name`."""
        self._dims(model.dim, name)
        fingerprint = model.fingerprint(self.compute)
        emb = self._embeddings(model, fingerprint)
        rows = self.score_embeddings(emb["queries"], emb["corpus"], name, model.settings.normalize,
                                     model.settings.similarity)
        for row in rows:
            row["fingerprint"] = fingerprint
            if self.sts and row["precision"] == "float32":
                row["sts_spearman"] = sts_spearman(truncate(emb["sts"], row["dim"], model.settings.normalize), self.sts)
        return rows

    def score_embeddings(self, queries, corpus, name: str, normalize: bool = True,
                         similarity: str = "cosine") -> list[dict]:
        """Rows for full-dim embeddings (tensors or arrays) of the judged queries and the corpus, in `data`'s order.

        Documents are ranked by the model's `similarity`: cosine, or dot (inner product of the vectors as they
        are). Each dim is a prefix of the full vectors, re-normalised when `normalize` (as `encode(dim=...)`).
        """
        if similarity == "cosine":  # cosine = inner product of unit vectors, at every prefix
            queries, corpus = (F.normalize(torch.as_tensor(x).float(), dim=-1) for x in (queries, corpus))
            normalize = True
        rows = []
        for dim in self._dims(corpus.shape[1], name):
            dim_queries = truncate(torch.as_tensor(queries), dim, normalize)
            dim_corpus = truncate(torch.as_tensor(corpus), dim, normalize).numpy()
            for precision in self.precisions:
                start = time.perf_counter()
                scores, indices = self._search(dim_queries, dim_corpus, precision)
                rows.append({"model": name, "dim": dim, "precision": precision,
                             **self._score(scores, indices, name, f"{dim}.{precision}"),
                             **storage(bytes_per_vector(dim, precision))})
                log.info("%s dim %d %s: nDCG@10 %.4f (search and metrics %.2fs)", name, dim, precision,
                         rows[-1]["ndcg@10"], time.perf_counter() - start)
        return rows

    def score_stored(self, model: BiEncoder, corpus: EmbeddingSet | ShardedEmbeddings, name: str) -> list[dict]:
        """Rows for a corpus that `model` embedded beforehand (an embedding file, or a sharded dataset searched part
        by part): the queries are encoded with the corpus's compute; each dim (a float32 corpus; else its own dim)
        is scored in the corpus's precision."""
        fingerprint = model.fingerprint(corpus.compute)
        check_same_model(corpus.fingerprint, fingerprint, "the corpus embeddings and the queries")
        if self.precisions != (corpus.precision,):
            raise ValueError(f"--precision: the corpus embeddings are {corpus.precision}; evaluate them with "
                             f"--precision {corpus.precision}")
        dims = self._dims(corpus.dim, name)
        if corpus.precision != "float32" and dims != [corpus.dim]:
            raise ValueError(f"--dims: {corpus.precision} corpus embeddings are searched at their dim {corpus.dim} "
                             "only")
        ids = corpus.ids
        if len(ids) != len(self.data.corpus_ids) or set(ids) != set(self.data.corpus_ids):
            raise ValueError(f"the corpus embeddings hold {len(ids)} documents, not the {len(self.data.corpus_ids)} "
                             "of the evaluation corpus: embed that corpus (its title + text) with `twinfold encode`")
        queries = model.encode(self.data.query_texts, self.batch_size, kind="query", compute=corpus.compute,
                               prompt=model.prompt_text(self.query_prompt_name, self.query_prompt),
                               convert_to_tensor=True, show_progress_bar=self.show_progress_bar)
        cosine = corpus.similarity == "cosine"
        normalize = cosine or model.settings.normalize
        rows, k = [], self._k_searched
        for dim in dims:
            q = truncate(F.normalize(queries, dim=-1) if cosine else queries, dim, normalize)
            if corpus.precision == "binary":
                bits = np.concatenate([part.embeddings for part in embedding_parts(corpus)])
                scores, indices = binary_search(q, bits, k, self.rescore_multiplier)
            elif corpus.precision == "int8":
                scores, indices = search_parts(embedding_parts(corpus), lambda part: int8_search(
                    q, part.embeddings, part.calibration, k), k)
            else:
                scores, indices = search_parts(embedding_parts(corpus), lambda part: exact_search(q, truncate(
                    F.normalize(torch.tensor(part.embeddings), dim=-1) if cosine else torch.tensor(part.embeddings),
                    dim, normalize), k), k)
            rows.append({"model": name, "dim": dim, "precision": corpus.precision,
                         **self._score(scores, indices, name, f"{dim}.{corpus.precision}", ids),
                         **storage(bytes_per_vector(dim, corpus.precision)), "fingerprint": fingerprint})
        return rows

    def bm25_rows(self) -> list[dict]:
        """One row for BM25 with `self.bm25` settings (default: bm25s's, k1 1.5, b 0.75, no stemming)."""
        if self._bm25_rows is None:
            index = BM25Index(self.data.corpus_texts, self.bm25)
            indices, scores = index.search(self.data.query_texts, self._k_searched)
            self._bm25_rows = [{"model": "bm25", "dim": None, "precision": "sparse",
                                **self._score(torch.from_numpy(scores), torch.from_numpy(indices), "bm25", "sparse"),
                                **storage(index.bytes / len(self.data.corpus_ids)), "bm25": self.bm25.describe()}]
        return self._bm25_rows

    # --- internals ------------------------------------------------------------------------------------
    @property
    def _k_searched(self) -> int:
        return max(self.k_values) + int(self.data.ignore_identical_ids)

    def _dims(self, full_dim: int, name: str) -> list[int]:
        dims = self.dims or [full_dim]
        if max(dims) > full_dim:
            raise ValueError(f"dims {dims} exceed the model's dimension {full_dim} ({name})")
        return dims

    def _embeddings(self, model: BiEncoder, fingerprint: str) -> dict:
        """Full-dim query, corpus (and STS) embeddings of `model`, from the cache when its fingerprint is there."""
        if fingerprint in self._cache:
            self._cache.move_to_end(fingerprint)
            return self._cache[fingerprint]
        start = time.perf_counter()
        encode = dict(batch_size=self.batch_size, show_progress_bar=self.show_progress_bar, convert_to_tensor=True,
                      compute=self.compute)
        prompt = model.prompt_text(self.query_prompt_name, self.query_prompt)
        emb = {"queries": model.encode(self.data.query_texts, kind="query", prompt=prompt, **encode),
               "corpus": model.encode(self.data.corpus_texts, kind="document", **encode)}
        if self.sts:
            emb["sts"] = model.encode(self.sts["sentences"], kind="query", **encode)
        log.info("encoded %d queries and %d documents in %.1fs", len(self.data.query_ids),
                 len(self.data.corpus_ids), time.perf_counter() - start)
        self._cache[fingerprint] = emb
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return emb

    def _search(self, queries: torch.Tensor, corpus: np.ndarray, precision: str):
        k = self._k_searched
        if precision == "int8":
            calibration = calibrate_int8(corpus)
            return int8_search(queries, quantize_int8(corpus, calibration), calibration, k)
        if precision == "binary":
            return binary_search(queries, quantize_binary(corpus), k, self.rescore_multiplier)
        return exact_search(queries, corpus, k)

    def _score(self, scores: torch.Tensor, indices: torch.Tensor, name: str, what: str,
               ids: list[str] | None = None) -> dict[str, float]:
        """Metrics of a search result over `ids` (default: the corpus's; NaN scores are no hit); its TREC run is
        written when `out_dir` is set."""
        ids, skip_self = ids or self.data.corpus_ids, self.data.ignore_identical_ids
        run = {}
        for qid, row_scores, row_indices in zip(self.data.query_ids, scores.tolist(), indices.tolist()):
            hits = [(ids[i], s) for s, i in zip(row_scores, row_indices)
                    if not math.isnan(s) and not (skip_self and ids[i] == qid)]
            run[qid] = dict(hits[:max(self.k_values)])
        if self.out_dir:
            slug = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "model"
            write_trec_run(self.out_dir / TREC_RUNS / f"{slug}.{what}.trec", run, slug)
        return evaluate_run(run, self.data.qrels, self.k_values)


class GeneralEvaluator:
    """One general evaluation set, scored at the model's full dimension in float32 with the evaluators above: an
    STS file (`load_sts`: Spearman of the cosine, metric `sts_spearman`) or a BEIR folder (`ndcg@10` on `split`).
    Errors in the set (`StsFormatError`, `BeirFormatError`) are raised when it is made, before any model work."""

    def __init__(self, path: str | Path, split: str = "test", batch_size: int = 64):
        self.path, self.batch_size = str(path), batch_size
        if Path(path).is_dir():
            self.metric = "ndcg@10"
            self._retrieval = RetrievalEvaluator(load_beir(path, split), batch_size=batch_size, cache_size=1)
        else:
            self.metric = "sts_spearman"
            self._sts = load_sts(path)

    def __call__(self, model: BiEncoder) -> float:
        if self.metric == "ndcg@10":
            return self._retrieval(model, self.path)[0]["ndcg@10"]
        emb = model.encode(self._sts["sentences"], self.batch_size, kind="query", convert_to_tensor=True)
        return sts_spearman(emb, self._sts)


def storage(bytes_per_doc: float) -> dict:
    """Storage columns of a row: bytes per document and MB (10^6 bytes) per million documents (the same number)."""
    return {"bytes_per_doc": bytes_per_doc, "storage_mb_per_million_docs": bytes_per_doc}


def load_sts(path: str | Path) -> dict:
    """Sentence pairs and gold scores of a TSV with columns sentence1, sentence2, score (read with QUOTE_NONE)."""
    path = Path(path)
    if not path.exists():
        raise StsFormatError(f"{path}: STS file not found")
    left, right, gold = [], [], []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        missing = {"sentence1", "sentence2", "score"} - set(reader.fieldnames or [])
        if missing:
            raise StsFormatError(f"{path}:1: header lacks column(s) {', '.join(sorted(missing))} "
                                 "(expected tab-separated sentence1, sentence2, score)")
        for row in reader:
            try:
                gold.append(float(row["score"]))
            except (TypeError, ValueError):
                raise StsFormatError(f"{path}:{reader.line_num}: field 'score' is {row['score']!r}, "
                                     "not a number") from None
            if not row["sentence1"] or not row["sentence2"]:
                raise StsFormatError(f"{path}:{reader.line_num}: sentence1 or sentence2 is empty")
            left.append(row["sentence1"])
            right.append(row["sentence2"])
    if len(gold) < 2:
        raise StsFormatError(f"{path}: needs at least 2 sentence pairs, found {len(gold)}")
    sentences = list(dict.fromkeys(left + right))
    position = {s: i for i, s in enumerate(sentences)}
    return {"path": str(path), "sentences": sentences, "left": [position[s] for s in left],
            "right": [position[s] for s in right], "gold": np.asarray(gold)}


def sts_spearman(embeddings: torch.Tensor, sts: dict) -> float:
    """Spearman correlation between the pairs' cosine similarity and the gold scores."""
    emb = torch.nn.functional.normalize(embeddings.float(), dim=-1)
    cosine = (emb[sts["left"]] * emb[sts["right"]]).sum(-1).numpy()
    return spearman(cosine, sts["gold"])


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _precision_list(text: str) -> list[str]:
    values = [x.strip() for x in text.split(",") if x.strip()]
    bad = [v for v in values if v not in PRECISIONS]
    if bad or not values:
        raise argparse.ArgumentTypeError(f"precision must be a comma-separated subset of {','.join(PRECISIONS)}, "
                                         f"got {text!r}")
    return values


def main(argv: list[str] | None = None, prog: str = "python -m twinfold.train.evaluate") -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", required=True, help="model folder or name (repeat to compare)")
    p.add_argument("--data", required=True, type=Path, help="BEIR folder: corpus.jsonl, queries.jsonl, qrels/")
    p.add_argument("--corpus-embeddings", type=Path, metavar="PATH",
                   help="search this embedding file or sharded dataset of the corpus (one --model) instead of "
                        "encoding the corpus")
    p.add_argument("--split", default="test")
    p.add_argument("--dims", type=_int_list, help="Matryoshka dims, e.g. 384,256,128,64 (default: full)")
    p.add_argument("--precision", type=_precision_list, default=["float32"], help="float32,int8,binary")
    p.add_argument("--k", type=_int_list, default=list(DEFAULT_K_VALUES), help="cutoffs (10 and 100 always included)")
    p.add_argument("--bm25", action="store_true", help="add a BM25 row (bm25s)")
    p.add_argument("--bm25-preset", choices=PRESETS, help="bm25s (k1 1.5, b 0.75; default) or anserini (0.9, 0.4)")
    p.add_argument("--bm25-k1", type=float, help="BM25 k1 (overrides the preset)")
    p.add_argument("--bm25-b", type=float, help="BM25 b (overrides the preset)")
    p.add_argument("--bm25-stemmer", help="Snowball stemmer language, e.g. english (needs PyStemmer)")
    p.add_argument("--bm25-split-identifiers", action="store_true", help="index camelCase/snake_case parts too")
    p.add_argument("--sts", type=Path, help="TSV of sentence1, sentence2, score: adds Spearman to float32 rows")
    p.add_argument("--out", type=Path, help="write report.json, report.md, ndcg_vs_dim.png and TREC runs here")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--unpad", choices=("auto", "true", "false"), default="false", help=UNPAD_HELP)
    p.add_argument("--rescore-multiplier", type=int, default=RESCORE_MULTIPLIER,
                   help="binary: candidates per result to rescore")
    p.add_argument("--ignore-identical-ids", action="store_true", help="skip hits whose id is the query's id")
    p.add_argument("--strict", action="store_true", help="judgments naming unknown ids are an error")
    p.add_argument("--allow-pickle", action="store_true", help="allow pickle (.bin) weights")
    p.add_argument("--compute", default="float32", choices=COMPUTES, help=COMPUTE_HELP)
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--query-prompt-name", metavar="NAME", help="a named prompt of each model for the queries")
    prompt.add_argument("--query-prompt", metavar="TEXT", help="a prompt text for the queries")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--overwrite", action="store_true", help="write into --out even if it holds other files")
    args = p.parse_args(argv)
    keep_freed_memory()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.no_progress:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    if len(set(args.model)) != len(args.model):
        print("error: the same --model is given twice", file=sys.stderr)
        return 2
    if args.corpus_embeddings and len(args.model) > 1:
        print("error: --corpus-embeddings: the embeddings of one model; give one --model", file=sys.stderr)
        return 2
    if problem := non_positive_option({"--batch-size": args.batch_size,
                                       "--rescore-multiplier": args.rescore_multiplier}):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        if args.out and not args.overwrite:
            check_output_folder(args.out, {*REPORT_FILES.values(), TREC_RUNS},
                                "choose a new or empty folder or pass --overwrite")
        elif args.out:  # --overwrite lets the report replace other files, never write through a link
            refuse_symlinks(args.out, {*REPORT_FILES.values(), TREC_RUNS}, "choose another folder")
        data = load_beir(args.data, args.split, strict=args.strict, ignore_identical_ids=args.ignore_identical_ids)
        evaluator = RetrievalEvaluator(data, args.dims, args.precision, args.k, args.batch_size, args.sts,
                                       args.out, args.rescore_multiplier, show_progress_bar=not args.no_progress,
                                       compute=args.compute, bm25=settings_from(
                                           args.bm25_preset, k1=args.bm25_k1, b=args.bm25_b, stemmer=args.bm25_stemmer,
                                           split_identifiers=args.bm25_split_identifiers or None),
                                       query_prompt_name=args.query_prompt_name, query_prompt=args.query_prompt)
        stored = load_embeddings(args.corpus_embeddings) if args.corpus_embeddings else None
        rows = []
        for name in args.model:
            model = BiEncoder.from_pretrained(name, allow_pickle=args.allow_pickle, unpad=cli_setting(args.unpad))
            rows += evaluator.score_stored(model, stored, name) if stored else evaluator(model, name)
        if args.bm25:
            rows += evaluator.bm25_rows()
    except (ValueError, ModelLoadError, OSError) as e:  # BeirFormatError, StsFormatError: ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.out:
        write_report(rows, args.out, evaluator.describe())
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
