"""Vector stores for an embedding file: FAISS indexes and PostgreSQL tables with pgvector, and top-k search
through them, measured against exact search.

    python -m twinfold.models.stores faiss --embeddings CORPUS [--index flat|hnsw|binary-flat|binary-hnsw]
        [--out FILE.faiss] [--queries QUERIES] [--k 10] [--m 32] [--ef-construction 200] [--ef-search 128]
    python -m twinfold.models.stores pgvector --embeddings CORPUS --dsn postgresql://... [--table NAME]
        [--column vector|halfvec|bit] [--queries QUERIES] [--k 10] [--m 16] [--ef-construction 64]
        [--ef-search 100]

A store holds float32 vectors (unit length when the model's similarity is cosine; an int8 file's rows
dequantised with its calibration, as `int8_search` scores them), or packed sign bits (a binary file's, or
the signs of a float file's vectors). Sign bits are searched by Hamming distance: the `rescore_multiplier * k`
nearest are rescored with the float32 query, as `binary_search` does. Row i of a FAISS index is row i of the
embedding file. A pgvector table has `id text primary key` and `embedding vector(d)`, `halfvec(d)` or `bit(d)`
with an HNSW index (vector_ip_ops, halfvec_ip_ops, bit_hamming_ops); its comment records the file's
fingerprint, so queries embedded by another model are refused. `halfvec` and `bit` need pgvector >= 0.7.
With `--queries` (an embedding file of the same model), each command prints the store's recall@k against
exact search over the same vectors.

Search results are one dict per query, document id -> score (inner product), best first.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

try:
    import faiss
    import psycopg
    from psycopg import sql
except ImportError as e:
    raise ImportError(f"models.stores needs faiss-cpu and psycopg: pip install 'twinfold[stores]' ({e})") from None

from twinfold.models.embeddings import EmbeddingSet, check_same_model
from twinfold.models.files.atomic import OverwriteRefused, atomic_write_bytes
from twinfold.models.quantize import dequantize_int8, quantize_binary
from twinfold.models.search import RESCORE_MULTIPLIER, binary_search, exact_search, rescore_binary, search_parts
from twinfold.models.shards import ShardedEmbeddings, embedding_parts, load_embeddings

FAISS_INDEXES = ("flat", "hnsw", "binary-flat", "binary-hnsw")
PG_OPCLASSES = {"vector": "vector_ip_ops", "halfvec": "halfvec_ip_ops", "bit": "bit_hamming_ops"}
DEFAULT_TABLE = "twinfold_embeddings"

Hits = list[dict[str, float]]


def store_vectors(corpus: EmbeddingSet, binary: bool) -> np.ndarray:
    """What a store holds for `corpus`: float32 rows [n, d], or packed sign bits [n, ceil(d/8)] if `binary`."""
    if corpus.precision == "binary":
        if not binary:
            raise ValueError("a binary embedding file holds sign bits only: store it in a binary index "
                             "(faiss binary-flat / binary-hnsw, pgvector bit)")
        return corpus.embeddings
    vectors = corpus.embeddings
    if corpus.precision == "int8":
        vectors = dequantize_int8(vectors, corpus.calibration)
    if corpus.similarity == "cosine":
        vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return quantize_binary(vectors) if binary else np.ascontiguousarray(vectors, dtype=np.float32)


def query_vectors(queries: EmbeddingSet, fingerprint: str, similarity: str, dim: int) -> np.ndarray:
    """float32 query rows ready to search a store built from a file with this fingerprint, similarity and dim."""
    check_same_model(queries.fingerprint, fingerprint)
    if queries.precision != "float32" or queries.dim != dim:
        raise ValueError(f"queries must be float32 embeddings of dim {dim} (the corpus's), got {queries.precision} "
                         f"of dim {queries.dim}: encode them with --dim {dim} and no --precision")
    vectors = queries.embeddings
    if similarity == "cosine":
        vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return np.ascontiguousarray(vectors, dtype=np.float32)


def exact_hits(corpus: EmbeddingSet | ShardedEmbeddings, queries: np.ndarray, k: int, binary: bool = False,
               rescore_multiplier: int = RESCORE_MULTIPLIER) -> Hits:
    """Exact top-k over what a store holds for `corpus`: `binary_search` over the sign bits of every part
    (1 bit a dimension), or `exact_search` part by part, the parts' top-k merged."""
    if binary:
        bits = np.concatenate([store_vectors(part, True) for part in embedding_parts(corpus)])
        scores, rows = binary_search(queries, bits, k, rescore_multiplier)
        return _hits(corpus.ids, scores.numpy(), rows.numpy())
    scores, rows = search_parts(embedding_parts(corpus),
                                lambda part: exact_search(queries, store_vectors(part, False), k), k)
    return _hits(corpus.ids, scores.numpy(), rows.numpy())


