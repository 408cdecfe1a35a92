"""Vector stores (FAISS, PostgreSQL with pgvector) against exact search: a hand-made case, then SciFact-nano
embedded by a small random BERT; pgvector runs in a real PostgreSQL server (`postgres_dsn`)."""
import sys

import numpy as np
import psycopg
import pytest

from tests.helpers import REPO
from twinfold.models import BiEncoder, EmbeddingSet, FingerprintMismatch
from twinfold.models.files.atomic import OverwriteRefused
from twinfold.models.quantize import calibrate_int8, quantize_int8
from twinfold.models.search import int8_search
from twinfold.models.stores import (
    build_faiss,
    exact_hits,
    faiss_search,
    load_pgvector,
    main,
    pgvector_search,
    query_vectors,
    recall_at_k,
    store_vectors,
)
from twinfold.train.eval.beir import load_beir
from twinfold.train.evaluate import RetrievalEvaluator


@pytest.fixture(scope="module")
def nano(tiny_bert_path, data_dir):
    """(corpus, queries): EmbeddingSets of SciFact-nano's 1,000 documents and its judged queries (dim 128)."""
    model = BiEncoder.from_pretrained(tiny_bert_path, max_length=32)
    data = load_beir(data_dir / "scifact-nano")
    return tuple(EmbeddingSet(model.encode(texts, 64, kind=kind), ids, model.fingerprint(),
                              similarity=model.settings.similarity, kind=kind)
                 for texts, ids, kind in ((data.corpus_texts, data.corpus_ids, "document"),
                                          (data.query_texts, data.query_ids, "query")))


def _vectors(corpus, queries):
    return query_vectors(queries, corpus.fingerprint, corpus.similarity, corpus.dim)


def _hand_made():
    corpus = EmbeddingSet(np.array([[1, 0], [0.6, 0.8], [0, 1], [-1, 0]], np.float32), ["a", "b", "c", "d"], "fp")
    queries = EmbeddingSet(np.array([[0.8, 0.6], [-0.6, -0.8]], np.float32), ["q1", "q2"], "fp")
    return corpus, queries


def _ids(hits):
    return [list(h) for h in hits]


def test_hand_made_case_in_faiss():
    corpus, queries = _hand_made()
    for index in ("flat", "hnsw"):
        hits = faiss_search(build_faiss(corpus, index), corpus.ids, _vectors(corpus, queries), k=2)
        assert _ids(hits) == [["b", "a"], ["d", "a"]]  # q1: 0.96, 0.8; q2: 0.6, -0.6
        np.testing.assert_allclose(list(hits[0].values()), [0.96, 0.8], rtol=1e-6)
    # sign bits: a=10, b=11, c=01, d=00; q1=11 -> b (Hamming 0), then a or c, rescored: a (0.8 + -0.6 = 0.2)
    # and c (-0.8 + 0.6 = -0.2), so the top 2 after rescoring is b (1.4), a (0.2)
    hits = faiss_search(build_faiss(corpus, "binary-flat"), corpus.ids, _vectors(corpus, queries)[:1], k=2)
    assert hits == [{"b": pytest.approx(1.4), "a": pytest.approx(0.2)}]


def test_hand_made_case_in_pgvector(postgres_dsn):
    corpus, queries = _hand_made()
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        for column in ("vector", "halfvec", "bit"):
            load_pgvector(conn, corpus, "hand_made", column)
            hits = pgvector_search(conn, queries, 2, "hand_made")
            assert list(hits[0]) == ["b", "a"]
            assert hits[0]["b"] == pytest.approx(0.96 if column != "bit" else 1.4, abs=1e-3)
        assert conn.execute("SELECT count(*) FROM hand_made").fetchone()[0] == 4
        assert conn.execute("SELECT embedding::text FROM hand_made WHERE id = 'b'").fetchone()[0] == "11"


def test_flat_faiss_is_exact_search_and_hnsw_recall_is_high(nano):
    corpus, queries = nano
    vectors = _vectors(corpus, queries)
    exact = exact_hits(corpus, vectors, 10)
    flat = faiss_search(build_faiss(corpus, "flat"), corpus.ids, vectors, 10)
    assert _ids(flat) == _ids(exact)
    for found, want in zip(flat, exact):
        np.testing.assert_allclose(list(found.values()), list(want.values()), atol=1e-5)
    assert recall_at_k(faiss_search(build_faiss(corpus, "hnsw"), corpus.ids, vectors, 10), exact, 10) >= 0.99


def test_binary_faiss_rescoring_every_document_is_exact_binary_search(nano):
    corpus, queries = nano
    vectors = _vectors(corpus, queries)
    everything = len(corpus.ids) // 10  # candidates: the whole corpus, so Hamming ties cannot matter
    exact = exact_hits(corpus, vectors, 10, binary=True, rescore_multiplier=everything)
    for index in ("binary-flat", "binary-hnsw"):
        found = faiss_search(build_faiss(corpus, index), corpus.ids, vectors, 10, rescore_multiplier=everything)
        # scores, not ids: this random BERT gives many documents the same sign bits, hence equal scores
        np.testing.assert_allclose([list(h.values()) for h in found], [list(h.values()) for h in exact], atol=1e-5)


