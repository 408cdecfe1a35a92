"""Pairs from a corpus alone (train.corpus_pairs): title -> text, independent crops, inverse cloze."""
import json

import pytest

from tests.helpers import REPO
from twinfold.train.config import DatasetConfig, load_config
from twinfold.train.corpus_pairs import corpus_pairs, main, sentences, write_corpus_pairs
from twinfold.train.data.pairs import load_pairs
from twinfold.train.eval.beir import BeirFormatError

WORDS = [f"w{i}" for i in range(200)]


def write_corpus(path, docs):
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return path


def rows(path):
    return [(r["anchor"], r["positive"]) for r in map(json.loads, path.read_text().splitlines())]


def test_title_is_the_query_and_the_text_the_positive(tmp_path):
    corpus = write_corpus(tmp_path / "c.jsonl", [
        {"_id": "a", "title": "Aspirin", "text": "Aspirin thins the blood."},
        {"_id": "b", "text": "No title here."},
        {"_id": 3, "title": "  Yeast ", "text": " Yeast ferments sugar. "},
    ])
    provenance = write_corpus_pairs(tmp_path / "p.jsonl", corpus, "title")
    assert rows(tmp_path / "p.jsonl") == [("Aspirin", "Aspirin thins the blood."), ("Yeast", "Yeast ferments sugar.")]
    assert (provenance["documents"], provenance["skipped"], provenance["rows_out"]) == (3, 1, 2)


def test_crops_are_runs_of_the_document_words_of_10_to_50_percent_drawn_independently(tmp_path):
    lengths = [9, 10, 37, 200]
    corpus = write_corpus(tmp_path / "c.jsonl", [{"_id": str(n), "title": "", "text": " ".join(WORDS[:n])}
                                                for n in lengths])
    out = tmp_path / "p.jsonl"
    provenance = write_corpus_pairs(out, corpus, "crop", per_doc=50)
    assert (provenance["documents"], provenance["skipped"], provenance["rows_out"]) == (4, 1, 150)  # 9 words: too few
    overlapping = apart = 0
    for k, (anchor, positive) in enumerate(rows(out)):
        n = lengths[1 + k // 50]
        spans = []
        for span in (anchor.split(), positive.split()):
            start = int(span[0][1:])
            assert span == WORDS[start:start + len(span)] and start + len(span) <= n  # a run of the document
            assert int(0.1 * n) <= len(span) <= int(0.5 * n)
            spans.append(range(start, start + len(span)))
        shared = set(spans[0]) & set(spans[1])
        overlapping += bool(shared)
        apart += not shared
    assert overlapping > 0 and apart > 0  # independent draws: both happen


def test_ict_takes_one_sentence_against_the_rest_and_keeps_it_one_time_in_ten(tmp_path):
    text = "First claim here. Second one! Is it third? Fourth and last."
    assert sentences(text) == ["First claim here.", "Second one!", "Is it third?", "Fourth and last."]
    corpus = write_corpus(tmp_path / "c.jsonl", [{"_id": "d", "title": "T", "text": text},
                                                {"_id": "e", "title": "One", "text": "Only one sentence."}])
    out = tmp_path / "p.jsonl"
    provenance = write_corpus_pairs(out, corpus, "ict", per_doc=9)
    parts = sentences(text)
    assert [a for a, _ in rows(out)] == parts  # every sentence once (per_doc above their number), in order
    for i, (anchor, positive) in enumerate(rows(out)):
        assert positive in ("T " + " ".join(parts[:i] + parts[i + 1:]), "T " + text)
    assert (provenance["skipped"], provenance["rows_out"]) == (1, 4)
    # over many passages the sentence stays in its context with probability 0.1
    many = write_corpus(tmp_path / "many.jsonl", [{"_id": str(i), "text": f"Alpha {i}. Beta {i}."}
                                                  for i in range(3000)])
    kept = [anchor in positive for anchor, positive in corpus_pairs(many, "ict", 1, 42, {})]
    assert len(kept) == 3000 and 0.085 < sum(kept) / 3000 < 0.115


def test_pairs_are_seeded_and_a_documents_pairs_do_not_depend_on_the_others(tmp_path):
    docs = [{"_id": str(i), "title": "", "text": " ".join(WORDS[i:i + 60])} for i in range(20)]
    corpus = write_corpus(tmp_path / "c.jsonl", docs)
    write_corpus_pairs(tmp_path / "a.jsonl", corpus, "crop", per_doc=2, seed=7)
    write_corpus_pairs(tmp_path / "b.jsonl", corpus, "crop", per_doc=2, seed=7)
    write_corpus_pairs(tmp_path / "c8.jsonl", corpus, "crop", per_doc=2, seed=8)
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert rows(tmp_path / "a.jsonl") != rows(tmp_path / "c8.jsonl")
    reversed_corpus = write_corpus(tmp_path / "r.jsonl", docs[::-1][:5])
    assert list(corpus_pairs(reversed_corpus, "crop", 2, 7, {})) == \
        [pair for i in range(19, 14, -1) for pair in rows(tmp_path / "a.jsonl")[2 * i:2 * i + 2]]


def test_the_corpus_is_read_one_document_at_a_time_and_a_failed_run_writes_nothing(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"_id": "a", "title": "A", "text": "Some text."}) + "\n{broken\n")
    pairs = corpus_pairs(corpus, "title", 1, 42, {})
    assert next(pairs) == ("A", "Some text.")  # before the bad line is read
    with pytest.raises(BeirFormatError, match=r"c.jsonl:2: not valid JSON"):
        next(pairs)
    out = tmp_path / "p.jsonl"
    with pytest.raises(BeirFormatError):
        write_corpus_pairs(out, corpus, "title")
    assert list(tmp_path.iterdir()) == [corpus]  # no pair file, provenance or temporary file