def recall_at_k(found: Hits, exact: Hits, k: int) -> float:
    """Mean over queries of the share of the exact top-k that `found` has in its top-k."""
    shares = [len(set(list(f)[:k]) & set(list(e)[:k])) / len(list(e)[:k]) for f, e in zip(found, exact, strict=True)]
    return float(np.mean(shares))


# --- FAISS ----------------------------------------------------------------------------------------------
def build_faiss(corpus: EmbeddingSet | ShardedEmbeddings, index: str = "hnsw", m: int = 32,
                ef_construction: int = 200):
    """A FAISS index over `corpus` (a dataset: added part by part): flat or HNSW inner product over float32
    rows, or flat or HNSW Hamming distance over sign bits (`binary-*`). Row i is `corpus.ids[i]`."""
    if index not in FAISS_INDEXES:
        raise ValueError(f"unknown FAISS index {index!r}: choose from {', '.join(FAISS_INDEXES)}")
    binary = index.startswith("binary")
    width = (corpus.dim + 7) // 8 * 8 if binary else corpus.dim  # binary indexes count bits: whole bytes
    if index == "flat":
        built = faiss.IndexFlatIP(width)
    elif index == "hnsw":
        built = faiss.IndexHNSWFlat(width, m, faiss.METRIC_INNER_PRODUCT)
    else:
        built = faiss.IndexBinaryFlat(width) if index == "binary-flat" else faiss.IndexBinaryHNSW(width, m)
    if index.endswith("hnsw"):
        built.hnsw.efConstruction = ef_construction
    for part in embedding_parts(corpus):
        built.add(store_vectors(part, binary))
    return built


def faiss_search(index, ids: list[str], queries: np.ndarray, k: int, ef_search: int = 128,
                 rescore_multiplier: int = RESCORE_MULTIPLIER) -> Hits:
    """Top-k of float32 `queries` (from `query_vectors`) in a `build_faiss` index whose rows are `ids`."""
    binary = isinstance(index, faiss.IndexBinary)
    width = min(rescore_multiplier * k if binary else k, index.ntotal)
    if hasattr(index, "hnsw"):
        index.hnsw.efSearch = max(ef_search, width)
    if not binary:
        scores, rows = index.search(queries, width)
        return _hits(ids, scores, rows)
    _, candidates = index.search(quantize_binary(queries), width)
    codes = np.stack([index.reconstruct(int(row)) for row in candidates.reshape(-1)])
    scores, where = rescore_binary(queries, codes.reshape(*candidates.shape, -1), k)
    return _hits(ids, scores.numpy(), np.take_along_axis(candidates, where.numpy(), axis=1))


def save_faiss(index, path: str | Path, overwrite: bool = False) -> None:
    """Write `index` atomically (read it back with faiss.read_index, or read_index_binary for binary-*);
    an existing file is replaced only with `overwrite`."""
    if Path(path).exists() and not overwrite:
        raise OverwriteRefused(f"{path} exists; nothing was changed. Choose another path or pass --overwrite")
    binary = isinstance(index, faiss.IndexBinary)
    atomic_write_bytes(path, (faiss.serialize_index_binary if binary else faiss.serialize_index)(index).tobytes())


