"""The code rotation: orthogonal within each Matryoshka block (float search unchanged at every prefix), fitted to
lower the sign-bit ranking loss, and exported as a Dense layer that sentence-transformers computes the same."""
import json

import pytest
import torch
import torch.nn.functional as F
from sentence_transformers import SentenceTransformer

from tests.helpers import SMOKE, records, run_train
from twinfold.losses import sign_bit_ranking_loss, truncate
from twinfold.models import BiEncoder
from twinfold.train.config import ConfigError, load_config
from twinfold.train.eval.beir import load_beir
from twinfold.train.evaluate import RetrievalEvaluator
from twinfold.train.rotation import block_rotation, fit_rotation, rotation_pairs

DIMS = [4, 8, 16]


def unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_block_rotation_keeps_every_prefix_dot_product():
    g = torch.Generator().manual_seed(0)
    rotation = block_rotation([torch.randn(n, n, generator=g, dtype=torch.float64) for n in (4, 4, 8)])
    assert torch.allclose(rotation @ rotation.T, torch.eye(16, dtype=torch.float64), atol=1e-12)
    assert rotation[:4, 4:].abs().max() == 0 and rotation[4:8, 8:].abs().max() == 0  # block diagonal
    x, y = unit(5, 16, seed=1).double(), unit(7, 16, seed=2).double()
    for dim in DIMS:
        before = truncate(x, dim) @ truncate(y, dim).T
        after = truncate(x @ rotation, dim) @ truncate(y @ rotation, dim).T
        assert torch.allclose(before, after, atol=1e-12)


def test_fit_lowers_the_sign_bit_ranking_loss_and_stays_a_block_rotation():
    # queries are noisy copies of their documents; the documents' entries differ widely in size, so their sign bits
    # lose what the small entries hold until a rotation spreads it
    documents = unit(60, 16, seed=3) * torch.linspace(3.0, 0.1, 16)
    targets = torch.arange(60)
    queries = F.normalize(documents + 0.05 * torch.randn(60, 16, generator=torch.Generator().manual_seed(4)), dim=-1)
    documents = F.normalize(documents, dim=-1)
    identity = sign_bit_ranking_loss(queries, documents, targets, DIMS, 0.05, normalize=False).item()
    rotation, (before, after) = fit_rotation(queries, documents, targets, DIMS, 0.05, steps=60, lr=3e-2)
    assert before == pytest.approx(identity, rel=1e-6) and after < before - 0.03
    assert after == pytest.approx(sign_bit_ranking_loss(queries @ rotation, documents @ rotation, targets, DIMS,
                                                        0.05, normalize=False).item(), rel=1e-6)
    assert torch.allclose(rotation @ rotation.T, torch.eye(16), atol=1e-5) and rotation[:4, 4:].abs().max() == 0


def test_each_block_is_fitted_for_its_own_prefix_with_the_blocks_before_it_fixed():
    # reference: the block that completes prefix d trained on sign_bit_ranking_loss at d over the whole prefix
    queries, documents = unit(30, 16, seed=5).double(), unit(20, 16, seed=6).double()
    targets = torch.randint(0, 20, (30,), generator=torch.Generator().manual_seed(7))
    skews = [torch.zeros(n, n, dtype=torch.float64) for n in (4, 4, 8)]
    for i, (start, end) in enumerate([(0, 4), (4, 8), (8, 16)]):
        skews[i].requires_grad_(True)
        optimizer = torch.optim.Adam([skews[i]], lr=1e-2)
        for _ in range(5):
            rotation = block_rotation(skews)[:end, :end]
            optimizer.zero_grad()
            sign_bit_ranking_loss(queries[:, :end] @ rotation, documents[:, :end] @ rotation, targets, [end], 0.05,
                                  normalize=False).backward()
            optimizer.step()
        skews[i] = skews[i].detach()
    rotation, _ = fit_rotation(queries, documents, targets, DIMS, 0.05, steps=5, lr=1e-2)
    assert torch.allclose(rotation, block_rotation(skews), atol=1e-10)
    for start, end in [(0, 4), (4, 8), (8, 16)]:  # every block moved
        assert (rotation[start:end, start:end] - torch.eye(end - start, dtype=torch.float64)).abs().max() > 1e-3
    shorter, _ = fit_rotation(queries[:, :8], documents[:, :8], targets, [4, 8], 0.05, steps=5, lr=1e-2)
    assert torch.allclose(shorter, rotation[:8, :8], atol=1e-10)  # a later block never changes an earlier one


