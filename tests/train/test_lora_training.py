"""LoRA training: `model.lora` validated like every key; only the adapter trains and has optimizer state; the cached
mode, gradient checkpointing and two processes compute the step of one plain process; checkpoints hold the adapter
and resume exactly."""
import re

import pytest
import torch

from tests.helpers import REPO, killed_then_resumed_is_uninterrupted, max_diff, run_train, weights
from twinfold.losses import cached_backward, chunked, uncached_backward
from twinfold.models import BiEncoder
from twinfold.models.export import main as export_main
from twinfold.models.lora import LoraSettings
from twinfold.train.config import ConfigError, load_config
from twinfold.train.loop import build_loss, build_model, build_optimizer, disk_needed

TEXTS = {"anchor": ["what do cells eat", "how do proteins fold", "why is the sky blue", "when did it rain"],
         "positive": ["cells take in sugar", "folding follows energy", "light scatters off air", "on monday"]}
KINDS = {"anchor": "query", "positive": "document"}


def smoke(*overrides):
    return load_config(REPO / "configs" / "smoke.yaml", list(overrides))


def tiny_lora(tiny, *overrides):
    return smoke(f"model.name_or_path={tiny}", "model.max_length=32", "loss.matryoshka_dims=[128,64]",
                 "model.lora.r=4", *overrides)


def test_model_lora_is_validated_like_every_key(tiny_bert_path):
    assert smoke().model.lora is None
    assert smoke("model.lora.r=8", "model.lora.target_modules=[query,value]").model.lora == LoraSettings(
        r=8, target_modules=["query", "value"])
    for override, message in (("model.lora.r=0", "model.lora.r: 0 must be greater than 0"),
                              ("model.lora.dropout=1", "model.lora.dropout: 1.0 must be in [0, 1)"),
                              ("model.lora.target_modules=[]", "model.lora.target_modules: empty;"),
                              ("model.lora.alfa=8", "unknown config key 'model.lora.alfa'; did you mean "
                                                    "'model.lora.alpha'?")):
        with pytest.raises(ConfigError, match="^" + re.escape(message)):
            smoke(override)
    with pytest.raises(ConfigError, match=r"^model\.lora\.target_modules: \['q_proj'\] match none of the model's "):
        build_model(tiny_lora(tiny_bert_path, "model.lora.target_modules=[q_proj]"))


def adapter_step(cfg, mini_batch_size=None):
    """The model of `cfg` (its adapter's B random, so that A has gradients too) after one loss backward on TEXTS;
    and its optimizer."""
    torch.manual_seed(0)
    model = build_model(cfg).train()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    loss_fn = build_loss(cfg)
    optimizer = build_optimizer(model, loss_fn, cfg)
    step = cached_backward if mini_batch_size else uncached_backward
    step(lambda texts, role: model.embed(texts, KINDS[role]), chunked(TEXTS, mini_batch_size), loss_fn)
    return model, optimizer


def adapter(model):
    return {name: param for name, param in model.named_parameters() if "lora_" in name}


def test_only_the_adapter_trains_and_has_optimizer_state(tiny_bert_path):
    model, optimizer = adapter_step(tiny_lora(tiny_bert_path))
    trained = adapter(model)
    assert {name for name, param in model.named_parameters() if param.requires_grad} == set(trained)
    assert len(trained) == 2 * 2 * 4  # A and B of 4 projections in 2 layers
    assert {id(p) for group in optimizer.param_groups for p in group["params"]} == {id(p) for p in trained.values()}
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    optimizer.step()
    assert {id(p) for p in optimizer.state} == {id(p) for p in trained.values()}
    assert {name for name, param in model.named_parameters() if not torch.equal(param, before[name])} == set(trained)


def test_the_disk_check_counts_checkpoints_of_the_adapter_and_one_full_export(tiny_bert_path):
    model = build_model(tiny_lora(tiny_bert_path))
    adapter_bytes = 4 * 2 * 4 * 4 * (128 + 128)  # float32 A and B (r 4) of 4 projections 128 -> 128 in 2 layers
    all_bytes = 4 * sum(p.numel() for p in BiEncoder.from_pretrained(tiny_bert_path).parameters()) + adapter_bytes
    assert disk_needed(model, save_total_limit=2) == 3 * adapter_bytes * 3 + all_bytes