# --- PostgreSQL with pgvector ---------------------------------------------------------------------------
def load_pgvector(conn, corpus: EmbeddingSet | ShardedEmbeddings, table: str = DEFAULT_TABLE, column: str = "vector",
                  m: int = 16, ef_construction: int = 64, overwrite: bool = False) -> None:
    """Create `table` holding `corpus` in a `column` column (vector, halfvec or bit) with an HNSW index, in
    one transaction on the psycopg connection `conn` (one COPY per part of a dataset). A table this function
    made before is replaced; any other table of that name raises `OverwriteRefused` unless `overwrite`."""
    if column not in PG_OPCLASSES:
        raise ValueError(f"unknown pgvector column type {column!r}: choose from {', '.join(PG_OPCLASSES)}")
    name = sql.Identifier(table)
    with conn.transaction():
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        version = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()[0]
        if column != "vector" and tuple(int(x) for x in version.split(".")[:2]) < (0, 7):
            raise ValueError(f"{column} columns with an HNSW index need pgvector >= 0.7; this server has {version}: "
                             "upgrade the extension or use --column vector")
        exists = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (name.as_string(conn),)).fetchone()[0]
        if exists and not overwrite and _table_settings(conn, table) is None:
            raise OverwriteRefused(f"table {table} exists and was not made by twinfold; nothing was changed. "
                                   "Choose another --table or pass --overwrite to replace it")
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(name))
        conn.execute(sql.SQL("CREATE TABLE {} (id text PRIMARY KEY, embedding {}({}))").format(
            name, sql.SQL(column), sql.Literal(corpus.dim)))
        for part in embedding_parts(corpus):
            vectors = store_vectors(part, column == "bit")
            with conn.cursor().copy(sql.SQL("COPY {} (id, embedding) FROM STDIN").format(name)) as copy:
                for doc_id, row in zip(part.ids, vectors, strict=True):
                    copy.write_row((doc_id, _pg_literal(row, column, corpus.dim)))
        conn.execute(sql.SQL("CREATE INDEX {} ON {} USING hnsw (embedding {}) WITH (m = {}, ef_construction = {})")
                     .format(sql.Identifier(f"{table}_embedding_hnsw"), name, sql.SQL(PG_OPCLASSES[column]),
                             sql.Literal(m), sql.Literal(ef_construction)))
        settings = {"fingerprint": corpus.fingerprint, "similarity": corpus.similarity, "dim": corpus.dim,
                    "column": column, "precision": corpus.precision}
        conn.execute(sql.SQL("COMMENT ON TABLE {} IS {}").format(name, sql.Literal(json.dumps({"twinfold": settings}))))


def pgvector_search(conn, queries: EmbeddingSet, k: int, table: str = DEFAULT_TABLE, ef_search: int = 100,
                    rescore_multiplier: int = RESCORE_MULTIPLIER) -> Hits:
    """Top-k of each query in a `load_pgvector` table, through its HNSW index (`ef_search` candidates; the
    planner's exact scan, which it may prefer for a small table, is switched off for these queries).

    Raises FingerprintMismatch if the queries come from another model than the table's documents.
    """
    settings = _table_settings(conn, table)
    if settings is None:
        raise ValueError(f"table {table} was not made by twinfold (load it with python -m twinfold.models.stores "
                         "pgvector)")
    vectors = query_vectors(queries, settings["fingerprint"], settings["similarity"], settings["dim"])
    column, dim = settings["column"], settings["dim"]
    binary = column == "bit"
    limit = rescore_multiplier * k if binary else k
    distance = sql.SQL("embedding {} %(q)s::{}({})").format(sql.SQL("<~>" if binary else "<#>"), sql.SQL(column),
                                                           sql.Literal(dim))
    query = sql.SQL("SELECT id, {} FROM {} ORDER BY {} LIMIT %(limit)s").format(
        sql.SQL("embedding::text") if binary else distance, sql.Identifier(table), distance)
    hits = []
    with conn.transaction():
        conn.execute("SELECT set_config('hnsw.ef_search', %s, true), set_config('enable_seqscan', 'off', true)",
                     (str(max(ef_search, limit)),))
        for vector in vectors:
            rows = conn.execute(query, {"q": _pg_literal(quantize_binary(vector) if binary else vector, column, dim),
                                        "limit": limit}).fetchall()
            if not binary:  # <#> is the negative inner product
                hits.append({doc_id: -float(d) for doc_id, d in rows})
                continue
            codes = np.packbits(np.array([[c == "1" for c in bits] for _, bits in rows]), axis=1)
            scores, where = rescore_binary(vector[None], codes[None], k)
            hits.append({rows[i][0]: s for s, i in zip(scores[0].tolist(), where[0].tolist())})
    return hits


def _table_settings(conn, table: str) -> dict | None:
    """The settings `load_pgvector` wrote in the table's comment; None for a missing or foreign table."""
    comment = conn.execute("SELECT obj_description(to_regclass(%s), 'pg_class')",
                           (sql.Identifier(table).as_string(conn),)).fetchone()[0]
    try:
        return json.loads(comment)["twinfold"]
    except (TypeError, ValueError, KeyError):
        return None


def _pg_literal(row: np.ndarray, column: str, dim: int) -> str:
    """pgvector's text form of one row: '[0.1,0.2]' for vector and halfvec, '0110' (dim bits) for bit."""
    if column == "bit":
        return (np.unpackbits(row)[:dim] + ord("0")).tobytes().decode()
    return "[" + ",".join(map(str, row.tolist())) + "]"


def _hits(ids: list[str], scores: np.ndarray, rows: np.ndarray) -> Hits:
    return [{ids[r]: float(s) for s, r in zip(srow, rrow) if r >= 0} for srow, rrow in zip(scores, rows)]


