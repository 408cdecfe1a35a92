"""Pseudo-queries and the GPL loop (train.generate, train.adapt) on tiny random generator, teacher and student
models: generated pair files are deterministic and resume to the same bytes, the loop runs end to end and reuses
its steps, bad generators and folders are one-line errors."""
import json

import pytest
import torch

from tests.builders import small_beir
from twinfold.models.generator import QueryGenerator
from twinfold.train.adapt import main as adapt
from twinfold.train.corpus_pairs import main as pairs
from twinfold.train.generate import partial_path, write_generated_pairs

SMALL = ["--per-doc", "2", "--batch-size", "4", "--max-new-tokens", "6"]


def _save(model, minilm_path, folder):
    from transformers import AutoTokenizer

    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(minilm_path).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def t5_generator(tmp_path_factory, minilm_path):
    """A 1-layer random T5ForConditionalGeneration (doc2query's architecture) with MiniLM's tokenizer."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(vocab_size=30522, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2, pad_token_id=0,
                      eos_token_id=102, decoder_start_token_id=0)
    return _save(T5ForConditionalGeneration(config), minilm_path, tmp_path_factory.mktemp("t5-generator"))


@pytest.fixture(scope="module")
def causal_generator(tmp_path_factory, minilm_path):
    """A 1-layer random Qwen3ForCausalLM with MiniLM's tokenizer."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=512,
                         pad_token_id=0, eos_token_id=102)
    return _save(Qwen3ForCausalLM(config), minilm_path, tmp_path_factory.mktemp("causal-generator"))


@pytest.fixture(scope="module")
def corpus(data_dir, tmp_path_factory):
    return small_beir(data_dir / "scifact-nano", tmp_path_factory.mktemp("beir"), queries=3, others=9)


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


class Stopping(QueryGenerator):
    """The real generator, stopped (as by Ctrl-C) before its batch number `stop_at`, counting its calls."""

    stop_at, calls = None, 0

    def generate(self, texts, per_text, seed):
        type(self).calls += 1
        if type(self).calls == self.stop_at:
            raise KeyboardInterrupt
        return super().generate(texts, per_text, seed)