def test_command_errors_are_one_line_and_out_is_replaced_only_when_twinfold_wrote_it(tmp_path, capsys):
    untitled = write_corpus(tmp_path / "untitled.jsonl", [{"_id": "a", "text": "One. Two."}])
    out = tmp_path / "p.jsonl"

    def error(*args) -> str:
        assert main([*args]) == 2
        lines = capsys.readouterr().err.splitlines()
        assert len(lines) == 1
        return lines[0]

    assert error("--corpus", str(untitled), "--method", "title", "--out", str(out)) == \
        f"error: {untitled}: no document has a title; use --method crop or ict; nothing was written"
    assert not out.exists()
    assert error("--corpus", str(untitled), "--method", "crop", "--out", str(out)) == \
        f"error: {untitled}: every document has fewer than 10 words, too short for --method crop; nothing was written"
    assert error("--corpus", str(tmp_path / "none"), "--method", "ict", "--out", str(out)) == \
        f"error: {tmp_path / 'none'}: not found (a BEIR folder holds corpus.jsonl and queries.jsonl)"
    assert error("--corpus", str(untitled), "--method", "title", "--per-doc", "2", "--out", str(out)) == \
        "error: --per-doc 2: --method title makes one pair per document"
    assert "--per-doc" in error("--corpus", str(untitled), "--method", "ict", "--per-doc", "0", "--out", str(out))
    assert "is the --corpus file" in error("--corpus", str(untitled), "--method", "ict", "--out", str(untitled),
                                           "--overwrite")
    assert main(["--corpus", str(untitled), "--method", "ict", "--out", str(out)]) == 0
    assert capsys.readouterr().out == \
        f"wrote 1 pair(s) (ict) from 1 of 1 documents to {out}; 0 skipped (fewer than 2 sentences)\n"
    assert main(["--corpus", str(untitled), "--method", "ict", "--out", str(out), "--seed", "1"]) == 0  # its own
    out.write_text("edited\n")
    assert "is not a pair file twinfold wrote" in error("--corpus", str(untitled), "--method", "ict", "--out", str(out))
    assert out.read_text() == "edited\n"
    assert main(["--corpus", str(untitled), "--method", "ict", "--out", str(out), "--overwrite"]) == 0


@pytest.mark.parametrize("method, recipe", [("title", "title"), ("crop", "crop"), ("ict", "ict"),
                                            ("title", "title_mined")])
def test_scifact_nano_pairs_load_as_training_data_of_the_corpus_recipe(tmp_path, data_dir, method, recipe,
                                                                        monkeypatch):
    out = tmp_path / f"scifact-{method}.jsonl"
    assert main(["--corpus", str(data_dir / "scifact-nano"), "--method", method, "--out", str(out)]) == 0
    provenance = json.loads((tmp_path / f"scifact-{method}.jsonl.provenance.json").read_text())
    pairs = load_pairs(DatasetConfig(path=str(out), columns=provenance["columns"]))
    assert provenance["documents"] == 1000 and len(pairs) == provenance["rows_out"] == 1000 - provenance["skipped"]
    assert provenance["method"] == method and provenance["corpus"] == str(data_dir / "scifact-nano")
    monkeypatch.setenv("TWINFOLD_DATA", str(data_dir))
    monkeypatch.setenv("TWINFOLD_PAIRS", str(tmp_path))
    cfg = load_config(REPO / "configs" / f"scifact_corpus_{recipe}.yaml")
    assert cfg.data.train[0].path == str(out) and cfg.eval.general == [str(data_dir / "stsb" / "test.tsv")]
    mined = cfg.data.train[0].hard_negatives  # mined from the pair file's own positives: the corpus alone
    assert (mined is not None and mined.corpus is None) == recipe.endswith("_mined")