# --- command line ---------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m twinfold.models.stores", description=__doc__.splitlines()[0])
    commands = p.add_subparsers(dest="store", required=True)
    faiss_p = commands.add_parser("faiss", help="build a FAISS index")
    faiss_p.add_argument("--index", default="hnsw", choices=FAISS_INDEXES)
    faiss_p.add_argument("--out", type=Path, help="write the index here")
    faiss_p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    pg = commands.add_parser("pgvector", help="load into PostgreSQL with pgvector")
    pg.add_argument("--dsn", required=True, help="libpq connection string, e.g. postgresql://user@host/db")
    pg.add_argument("--table", default=DEFAULT_TABLE)
    pg.add_argument("--column", default="vector", choices=list(PG_OPCLASSES))
    pg.add_argument("--overwrite", action="store_true", help="replace a --table that twinfold did not make")
    for sub, m, ef_construction, ef_search in ((faiss_p, 32, 200, 128), (pg, 16, 64, 100)):
        sub.add_argument("--embeddings", required=True, type=Path,
                         help="embedding file or sharded dataset (folder) of the documents")
        sub.add_argument("--queries", type=Path, help="embedding file of queries: print recall@k against exact search")
        sub.add_argument("--k", type=int, default=10)
        sub.add_argument("--m", type=int, default=m, help="HNSW: links per node")
        sub.add_argument("--ef-construction", type=int, default=ef_construction, help="HNSW: candidates when building")
        sub.add_argument("--ef-search", type=int, default=ef_search, help="HNSW: candidates when searching")
        sub.add_argument("--rescore-multiplier", type=int, default=RESCORE_MULTIPLIER,
                         help="sign bits: Hamming candidates per result, rescored with the float32 query")
    args = p.parse_args(argv)
    try:
        corpus = load_embeddings(args.embeddings)
        queries = EmbeddingSet.load(args.queries) if args.queries else None
        run = _faiss_command if args.store == "faiss" else _pgvector_command
        found, binary, seconds = run(args, corpus, queries)
        if found is None:
            return 0
        vectors = query_vectors(queries, corpus.fingerprint, corpus.similarity, corpus.dim)
        exact = exact_hits(corpus, vectors, args.k, binary, args.rescore_multiplier)
    except (ValueError, OSError, psycopg.Error) as e:  # ValueError: FingerprintMismatch; OSError: OverwriteRefused
        print(f"error: {e}", file=sys.stderr)
        return 2
    hnsw = args.store == "pgvector" or args.index.endswith("hnsw")
    print(f"recall@{args.k} against exact search: {recall_at_k(found, exact, args.k):.4f} ({len(found)} queries, "
          + (f"ef_search {args.ef_search}, " if hnsw else "") + f"{seconds * 1000 / len(found):.2f} ms per query)")
    return 0


def _faiss_command(args, corpus: EmbeddingSet | ShardedEmbeddings,
                   queries: EmbeddingSet | None) -> tuple[Hits | None, bool, float]:
    start = time.perf_counter()
    index = build_faiss(corpus, args.index, args.m, args.ef_construction)
    print(f"faiss {args.index}: {len(corpus)} vectors of dim {corpus.dim} in {time.perf_counter() - start:.1f}s")
    if args.out:
        save_faiss(index, args.out, args.overwrite)
        print(f"wrote {args.out}")
    if queries is None:
        return None, False, 0.0
    vectors = query_vectors(queries, corpus.fingerprint, corpus.similarity, corpus.dim)
    start = time.perf_counter()
    found = faiss_search(index, corpus.ids, vectors, args.k, args.ef_search, args.rescore_multiplier)
    return found, args.index.startswith("binary"), time.perf_counter() - start


def _pgvector_command(args, corpus: EmbeddingSet | ShardedEmbeddings,
                      queries: EmbeddingSet | None) -> tuple[Hits | None, bool, float]:
    with psycopg.connect(args.dsn, autocommit=True) as conn:
        start = time.perf_counter()
        load_pgvector(conn, corpus, args.table, args.column, args.m, args.ef_construction, args.overwrite)
        print(f"pgvector: {len(corpus)} rows of {args.column}({corpus.dim}) with an HNSW index in table "
              f"{args.table} in {time.perf_counter() - start:.1f}s")
        if queries is None:
            return None, False, 0.0
        start = time.perf_counter()
        found = pgvector_search(conn, queries, args.k, args.table, args.ef_search, args.rescore_multiplier)
        return found, args.column == "bit", time.perf_counter() - start


if __name__ == "__main__":
    sys.exit(main())
