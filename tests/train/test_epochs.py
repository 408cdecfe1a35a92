"""Whole runs by epochs: the step count covers every epoch's own batches, and a recipe that gives no step is refused."""
import json
import math

import pytest
import torch

from tests.builders import row_keys
from tests.helpers import REPO, SMOKE
from twinfold.train.config import ConfigError, load_config
from twinfold.train.data.plan import BatchPlan
from twinfold.train.loop import train


def pairs_file(tmp_path, n):
    path = tmp_path / "pairs.jsonl"  # every 5th positive repeats: epochs pack into different numbers of batches
    path.write_text("".join(json.dumps({"anchor": f"claim {i}", "positive": f"abstract {i % 5 if i % 5 == 0 else i}"})
                            + "\n" for i in range(n)))
    return path


def recipe(tmp_path, data, tiny, *overrides):
    return load_config(SMOKE, [
        f"data.train=[{{path: {data}}}]", f"model.name_or_path={tiny}", "model.max_length=16",
        "loss.matryoshka_dims=[128]", "train.max_steps=null", "train.save_steps=null", "train.batch_size=4",
        f"train.output_dir={tmp_path / 'run'}", *overrides])


def test_epochs_run_every_batch_of_every_epoch(tmp_path, tiny_bert_path):
    data = pairs_file(tmp_path, 22)
    cfg = recipe(tmp_path, data, tiny_bert_path, "train.epochs=3", "train.log_steps=1")
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    plan = BatchPlan([row_keys("p", [r["anchor"] for r in rows], [r["positive"] for r in rows])], 4, cfg.train.seed)
    per_epoch = [len(plan.epoch(e)) for e in range(3)]
    train(cfg)
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in logged] == [e for e in range(3) for _ in range(per_epoch[e])]


def test_grad_accum_beyond_the_data_is_refused(tmp_path, tiny_bert_path):
    cfg = recipe(tmp_path, pairs_file(tmp_path, 8), tiny_bert_path, "train.grad_accum=4")  # 3 batches an epoch
    with pytest.raises(ConfigError, match="train.grad_accum: 4 batches a step, but 1 epochs of the data give 3"):
        train(cfg)
    assert not (tmp_path / "run" / "final").exists()
    # the refused run let go of its folder: this process can run there at once
    train(recipe(tmp_path, tmp_path / "pairs.jsonl", tiny_bert_path, "train.max_steps=1"))
    assert (tmp_path / "run" / "final").exists()


def test_resume_refuses_data_edited_since_the_checkpoint_and_drops_a_torn_metrics_line(tmp_path, tiny_bert_path):
    data = pairs_file(tmp_path, 12)
    overrides = ("train.max_steps=2", "train.save_steps=1", "train.log_steps=1")
    train(recipe(tmp_path, data, tiny_bert_path, *overrides))
    metrics = tmp_path / "run" / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text(lines[0] + "\n" + lines[1][:7])  # killed while writing step 2's line
    resumed = recipe(tmp_path, data, tiny_bert_path, "train.max_steps=3", "train.save_steps=1", "train.log_steps=1",
                     "train.resume=true")
    train(resumed)
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [(r["step"], "loss" in r) for r in records] == [(1, True), (2, False), (3, True)]  # 2: the resume record
    assert records[1]["resumed_with_changes"] == ["train.max_steps: 2 -> 3"]
    data.write_text(data.read_text().replace("claim 3", "claim three"))  # the data changes under the run
    with pytest.raises(ConfigError, match=r"these changes break exact resumption: data_content.pairs: '\w+' -> '\w+'"):
        train(recipe(tmp_path, data, tiny_bert_path, "train.max_steps=4", "train.resume=true"))


def test_ctrl_c_while_tokenizing_stops_in_one_line_and_leaves_no_partial_cache(tmp_path, tiny_bert_path, monkeypatch):
    import signal

    from twinfold.train.data import pairs as data
    from twinfold.train.signals import StoppedBySignal

    real = data._tokenize_batch

    def interrupted(batch, tokenizer):  # the user presses Ctrl-C while the first rows are tokenized
        signal.raise_signal(signal.SIGINT)
        return real(batch, tokenizer)

    monkeypatch.setattr(data, "_tokenize_batch", interrupted)
    cfg = recipe(tmp_path, pairs_file(tmp_path, 12), tiny_bert_path, f"data.cache_dir={tmp_path / 'cache'}")
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own (xdist workers ignore SIGINT)
    try:
        with pytest.raises(StoppedBySignal, match="stopped by SIGINT before the first step") as stopped:
            train(cfg)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert stopped.value.exit_code == 130
    assert not list((tmp_path / "cache" / "tokens").iterdir())  # neither a cache nor a .tmp-* folder


def test_the_qwen3_lora_recipe_trains_a_tiny_qwen3_end_to_end(tmp_path, data_dir, monkeypatch):
    """configs/qwen3_embedding_lora.yaml as shipped (LoRA on bf16 weights, last token, an instruction per dataset,
    cached mode, gradient checkpointing), on a tiny random Qwen3 in place of Qwen3-Embedding-0.6B."""
    from tests.models.test_eos import qwen3_like
    from twinfold.models import BiEncoder

    monkeypatch.setenv("TWINFOLD_DATA", str(data_dir))
    model = qwen3_like(tmp_path / "qwen3", eos_post_processor=True)
    cfg = load_config(REPO / "configs" / "qwen3_embedding_lora.yaml", [
        f"model.name_or_path={model}", "model.max_length=32", "loss.matryoshka_dims=[64,32]", "train.max_steps=2",
        "train.batch_size=8", "loss.mini_batch_size=4", "train.mixed_precision=no", "train.save_steps=null",
        f"eval.data={data_dir / 'scifact-nano'}", "eval.precisions=[float32]", f"train.output_dir={tmp_path / 'run'}"])
    final = train(cfg)
    exported = BiEncoder.from_pretrained(final)
    assert exported.encoder.dtype == torch.bfloat16 and exported.settings.pooling == "lasttoken"
    info = json.loads((final / "twinfold.json").read_text())["training"]
    assert [d["query_prompt"] for d in info["data"]] == [d.query_prompt for d in cfg.data.train]
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2] and all(math.isfinite(m["loss"]) for m in metrics
                                                                          if "loss" in m)


def test_a_full_disk_while_checkpointing_is_one_error_and_keeps_the_previous_checkpoint(tmp_path, tiny_bert_path,
                                                                                         monkeypatch):
    import errno

    from twinfold.train import checkpoint
    from twinfold.train.checkpoint import complete_checkpoints
    from twinfold.train.loop import TrainingError

    real, saved = checkpoint.torch.save, []

    def save(obj, path, *args, **kwargs):  # the disk fills up during the second checkpoint
        if "step-2" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        saved.append(path)
        return real(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", save)
    cfg = recipe(tmp_path, pairs_file(tmp_path, 12), tiny_bert_path, "train.max_steps=3", "train.save_steps=1")
    with pytest.raises(TrainingError, match=r"cannot write the checkpoint of step 2 in .*No space left on device.*"
                                            r"previous checkpoints are kept"):
        train(cfg)
    assert [p.name for p in complete_checkpoints(tmp_path / "run")] == ["step-1"] and saved