def test_pgvector_top10_is_exact_search_through_the_hnsw_index(nano, postgres_dsn):
    corpus, queries = nano
    exact = exact_hits(corpus, _vectors(corpus, queries), 10)
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        load_pgvector(conn, corpus, "nano")
        with conn.transaction():
            found = pgvector_search(conn, queries, 10, "nano", ef_search=1000)  # a search of the whole graph
            scans = conn.execute("SELECT idx_scan FROM pg_stat_xact_user_tables WHERE relname = 'nano'").fetchone()[0]
        assert scans == len(queries.ids)  # one index scan (HNSW: the only index it can order by) per query
        assert _ids(found) == _ids(exact)
        for got, want in zip(found, exact):
            np.testing.assert_allclose(list(got.values()), list(want.values()), atol=1e-5)
        assert recall_at_k(pgvector_search(conn, queries, 10, "nano"), exact, 10) >= 0.98  # ef_search 100
        load_pgvector(conn, corpus, "nano", "halfvec")
        assert recall_at_k(pgvector_search(conn, queries, 10, "nano"), exact, 10) >= 0.9


def test_pgvector_refuses_queries_of_another_model_and_a_table_it_did_not_make(nano, postgres_dsn):
    corpus, queries = nano
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        load_pgvector(conn, corpus, "guarded")
        other = EmbeddingSet(queries.embeddings, queries.ids, "another-fingerprint")
        with pytest.raises(FingerprintMismatch):
            pgvector_search(conn, other, 10, "guarded")
        conn.execute("CREATE TABLE users_notes (id int, note text)")
        conn.execute("INSERT INTO users_notes VALUES (1, 'keep me')")
        with pytest.raises(OverwriteRefused, match="table users_notes exists and was not made by twinfold"):
            load_pgvector(conn, corpus, "users_notes")
        assert conn.execute("SELECT note FROM users_notes").fetchall() == [("keep me",)]


def test_an_int8_file_is_stored_dequantised_and_a_binary_file_as_its_sign_bits(nano):
    corpus, queries = nano
    vectors = _vectors(corpus, queries)
    calibration = calibrate_int8(corpus.embeddings)
    int8 = EmbeddingSet(quantize_int8(corpus.embeddings, calibration), corpus.ids, corpus.fingerprint, "int8",
                        calibration=calibration)
    scores, _ = int8_search(vectors, int8.embeddings, calibration, 10)
    found = faiss_search(build_faiss(int8, "flat"), corpus.ids, vectors, 10)
    # scores, not ids: documents whose int8 codes are equal tie
    np.testing.assert_allclose([list(h.values()) for h in found], scores.numpy(), atol=1e-5)
    binary = EmbeddingSet(store_vectors(corpus, binary=True), corpus.ids, corpus.fingerprint, "binary", corpus.dim)
    assert store_vectors(binary, binary=True) is binary.embeddings
    with pytest.raises(ValueError, match="holds sign bits only"):
        build_faiss(binary, "hnsw")


def test_bench_stores_scores_every_store_as_train_evaluate_does(nano, data_dir, tmp_path, postgres_dsn):
    sys.path.insert(0, str(REPO / "scripts"))
    from bench_stores import parse_args, run

    corpus, queries = nano
    corpus.save(tmp_path / "corpus.parquet", format="parquet")
    queries.save(tmp_path / "queries.safetensors")
    rows = {r["store"]: r for r in run(parse_args([
        "--data", str(data_dir / "scifact-nano"), "--corpus", str(tmp_path / "corpus.parquet"),
        "--queries", str(tmp_path / "queries.safetensors"), "--dsn", postgres_dsn]))}
    evaluated = RetrievalEvaluator(load_beir(data_dir / "scifact-nano"), k_values=(10,)).score_embeddings(
        queries.embeddings, corpus.embeddings, "tiny", similarity=corpus.similarity)
    exact = rows["exact float32 (models.search)"]
    assert exact["ndcg"] == pytest.approx(evaluated[0]["ndcg@10"], abs=1e-12)
    assert rows["FAISS flat"]["recall_float"] == 1.0 and rows["FAISS flat"]["ndcg"] == exact["ndcg"]
    for store in ("FAISS hnsw", "pgvector vector HNSW", "pgvector halfvec HNSW"):
        assert abs(rows[store]["ndcg"] - exact["ndcg"]) <= 0.005, store
    assert set(rows) == {"exact float32 (models.search)", "exact sign bits, rescored (models.search)",
                         "FAISS flat", "FAISS hnsw", "FAISS binary-flat", "FAISS binary-hnsw",
                         "pgvector vector HNSW", "pgvector halfvec HNSW", "pgvector bit HNSW"}


def test_command_line_prints_recall_and_keeps_what_it_did_not_write(nano, tmp_path, postgres_dsn, capsys):
    corpus, queries = nano
    corpus.save(tmp_path / "corpus.parquet", format="parquet")
    queries.save(tmp_path / "queries.parquet", format="parquet")
    files = ["--embeddings", str(tmp_path / "corpus.parquet"), "--queries", str(tmp_path / "queries.parquet")]
    assert main(["faiss", *files, "--index", "flat", "--out", str(tmp_path / "flat.faiss")]) == 0
    assert "recall@10 against exact search: 1.0000 (50 queries" in capsys.readouterr().out
    (tmp_path / "mine.faiss").write_text("notes")
    assert main(["faiss", *files, "--out", str(tmp_path / "mine.faiss")]) == 2
    assert "mine.faiss exists; nothing was changed" in capsys.readouterr().err
    assert (tmp_path / "mine.faiss").read_text() == "notes"
    assert main(["pgvector", *files, "--dsn", postgres_dsn, "--table", "cli", "--ef-search", "1000"]) == 0
    out = capsys.readouterr().out
    assert "pgvector: 1000 rows of vector(128) with an HNSW index in table cli" in out
    assert "recall@10 against exact search: 1.0000 (50 queries" in out
