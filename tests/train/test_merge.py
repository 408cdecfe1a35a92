"""Weight merging (models.merge) and `twinfold merge` (train.merge): exact interpolation, checks, automatic alpha."""
import json

import pytest
import torch

from tests.builders import small_beir, small_sts
from twinfold.models import BiEncoder
from twinfold.models.merge import interpolate
from twinfold.train.eval.beir import load_beir
from twinfold.train.evaluate import GeneralEvaluator, RetrievalEvaluator
from twinfold.train.merge import choose_alpha, main


def state(folder) -> dict[str, torch.Tensor]:
    return BiEncoder.from_pretrained(folder).encoder.state_dict()


@pytest.fixture(scope="module")
def tuned_path(tmp_path_factory, tiny_bert_path):
    """The tiny BERT with every float weight moved by seeded noise: a "fine-tuned" model of the same architecture."""
    model = BiEncoder.from_pretrained(tiny_bert_path)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.save_pretrained(tmp_path_factory.mktemp("tuned") / "model")


def test_alpha_0_is_the_base_1_the_tuned_model_and_one_half_their_average(tmp_path, tiny_bert_path, tuned_path,
                                                                         capsys):
    base, tuned = state(tiny_bert_path), state(tuned_path)
    for alpha, expected in ((0, base), (1, tuned), (0.5, {k: (base[k] + tuned[k]) / 2 for k in base})):
        out = tmp_path / f"merged-{alpha}"
        assert main([str(tiny_bert_path), str(tuned_path), "--alpha", str(alpha), "--out", str(out)]) == 0
        merged = state(out)
        assert merged.keys() == expected.keys()
        assert all(torch.equal(merged[k], expected[k]) for k in expected), alpha
    printed = capsys.readouterr().out.splitlines()[-1]
    record = json.loads((out / "twinfold.json").read_text())["merge"]
    assert record["alpha"] == 0.5 and record["formula"] == "base * (1 - alpha) + tuned * alpha"
    assert record["base"]["fingerprint"] == BiEncoder.from_pretrained(tiny_bert_path).fingerprint()
    assert record["tuned"]["fingerprint"] == BiEncoder.from_pretrained(tuned_path).fingerprint()
    assert printed.endswith(f"(fingerprint {BiEncoder.from_pretrained(out).fingerprint()})")
    assert "## Merge" in (out / "README.md").read_text()


def test_interpolation_is_computed_in_float32_and_integer_tensors_must_agree():
    base = {"w": torch.tensor([1.0, -2.0], dtype=torch.bfloat16), "ids": torch.tensor([0, 1])}
    tuned = {"w": torch.tensor([3.0, 2.0], dtype=torch.bfloat16), "ids": torch.tensor([0, 1])}
    merged = interpolate(base, tuned, 0.25)
    assert merged["w"].dtype == torch.bfloat16 and merged["w"].tolist() == [1.5, -1.0]
    assert torch.equal(merged["ids"], base["ids"])
    with pytest.raises(ValueError, match="tensor ids .* is not floating-point"):
        interpolate(base, {**tuned, "ids": torch.tensor([1, 0])}, 0.5)