def test_cached_mode_and_gradient_checkpointing_give_the_plain_gradients(tiny_bert_path):
    plain = {name: p.grad for name, p in adapter(adapter_step(tiny_lora(tiny_bert_path))[0]).items()}
    assert all(g.abs().max() > 0 for g in plain.values())
    cached = adapter(adapter_step(tiny_lora(tiny_bert_path), mini_batch_size=3)[0])
    checkpointed = adapter(adapter_step(tiny_lora(tiny_bert_path, "model.gradient_checkpointing=true"))[0])
    for name, grad in plain.items():
        torch.testing.assert_close(cached[name].grad, grad, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(checkpointed[name].grad, grad, atol=1e-6, rtol=1e-5)


def test_a_killed_lora_run_resumes_to_identical_weights_from_small_checkpoints(tmp_path, tiny_bert_path):
    out = killed_then_resumed_is_uninterrupted(tmp_path, tiny_bert_path, (
        "model.lora.r=4", "model.lora.dropout=0.1", "model.dropout=0.1", "train.max_steps=8", "train.save_steps=2",
        "train.lr=1e-3"), kill_steps=(2, 6))
    assert max_diff(weights(out / "final"), weights(tiny_bert_path)) > 1e-4  # the merged adapter moved the weights

    last = out / "checkpoints" / "step-8"
    assert not (last / "model" / "model.safetensors").exists()
    held = sum((last / name).stat().st_size for name in ("model/adapter_model.safetensors", "optimizer.pt"))
    assert held < 0.05 * (tiny_bert_path / "model.safetensors").stat().st_size
    assert export_main([str(last), str(tmp_path / "adapter"), "--adapter"]) == 0
    texts = TEXTS["anchor"]
    from_adapter = BiEncoder.from_pretrained(tmp_path / "adapter").encode(texts)
    assert abs(BiEncoder.from_pretrained(out / "final").encode(texts) - from_adapter).max() < 1e-5


def test_two_processes_train_the_adapter_of_one(tmp_path, tiny_bert_path):
    overrides = ("model.lora.r=4", "train.lr=1e-3", "train.save_steps=null", "loss.mini_batch_size=2",
                 "train.grad_accum=2", "model.gradient_checkpointing=true")
    one = run_train(tmp_path, "one", *overrides, tiny=tiny_bert_path)
    two = run_train(tmp_path, "two", *overrides, tiny=tiny_bert_path, processes=2)
    w1, w2 = weights(one / "final"), weights(two / "final")
    assert max_diff(w1, weights(tiny_bert_path)) > 1e-4
    assert max_diff(w1, w2) < 1e-5


def test_training_from_an_adapter_folder_merges_it_or_goes_on_training_it(tiny_bert_path, tmp_path):
    adapter_folder = tmp_path / "adapter"
    trained, _ = adapter_step(tiny_lora(tiny_bert_path, "model.lora.alpha=8"))
    trained.save_pretrained(adapter_folder, adapter=True)
    expected = trained.encode(TEXTS["anchor"])
    full = build_model(smoke(f"model.name_or_path={adapter_folder}", "loss.matryoshka_dims=[128,64]"))
    assert not hasattr(full.encoder, "peft_config")  # merged: every weight trains but BERT's unused pooler
    assert {n for n, p in full.named_parameters() if not p.requires_grad} == {"encoder.pooler.dense.weight",
                                                                              "encoder.pooler.dense.bias"}
    assert abs(full.encode(TEXTS["anchor"]) - expected).max() < 1e-5
    going_on = build_model(tiny_lora(adapter_folder, "model.lora.alpha=8"))
    assert {n for n, p in going_on.named_parameters() if p.requires_grad} == set(adapter(going_on))
    assert (going_on.encode(TEXTS["anchor"]) == expected).all()
    with pytest.raises(ConfigError, match=r"^model\.lora\.alpha: 32\.0 differs from the loaded adapter's 8"):
        build_model(tiny_lora(adapter_folder))