def test_a_sample_of_rows_beyond_the_limit_is_seeded_and_in_order():
    class Rows:
        def __init__(self, n):
            self.n = n

        def __len__(self):
            return self.n

    datasets = [Rows(5), Rows(7)]
    assert rotation_pairs(datasets, 0) == [(0, r) for r in range(5)] + [(1, r) for r in range(7)]
    sample = rotation_pairs(datasets, 0, limit=6)
    assert len(sample) == 6 and sample == sorted(sample) and sample == rotation_pairs(datasets, 0, limit=6)


def test_a_streamed_dataset_cannot_be_rotated(data_dir):
    pairs = data_dir / "scifact-train-pairs" / "train.jsonl"
    with pytest.raises(ConfigError, match="loss.quantization.rotation_steps: the code rotation is fitted on the "
                                          "loaded training pairs"):
        load_config(SMOKE, ["loss.quantization={rotation_steps: 5}", "train.max_steps=2",
                            "data.train=[{path: %s, streaming: true}]" % pairs])


@pytest.mark.parametrize("adapter", [[], ["model.lora.r=4"]], ids=["full", "lora"])
def test_run_exports_the_rotation_and_float_search_is_unchanged(tmp_path, tiny_bert_path, data_dir, adapter):
    nano = data_dir / "scifact-nano"
    out = run_train(tmp_path, "rot", "loss.quantization={binary: 1.0, rotation_steps: 30}", "train.save_steps=null",
                    "train.eval_steps=3", f"eval.data={nano}", "eval.precisions=[float32,binary]", *adapter,
                    tiny=tiny_bert_path)
    final = out / "final"
    fit = json.loads((final / "twinfold.json").read_text())["training"]["code_rotation"]
    assert fit["steps"] == 30 and fit["blocks"] == [64, 128] and fit["loss_after"] < fit["loss_before"]
    assert "code rotation (the last Dense layer)" in (final / "README.md").read_text()
    evals = [r for r in records(out) if "eval" in r]
    assert [r["step"] for r in evals] == [0, 3]  # the base, step 3; the last step (4) waits for the rotation

    model = BiEncoder.from_pretrained(final)
    texts = ["a claim about cells", "an abstract on the heart and its vessels"]
    ours = model.encode(texts, convert_to_tensor=True)
    theirs = SentenceTransformer(str(final), device="cpu").encode(texts, convert_to_tensor=True)
    assert torch.allclose(ours, theirs, atol=1e-5)

    final_rows = json.loads((final / "twinfold.json").read_text())["eval"]["results"]
    binary = {r["dim"]: r["ndcg@10"] for r in final_rows if r["model"] == "final" and r["precision"] == "binary"}
    rotated_binary = {r["dim"]: r["ndcg@10"] for r in RetrievalEvaluator(
        load_beir(nano, "test"), dims=[128, 64], precisions=("binary",))(model, "rotated")}
    assert binary == pytest.approx(rotated_binary, abs=1e-9)  # the report measures the rotated model

    data = load_beir(nano, "test")
    queries, documents = data.query_texts[:20], data.corpus_texts[:50]
    rotated = [model.encode(x, convert_to_tensor=True) for x in (queries, documents)]
    model.head = model.head[:-1]  # the trained model before its rotation
    plain = [model.encode(x, convert_to_tensor=True) for x in (queries, documents)]
    assert (rotated[1] - plain[1]).abs().max() > 1e-4  # the vectors did rotate
    for dim in (128, 64):  # every prefix ranks the documents by the same float scores: float search is unchanged
        assert torch.allclose(truncate(rotated[0], dim) @ truncate(rotated[1], dim).T,
                              truncate(plain[0], dim) @ truncate(plain[1], dim).T, atol=1e-5)