def test_the_merged_folder_loads_in_sentence_transformers_like_in_twinfold(tmp_path, tiny_bert_path, tuned_path):
    from sentence_transformers import SentenceTransformer

    out = tmp_path / "merged"
    assert main([str(tiny_bert_path), str(tuned_path), "--alpha", "0.3", "--out", str(out)]) == 0
    texts = ["a query about proteins", "yeast cells divide"]
    ours = BiEncoder.from_pretrained(out).encode(texts, convert_to_tensor=True)
    theirs = SentenceTransformer(str(out), device="cpu").encode(texts, convert_to_tensor=True)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_models_that_differ_are_one_line_errors_naming_the_difference(tmp_path, tiny_bert_path, capsys):
    from transformers import AutoTokenizer, BertConfig, BertModel

    def variant(name, layers=2, pooling=None, extra_token=None):
        folder = tmp_path / name
        config = BertConfig.from_pretrained(tiny_bert_path)
        config.num_hidden_layers = layers
        torch.manual_seed(0)
        BertModel(config).save_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(tiny_bert_path)
        if extra_token:
            tokenizer.add_tokens([extra_token])
        tokenizer.save_pretrained(folder)
        if pooling:
            BiEncoder.from_pretrained(folder, pooling=pooling).save_pretrained(tmp_path / f"{name}-st")
            return tmp_path / f"{name}-st"
        return folder

    out = tmp_path / "out"
    cases = {variant("layers", layers=1): "config.json num_hidden_layers (2 vs 1)",
             variant("token", extra_token="[NEW]"): "tokenizer vocabulary (30522 entries vs 30523 entries)",
             variant("cls", pooling="cls"): "setting pooling ('mean' vs 'cls')"}
    for tuned, difference in cases.items():
        assert main([str(tiny_bert_path), str(tuned), "--alpha", "0.5", "--out", str(out)]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]  # no progress bars
        assert len(err) == 1 and err[0].startswith(f"error: BASE and TUNED differ in {difference}; "), err
        assert not out.exists()
    with pytest.raises(SystemExit):  # argparse: exit code 2
        main([str(tiny_bert_path), str(tiny_bert_path), "--alpha", "1.5", "--out", str(out)])
    assert "is not in [0, 1]" in capsys.readouterr().err
    for args, message in ((["--alpha", "auto"], "--alpha auto needs --dev BEIR_DIR and at least one --general"),
                          (["--alpha", "0.5", "--dev", str(tmp_path)], "give them with --alpha auto only")):
        assert main([str(tiny_bert_path), str(tiny_bert_path), *args, "--out", str(out)]) == 2
        assert message in capsys.readouterr().err

def test_choose_alpha_keeps_the_gain_share_with_the_largest_general_score():
    scores = [{"alpha": 0.0, "dev": 0.5, "general": 0.9}, {"alpha": 0.25, "dev": 0.5625},
              {"alpha": 0.5, "dev": 0.6, "general": 0.8}, {"alpha": 0.75, "dev": 0.625, "general": 0.8},
              {"alpha": 1.0, "dev": 0.625, "general": 0.7}]
    # the gain is 0.125; keeping 75% needs dev >= 0.59375: alphas 0.5, 0.75, 1; 0.5 and 0.75 tie: the smaller
    assert choose_alpha(scores, 0.75)["alpha"] == 0.5
    assert choose_alpha(scores, 1.0)["alpha"] == 0.75
    scores[2]["general"] = 0.75
    assert choose_alpha(scores, 0.75)["alpha"] == 0.75
    worse = [{"alpha": 0.0, "dev": 0.6, "general": 0.7}, {"alpha": 1.0, "dev": 0.5, "general": 0.8}]
    assert choose_alpha(worse, 0.8)["alpha"] == 0.0  # a negative gain: alpha 1 is below dev(0) + 0.8 x gain


def test_auto_alpha_scores_the_grid_with_the_shared_evaluators(tmp_path, tiny_bert_path, tuned_path, data_dir):
    from twinfold.models.merge import merge

    out = tmp_path / "auto"
    dev_dir = small_beir(data_dir / "scifact-nano", tmp_path / "dev")
    sts = small_sts(data_dir / "stsb" / "test.tsv", tmp_path / "sts.tsv")
    assert main([str(tiny_bert_path), str(tuned_path), "--alpha", "auto", "--dev", str(dev_dir),
                 "--dev-split", "test", "--general", str(sts), "--grid", "0.5", "--keep-gain", "0.5",
                 "--out", str(out)]) == 0
    auto = json.loads((out / "twinfold.json").read_text())["merge"]
    scores = auto["auto"]["scores"]
    assert [r["alpha"] for r in scores] == [0.0, 0.5, 1.0]
    chosen = choose_alpha(scores, 0.5)
    assert auto["alpha"] == chosen["alpha"] and auto["auto"]["general"] == [{"data": str(sts),
                                                                            "metric": "sts_spearman"}]
    base, tuned = BiEncoder.from_pretrained(tiny_bert_path), BiEncoder.from_pretrained(tuned_path)
    dev = RetrievalEvaluator(load_beir(dev_dir, "test"))
    assert scores[-1]["dev"] == dev(tuned, "tuned")[0]["ndcg@10"]
    assert chosen["general"] == chosen["general_sets"][str(sts)] == GeneralEvaluator(sts)(
        merge(base, tuned, chosen["alpha"]))
    assert BiEncoder.from_pretrained(out).fingerprint() == merge(base, tuned, chosen["alpha"]).fingerprint()
