"""Training computes what the config asks: the temperature's own rate, the launcher's precision, one
similarity in loss, search and export, and a Dense head restored on resume."""
import json
import logging

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import SMOKE, like_a_new_process
from twinfold.losses import info_nce
from twinfold.models import BiEncoder
from twinfold.train.config import load_config


def smoke(*overrides):
    return load_config(SMOKE, list(overrides))


def test_learnable_temperature_has_its_own_rate_and_moves_where_the_gradient_says(tiny_bert_path):
    from twinfold.train.loop import build_loss, build_optimizer

    cfg = smoke("loss.learnable_temperature=true", "loss.matryoshka_dims=[]", "train.lr=3e-5")
    assert cfg.loss.temperature_lr == 1e-2
    model = BiEncoder.from_pretrained(tiny_bert_path)
    for anchor_shift, moves in ((0.0, "down"), (1.0, "up")):
        loss_fn = build_loss(cfg)
        optimizer = build_optimizer(model, loss_fn, cfg)
        assert [g["lr"] for g in optimizer.param_groups] == [3e-5, 3e-5, 1e-2]
        # positives near their anchors: a colder softmax lowers the loss (gradient on log t > 0), so t falls;
        # positives nearer another row's anchor (rolled by one): a warmer one does, so t rises
        g = torch.Generator().manual_seed(0)
        positive = F.normalize(torch.randn(8, 16, generator=g), dim=-1)
        anchor = positive.roll(int(anchor_shift), dims=0) + 0.3 * torch.randn(8, 16, generator=g)
        loss = loss_fn({"anchor": anchor, "positive": positive})
        loss.backward()
        grad = loss_fn.log_temperature.grad.item()
        assert (grad > 0) == (moves == "down")
        before = loss_fn.log_temperature.item()
        optimizer.step()
        # AdamW's first step moves a parameter by lr * g / (|g| + eps): the temperature's own rate, downhill
        assert before - loss_fn.log_temperature.item() == pytest.approx(1e-2 * (1 if grad > 0 else -1), rel=1e-4)
        with torch.no_grad():
            assert loss_fn({"anchor": anchor, "positive": positive}).item() < loss.item()
        optimizer.zero_grad()


def test_mixed_precision_follows_the_launcher_unless_set(monkeypatch, caplog):
    from accelerate.state import AcceleratorState

    from twinfold.train.loop import make_accelerator

    assert smoke().train.mixed_precision is None
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what `accelerate launch` sets from its config
    with like_a_new_process():
        assert make_accelerator(None).mixed_precision == "bf16"
        assert not caplog.records
        AcceleratorState._reset_state(True)
        with caplog.at_level(logging.WARNING, logger="twinfold"):
            assert make_accelerator("no").mixed_precision == "no"
        assert "train.mixed_precision: no overrides the launcher's mixed_precision bf16" in caplog.text


def tiny_beir(folder):
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"_id": d, "text": d}) + "\n" for d in ("d1", "d2")))
    (folder / "queries.jsonl").write_text(json.dumps({"_id": "q1", "text": "q"}) + "\n")
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td2\t1\n")
    return folder


def test_normalize_false_is_one_similarity_in_loss_search_and_export(tiny_bert_path, tmp_path):
    from sentence_transformers import SentenceTransformer

    from twinfold.train.eval.beir import load_beir
    from twinfold.train.evaluate import RetrievalEvaluator
    from twinfold.train.loop import build_loss, build_model

    # search: d1 has the larger inner product with the query, d2 the larger cosine (and is the relevant one)
    evaluator = RetrievalEvaluator(load_beir(tiny_beir(tmp_path / "beir")), k_values=(1,))
    query, corpus = torch.tensor([[1.0, 0.0]]), torch.tensor([[10.0, 10.0], [1.0, 0.01]])
    assert evaluator.score_embeddings(query, corpus, "m", normalize=False)[0]["ndcg@1"] == 1.0
    assert evaluator.score_embeddings(query, corpus, "m", normalize=False, similarity="dot")[0]["ndcg@1"] == 0.0

    for similarity in ("cosine", "dot"):
        cfg = smoke(f"model.name_or_path={tiny_bert_path}", "model.normalize=false", f"model.similarity={similarity}",
                    "loss.matryoshka_dims=[128,64]")
        model = build_model(cfg)
        assert (model.settings.normalize, model.settings.similarity) == (False, similarity)
        # loss: InfoNCE on the model's similarity, Matryoshka prefixes raw for dot
        loss_fn = build_loss(cfg, model.settings.similarity)
        anchor, positive = 3 * torch.randn(4, 128), torch.randn(4, 128)
        expected = sum(info_nce(anchor[:, :d], positive[:, :d], similarity=similarity) for d in (128, 64))
        torch.testing.assert_close(loss_fn({"anchor": anchor, "positive": positive}), expected)
        # export: sentence-transformers loads unnormalised vectors and the same similarity
        model.save_pretrained(tmp_path / similarity)
        st = SentenceTransformer(str(tmp_path / similarity), device="cpu")
        assert st.similarity_fn_name == similarity
        assert not any(type(m).__name__ == "Normalize" for m in st)
        assert BiEncoder.from_pretrained(tmp_path / similarity).settings.similarity == similarity


def test_dense_head_is_restored_from_a_checkpoint(tiny_bert_path, tmp_path):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Dense, Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    from twinfold.train.checkpoint import load_checkpoint, save_checkpoint
    from twinfold.train.loop import build_loss, build_optimizer

    SentenceTransformer(modules=[Transformer(str(tiny_bert_path)), Pooling(128, "cls"), Dense(128, 64), Normalize()],
                        device="cpu").save(str(tmp_path / "st"))
    cfg = smoke()
    model = BiEncoder.from_pretrained(tmp_path / "st")
    with torch.no_grad():
        model.head[0].linear.weight.mul_(2)
    loss_fn = build_loss(cfg)
    optimizer = build_optimizer(model, loss_fn, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    folder = save_checkpoint(tmp_path / "run", 1, model, optimizer, scheduler, loss_fn, [], {"step": 1}, cfg.to_dict())
    fresh = BiEncoder.from_pretrained(tmp_path / "st")
    load_checkpoint(folder, fresh, build_optimizer(fresh, loss_fn, cfg), scheduler, loss_fn)
    assert fresh.fingerprint() == model.fingerprint()
    torch.testing.assert_close(fresh.head[0].linear.weight, model.head[0].linear.weight, rtol=0, atol=0)
