"""The BEIR loader: what it reads, and errors that name the file, the line and what to do."""
import pytest

from twinfold.train.eval.beir import BeirFormatError, load_beir

CORPUS = '{"_id": "d1", "title": "Title", "text": "first"}\n{"_id": "d2", "text": "second"}\n'
QUERIES = '{"_id": "q1", "text": "one"}\n{"_id": "q2", "text": "two"}\n{"_id": "q3", "text": "unjudged"}\n'
QRELS = "query-id\tcorpus-id\tscore\nq1\td1\t2\nq1\td2\t0\nq2\td2\t1\n"


def _folder(tmp_path, corpus=CORPUS, queries=QUERIES, qrels=QRELS, split="test"):
    (tmp_path / "qrels").mkdir(exist_ok=True)
    (tmp_path / "corpus.jsonl").write_text(corpus)
    (tmp_path / "queries.jsonl").write_text(queries)
    (tmp_path / "qrels" / f"{split}.tsv").write_text(qrels)
    return tmp_path


def test_reads_corpus_judged_queries_and_graded_qrels(tmp_path):
    data = load_beir(_folder(tmp_path))
    assert data.corpus_ids == ["d1", "d2"]
    assert data.corpus_texts == ["Title first", "second"]  # title + " " + text, stripped
    assert (data.query_ids, data.query_texts) == (["q1", "q2"], ["one", "two"])  # q3 has no judgment
    assert data.qrels == {"q1": {"d1": 2, "d2": 0}, "q2": {"d2": 1}}
    assert data.warnings == [] and not data.ignore_identical_ids
    assert data.describe()["judgments"] == 3


def test_judgments_naming_unknown_ids_are_counted_and_skipped_or_fatal_when_strict(tmp_path, caplog):
    folder = _folder(tmp_path, qrels=QRELS + "q9\td1\t1\nq8\td1\t1\nq2\td7\t1\n")
    data = load_beir(folder)
    assert data.qrels == {"q1": {"d1": 2, "d2": 0}, "q2": {"d2": 1}}
    assert data.warnings == [
        f"{folder}/qrels/test.tsv: judgments naming queries not in queries.jsonl: 2 (first at line 5: 'q9'); skipped",
        f"{folder}/qrels/test.tsv: judgments naming documents not in corpus.jsonl: 1 (first at line 7: 'd7'); skipped",
    ]
    assert "q9" in caplog.text
    with pytest.raises(BeirFormatError, match=r"test.tsv: judgments naming queries not in .*: 2 .*line 5.*--strict"):
        load_beir(folder, strict=True)


@pytest.mark.parametrize("files, message", [
    ({"corpus": CORPUS + '{"_id": "d1", "text": "again"}\n'},
     r"corpus.jsonl:3: duplicate _id 'd1' \(first at line 1\)"),
    ({"queries": QUERIES + '{"_id": "q1", "text": "x"}\n'}, r"queries.jsonl:4: duplicate _id 'q1'"),
    ({"corpus": CORPUS + "{not json\n"}, r"corpus.jsonl:3: not valid JSON"),
    ({"corpus": '{"text": "no id"}\n'}, r"corpus.jsonl:1: no '_id' field"),
    ({"queries": '{"_id": "q1", "text": 5}\n'}, r"queries.jsonl:1: field 'text' is missing or not"),
    ({"corpus": "\n"}, r"corpus.jsonl: no documents"),
    ({"qrels": "query-id\tcorpus-id\tscore\nq1\td1\n"}, r"test.tsv:2: expected 3 tab-separated fields"),
    ({"qrels": "q1\td1\thigh\n"}, r"test.tsv:1: score 'high' is not an integer grade"),
    ({"qrels": QRELS + "q1\td1\t1\n"}, r"test.tsv:5: query 'q1' judges document 'd1' a second time"),
    ({"qrels": "query-id\tcorpus-id\tscore\nq9\td1\t1\n"}, r"no judgment names a query of queries.jsonl"),
])
def test_bad_files_are_clear_errors(tmp_path, files, message):
    with pytest.raises(BeirFormatError, match=message):
        load_beir(_folder(tmp_path, **files))


def test_missing_files_and_splits(tmp_path):
    with pytest.raises(BeirFormatError, match="not a folder"):
        load_beir(tmp_path / "nowhere")
    folder = _folder(tmp_path)
    with pytest.raises(BeirFormatError, match=r"qrels/dev.tsv: not found; splits in this folder: test"):
        load_beir(folder, split="dev")
    (folder / "queries.jsonl").unlink()
    with pytest.raises(BeirFormatError, match="queries.jsonl: not found"):
        load_beir(folder)


def test_shared_scifact_nano(data_dir):
    data = load_beir(data_dir / "scifact-nano")
    assert (len(data.corpus_ids), len(data.query_ids)) == (1000, 50)
    assert all(grade > 0 for judged in data.qrels.values() for grade in judged.values())


def test_all_zero_grades_null_ids_and_empty_texts_are_refused(tmp_path):
    qrels = tmp_path / "qrels" / "test.tsv"
    with pytest.raises(BeirFormatError) as e:
        load_beir(_folder(tmp_path, qrels="query-id\tcorpus-id\tscore\nq1\td1\t0\nq2\td2\t0\n"))
    assert str(e.value) == (f"{qrels}: no judgment has a grade above 0, so no query has a relevant document and "
                            "every metric would be 0; check the score column (relevant: 1 or more)")
    for name, corpus, queries, line, problem in [
        ("corpus", CORPUS + '{"_id": null, "text": "third"}\n', QUERIES, 3,
         "'_id' is null; an id is a string or an integer"),
        ("queries", CORPUS, '{"_id": "q1", "text": "one"}\n{"_id": ["q2"], "text": "two"}\n', 2,
         "'_id' is [\"q2\"]; an id is a string or an integer"),
        ("corpus", CORPUS + '{"_id": "d3", "title": " ", "text": "\\u200b"}\n', QUERIES, 3,
         "the text (with its title) is empty; give it a text or remove the line"),
        ("queries", CORPUS, QUERIES + '{"_id": "q4", "text": "  "}\n', 4,
         "the text is empty; give it a text or remove the line"),
    ]:
        with pytest.raises(BeirFormatError) as e:
            load_beir(_folder(tmp_path, corpus=corpus, queries=queries))
        assert str(e.value) == f"{tmp_path / (name + '.jsonl')}:{line}: {problem}"
