"""End-to-end training runs: the smoke recipe on a tiny BERT, across 2 processes, and killed then resumed."""
import json

import pytest
import torch

from tests.builders import assemble_texts
from tests.helpers import SMOKE, killed_then_resumed_is_uninterrupted, max_diff, records, run_train, weights
from twinfold.train.loop import lr_lambda


def test_lr_schedule_warms_up_then_decays():
    linear = lr_lambda(total=10, warmup=2, kind="linear")
    assert [round(linear(s), 6) for s in (0, 1, 2, 6, 10)] == [round(1 / 3, 6), round(2 / 3, 6), 1.0, 0.5, 0.0]
    cosine = lr_lambda(total=10, warmup=0, kind="cosine")
    assert cosine(0) == 1.0 and abs(cosine(5) - 0.5) < 1e-12 and abs(cosine(10)) < 1e-12


def test_smoke_recipe_trains_evaluates_and_exports(tmp_path, tiny_bert_path, data_dir):
    out = run_train(tmp_path, "run", f"eval.data={data_dir / 'scifact-nano'}", "eval.precisions=[float32,int8]",
                    "train.eval_steps=2", tiny=tiny_bert_path)
    metrics = records(out)
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3, 4]
    assert [m["step"] for m in metrics if "eval" in m] == [0, 2, 4]
    report = json.loads((out / "eval" / "report.json").read_text())
    models = {r["model"] for r in report["results"]}
    assert {"base", "final"} <= models
    assert (out / "eval" / "report.md").exists() and (out / "eval" / "ndcg_vs_dim.png").exists()
    meta = json.loads((out / "final" / "twinfold.json").read_text())
    assert meta["matryoshka_dims"] == [128, 64] and meta["training"]["steps"] == 4
    assert meta["training"]["data"][0]["pairs"] == 919 and meta["eval"]["results"]
    assert (out / "config.yaml").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-4"]
    from sentence_transformers import SentenceTransformer

    from twinfold.models import BiEncoder

    ours = BiEncoder.from_pretrained(out / "final").encode(["a claim about cells"])
    theirs = SentenceTransformer(str(out / "final"), device="cpu").encode(["a claim about cells"])
    assert abs(ours - theirs).max() < 1e-5


def test_logged_lr_is_the_rate_the_step_used(tmp_path, tiny_bert_path):
    # smoke: lr 2e-5, 4 steps, warm-up ceil(0.25 * 4) = 1 step: factors 1/2, then 1, 2/3, 1/3 (linear decay)
    out = run_train(tmp_path, "lr", "train.save_steps=null", tiny=tiny_bert_path)
    logged = [r["lr"] for r in records(out)]
    assert logged == pytest.approx([1e-5, 2e-5, 2e-5 * 2 / 3, 2e-5 / 3], rel=1e-9)


# the temperature learns at the weights' rate here: at its default rate (50x theirs) the float rounding of one
# process vs two (~1e-7 in the losses) grows through Adam past 1e-5 in rarely seen embedding rows
@pytest.mark.parametrize("mode", [(), ("loss.mini_batch_size=2", "train.grad_accum=2", "loss.symmetric=true",
                                       "loss.learnable_temperature=true", "loss.temperature_lr=2e-4",
                                       "loss.check_replay=true")],
                         ids=["plain", "cached-accum"])
def test_two_processes_give_the_weights_of_one_with_the_same_global_batch(tmp_path, tiny_bert_path, mode):
    overrides = ("train.lr=2e-4", "train.save_steps=null", "model.dropout=0.0", *mode)
    one = run_train(tmp_path, "one", *overrides, tiny=tiny_bert_path)
    two = run_train(tmp_path, "two", *overrides, tiny=tiny_bert_path, processes=2)
    start, w1, w2 = weights(tiny_bert_path), weights(one / "final"), weights(two / "final")
    assert max_diff(w1, start) > 2e-4  # training moved the weights (Adam: about lr per step)
    assert max_diff(w1, w2) < 1e-5
    losses = [[r["loss"] for r in records(o)] for o in (one, two)]
    assert torch.allclose(torch.tensor(losses[0]), torch.tensor(losses[1]), atol=1e-5)