def test_generated_pairs_are_seeded_and_a_stopped_run_resumes_to_the_same_file(t5_generator, corpus, tmp_path):
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    for out in (first, second):
        assert pairs(["--corpus", str(corpus), "--method", "generate", "--generator", str(t5_generator),
                      "--out", str(out), *SMALL]) == 0
    assert first.read_bytes() == second.read_bytes()
    documents = [json.loads(line) for line in (corpus / "corpus.jsonl").read_text().splitlines()]
    got = rows(first)
    assert all(set(r) == {"anchor", "positive"} and r["anchor"] for r in got)
    assert {r["positive"] for r in got} <= {(d.get("title", "") + " " + d["text"]).strip() for d in documents}
    provenance = json.loads((tmp_path / "a.jsonl.provenance.json").read_text())
    assert provenance["method"] == "generate" and provenance["documents"] == len(documents)
    assert provenance["rows_out"] == len(got) <= 2 * len(documents) and not partial_path(first).exists()

    resumed = tmp_path / "c.jsonl"
    generator = Stopping.from_pretrained(t5_generator, max_new_tokens=6)
    Stopping.stop_at = 3
    with pytest.raises(KeyboardInterrupt):
        write_generated_pairs(resumed, corpus, generator, str(t5_generator), 2, 42, 4)
    assert not resumed.exists()
    with open(partial_path(resumed), "ab") as f:
        f.write(b'{"anchor": "a torn')  # a write cut short by the stop
    Stopping.stop_at, Stopping.calls = None, 0
    write_generated_pairs(resumed, corpus, generator, str(t5_generator), 2, 42, 4)
    batches = -(-len(documents) // 4)
    assert Stopping.calls == batches - 2  # the two finished batches were not generated again
    assert resumed.read_bytes() == first.read_bytes()


def test_causal_generators_continue_the_prompt_and_settings_change_the_key(causal_generator, corpus, tmp_path):
    out = tmp_path / "pairs.jsonl"
    assert pairs(["--corpus", str(corpus), "--method", "generate", "--generator", str(causal_generator),
                  "--out", str(out), "--prompt", "Document: {text} Query:", *SMALL]) == 0
    generator = QueryGenerator.from_pretrained(causal_generator, prompt="Document: {text} Query:")
    assert generator.kind == "causal" and generator.tokenizer.padding_side == "left"
    assert generator.model_input("word " * 400).count("word") == 300  # the document cut to --max-doc-tokens
    got = rows(out)
    assert got and all(r["anchor"] and "Document:" not in r["anchor"] for r in got)  # new tokens only
    # a partial file of other settings is started over, not continued
    partial_path(out).write_text('{"key": "other"}\n{"anchor": "x", "positive": "y", "doc": "1"}\n'
                                 '{"documents_done": 4}\n')
    out.unlink()
    (tmp_path / "pairs.jsonl.provenance.json").unlink()
    assert pairs(["--corpus", str(corpus), "--method", "generate", "--generator", str(causal_generator),
                  "--out", str(out), "--prompt", "Document: {text} Query:", *SMALL]) == 0
    assert rows(out) == got


def test_bad_generators_and_options_are_one_line_errors(tiny_bert_path, t5_generator, corpus, tmp_path, capsys):
    out = tmp_path / "pairs.jsonl"

    def error(*argv):
        assert pairs(["--corpus", str(corpus), "--out", str(out), *map(str, argv)]) == 2
        message = capsys.readouterr().err.strip()
        assert "\n" not in message and not out.exists() and not partial_path(out).exists()
        return message

    assert error("--method", "generate", "--generator", tiny_bert_path) == \
        f"error: --generator {tiny_bert_path}: not a generation model (config.json architectures ['BertModel']: " \
        "neither a seq2seq nor a causal language model)"
    assert error("--method", "generate") == "error: --method generate needs --generator MODEL"
    assert error("--method", "title", "--generator", t5_generator) == \
        "error: --generator: only --method generate uses a generator, not --method title"
    assert error("--method", "generate", "--generator", t5_generator, "--prompt", "no slot") == \
        "error: --prompt 'no slot': write {text} exactly once, where the document goes"
    assert error("--method", "generate", "--generator", t5_generator, "--top-p", "0") == \
        "error: --top-p: 0.0 must be in (0, 1]"


def test_adapt_runs_the_loop_end_to_end_and_reuses_its_steps(t5_generator, cross_encoder_path, tiny_bert_path,
                                                             corpus, tmp_path, capsys):
    out = tmp_path / "adapt"
    argv = ["--corpus", str(corpus), "--generator", str(t5_generator), "--teacher", str(cross_encoder_path),
            "--model", str(tiny_bert_path), "--out", str(out), "--queries-per-doc", "2", "--max-new-tokens", "6",
            "--eval", str(corpus), "train.max_steps=2", "train.batch_size=4", "model.max_length=32"]
    assert adapt(argv) == 0, capsys.readouterr().err
    scored = rows(out / "scored.jsonl")
    assert scored and all({"score_positive", "score_negative_1"} <= set(r) for r in scored)
    recipe = (out / "recipe.yaml").read_text()
    assert "kind: margin_mse" in recipe and "teacher_temperature: 1.0" in recipe
    card = json.loads((out / "run" / "final" / "twinfold.json").read_text())
    assert card["training"]["loss"]["kind"] == "margin_mse"
    metrics = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["step"] == 0 and "eval" in metrics[0] and any(m.get("step") == 2 and "eval" in m
                                                                       for m in metrics)
    stamps = {p: p.stat().st_mtime_ns for p in (out / "generated.jsonl", out / "scored.jsonl")}
    capsys.readouterr()
    assert adapt(argv) == 0
    assert "exists" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing generated or scored again


def test_adapt_refuses_a_folder_it_did_not_write_and_a_generator_that_is_not_one(
        t5_generator, cross_encoder_path, tiny_bert_path, corpus, tmp_path, capsys):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep")
    base = ["--corpus", str(corpus), "--teacher", str(cross_encoder_path), "--model", str(tiny_bert_path)]
    assert adapt([*base, "--generator", str(t5_generator), "--out", str(user)]) == 2
    assert capsys.readouterr().err.strip() == f"error: --out {user}: holds files that `twinfold adapt` did not " \
                                              "write (notes.txt); choose a new folder"
    assert sorted(p.name for p in user.iterdir()) == ["notes.txt"]
    assert adapt([*base, "--generator", str(tiny_bert_path), "--out", str(tmp_path / "new")]) == 2
    assert "not a generation model" in capsys.readouterr().err


def test_prepare_only_starts_from_a_recipe_and_prints_the_training_command(t5_generator, cross_encoder_path,
                                                                           tiny_bert_path, corpus, tmp_path, capsys):
    from twinfold.train.config import load_config

    recipe = tmp_path / "base.yaml"
    recipe.write_text(f"model:\n  name_or_path: {tiny_bert_path}\n  max_length: 32\nloss:\n  kind: kl\n"
                      "train:\n  seed: 7\n  lr: 1.0e-4\n")
    out = tmp_path / "adapt"
    assert adapt(["--corpus", str(corpus), "--generator", str(t5_generator), "--teacher", str(cross_encoder_path),
                  "--recipe", str(recipe), "--out", str(out), "--max-new-tokens", "4", "--prepare-only",
                  "train.epochs=2"]) == 0
    assert f"accelerate launch -m twinfold.train {out / 'recipe.yaml'} train.epochs=2" in capsys.readouterr().out
    cfg = load_config(out / "recipe.yaml", ["train.epochs=2"])
    assert (cfg.model.name_or_path, cfg.model.max_length, cfg.loss.kind, cfg.loss.teacher_temperature) == \
        (str(tiny_bert_path), 32, "kl", 1.0)
    assert (cfg.train.seed, cfg.train.lr, cfg.train.epochs, cfg.train.resume) == (7, 1e-4, 2, True)
    assert cfg.data.train[0].path == str((out / "scored.jsonl").resolve()) and not (out / "run").exists()