def test_resume_after_sigkill_ends_with_identical_weights(tmp_path, tiny_bert_path):
    out = killed_then_resumed_is_uninterrupted(tmp_path, tiny_bert_path, (
        "train.max_steps=12", "train.save_steps=3", "model.dropout=0.1", "train.lr=1e-3", "train.batch_size=16"),
        kill_steps=(3, 8))
    state = json.loads((out / "checkpoints" / "step-12" / "trainer_state.json").read_text())
    assert state["step"] == 12
    steps = [r["step"] for r in records(out)]
    assert steps == list(range(1, 13))


def test_pruning_keeps_the_last_k_and_the_best(tmp_path):
    from twinfold.train.checkpoint import complete_checkpoints, prune_checkpoints

    root = tmp_path / "checkpoints"
    for step in (1, 2, 3, 4, 5):
        (root / f"step-{step}").mkdir(parents=True)
        (root / f"step-{step}" / "trainer_state.json").write_text("{}")
    (root / "step-6").mkdir()  # interrupted before its state file: not complete
    (root / ".tmp-step-7-abc").mkdir()
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-1", "step-2", "step-3", "step-4", "step-5"]
    prune_checkpoints(tmp_path, keep_last=1, keep=root / "step-2")
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-2", "step-5"]
    assert not (root / ".tmp-step-7-abc").exists()


def test_wandb_logging_works_offline(tmp_path, tiny_bert_path):
    out = run_train(tmp_path, "wandb", "log.wandb=true", "log.wandb_mode=offline", "train.max_steps=2",
                    "train.save_steps=null", tiny=tiny_bert_path)
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))


def test_length_sorted_grouped_step_equals_the_plain_step(tmp_path, tiny_bert_path, data_dir, monkeypatch):
    """TrainStep embeds each role length-sorted in chunks of a token budget; the update equals one plain forward
    per role (the embeddings reach the loss in batch order)."""
    from accelerate import Accelerator

    from twinfold.train.config import load_config
    from twinfold.train.data.pairs import KIND
    from twinfold.train.loop import TrainStep, build_loss, build_model

    monkeypatch.setenv("TWINFOLD_DATA", str(data_dir))
    cfg = load_config(SMOKE, [
        f"model.name_or_path={tiny_bert_path}", "model.max_length=32", "model.dropout=0.0",
        "loss.matryoshka_dims=[128,64]", "loss.symmetric=true", f"train.output_dir={tmp_path}", "eval.data=null"])
    words = "protein cell gene tumour drug dose trial patient".split()
    texts = {"anchor": [" ".join(words[:1 + (i * 5) % 8]) for i in range(12)],
             "positive": [" ".join(words[i % 8:] + words[:1 + i % 5]) for i in range(12)]}

    def make():  # SGD with lr 1: the update is the (clipped) gradient itself, compared without Adam's scaling
        torch.manual_seed(0)
        model, loss_fn = build_model(cfg), build_loss(cfg)
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        return model, loss_fn, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)

    model, loss_fn, optimizer, scheduler = make()
    step = TrainStep(cfg, Accelerator(cpu=True), model, model, loss_fn, optimizer, scheduler)
    batch = assemble_texts(model, texts, token_budget=40)
    assert all(len(chunks) >= 3 for chunks in batch["chunks"].values())  # several chunks of several lengths
    assert batch["order"]["anchor"].tolist() != list(range(12))  # sorting moved texts
    loss = step([batch]).item()

    plain, plain_loss_fn, plain_optimizer, _ = make()
    reference = plain_loss_fn({role: plain.embed(v, KIND[role]) for role, v in texts.items()}, None)
    reference.backward()
    torch.nn.utils.clip_grad_norm_(plain.parameters(), cfg.train.max_grad_norm)
    plain_optimizer.step()
    assert abs(loss - reference.item()) < 1e-6
    assert max((a - b).abs().max().item() for a, b in zip(model.parameters(), plain.parameters())) < 1e-6
