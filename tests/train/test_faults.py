"""Faults lose nothing: killed checkpoint writes, non-finite losses, unwritable output, CLI errors."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.helpers import REPO, SMOKE, like_a_new_process, recipe_args, run_process, train_command, train_in_process
from twinfold.train.checkpoint import complete_checkpoints
from twinfold.train.config import ConfigError
from twinfold.train.lock import RunLock
from twinfold.train.loop import check_output_dir

# a tiny run whose loss turns NaN at its second step
DIVERGING = ("model.max_length=32", "loss.matryoshka_dims=[128]", "train.lr=1e12", "train.warmup_ratio=0",
             "train.max_grad_norm=null")


def run_cli(*args):
    """`python -m twinfold.train configs/smoke.yaml ARGS` as a process of its own, offline (no hub lookup)."""
    return run_process(train_command([str(SMOKE), *args]), env={**os.environ, "OMP_NUM_THREADS": "1",
                                                                "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})


def test_sigkill_during_a_checkpoint_write_leaves_the_previous_one_newest(tmp_path):
    previous = tmp_path / "checkpoints" / "step-2"
    previous.mkdir(parents=True)
    (previous / "trainer_state.json").write_text("{}")
    script = textwrap.dedent(f"""
        import os, signal
        from twinfold.models.files.atomic import atomic_directory
        with atomic_directory({str(tmp_path / "checkpoints" / "step-4")!r}) as tmp:
            (tmp / "model.safetensors").write_bytes(b"half a model")
            (tmp / "trainer_state.json").write_text("{{}}")
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO)
    assert result.returncode == -9
    assert complete_checkpoints(tmp_path) == [previous]


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, tiny_bert_path):
    out = tmp_path / "run"
    result = train_in_process(recipe_args(out, *DIVERGING, "train.save_steps=1", "train.max_steps=6",
                                          tiny=tiny_bert_path))
    assert result.returncode == 2
    assert "error: loss is nan at step 2; stopping" in result.stderr and "Traceback" not in result.stderr
    assert [p.name for p in complete_checkpoints(out)] == ["step-1"]
    assert not (out / "final").exists()


def test_a_run_that_raises_gives_the_process_its_signal_handlers_back(tmp_path, tiny_bert_path):
    """`train` called from Python: a non-finite loss ends it, and Ctrl-C acts as before (not swallowed)."""
    import signal

    from twinfold.train.config import load_config
    from twinfold.train.loop import TrainingError, train

    cfg = load_config(SMOKE, [
        f"train.output_dir={tmp_path / 'run'}", f"model.name_or_path={tiny_bert_path}", *DIVERGING,
        "train.save_steps=null", "train.max_steps=4", "train.log_steps=1", "eval.data=null"])
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with like_a_new_process(), pytest.raises(TrainingError, match="loss is nan"):
        train(cfg)
    assert {s: signal.getsignal(s) for s in before} == before


def test_unwritable_or_full_output_is_reported_before_training(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="cannot write to"):
        check_output_dir(blocker / "run", need_bytes=0)
    with pytest.raises(ConfigError, match="cannot write to"):  # the run's lock is the first thing written there
        RunLock(blocker / "run").acquire()
    with pytest.raises(ConfigError, match="GiB free; checkpoints and the export need about"):
        check_output_dir(tmp_path / "run", need_bytes=2**62)


def test_cli_errors_are_one_line_without_traceback(tmp_path):
    result = run_cli("train.batchsize=8")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: unknown config key 'train.batchsize'; did you mean 'train.batch_size'?"
    result = run_cli("model.name_or_path=no-such-org/no-such-model", f"train.output_dir={tmp_path / 'x'}")
    assert result.returncode == 2 and "tried local folder" in result.stderr and "Traceback" not in result.stderr
    debug = run_cli("train.batch_size=0", "--debug")
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_matryoshka_dim_larger_than_the_model(tmp_path, tiny_bert_path):
    result = train_in_process([str(SMOKE), f"model.name_or_path={tiny_bert_path}", "loss.matryoshka_dims=[256,64]",
                               f"train.output_dir={tmp_path / 'x'}"])
    assert result.returncode == 2
    assert "loss.matryoshka_dims: 256 is larger than the model's dimension 128" in result.stderr


def test_long_texts_are_truncated_and_reported_once(tmp_path, tiny_bert_path):
    pairs = tmp_path / "pairs.jsonl"
    long = " ".join(["word"] * 200)
    pairs.write_text("".join(json.dumps({"anchor": f"q{i}", "positive": f"{long} {i}"}) + "\n" for i in range(8)))
    result = train_in_process([str(SMOKE), f"model.name_or_path={tiny_bert_path}", "model.max_length=16",
                               "loss.matryoshka_dims=[]", f"data.train=[{{path: {pairs}}}]", "train.batch_size=4",
                               "train.max_steps=2", f"train.output_dir={tmp_path / 'run'}"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stderr.count("exceed max_length 16 tokens and are truncated") == 1
    assert "0 of 8 anchors and 8 of 8 positives" in result.stderr


def test_the_free_space_check_counts_the_runs_own_checkpoints_as_room(tmp_path):
    import shutil

    (tmp_path / "run" / "checkpoints" / "step-1").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "step-1" / "optimizer.pt").write_bytes(b"\0" * 2**26)
    free = shutil.disk_usage(tmp_path).free
    check_output_dir(tmp_path / "run", need_bytes=free + 2**25)  # fits once the checkpoint is replaced
    with pytest.raises(ConfigError, match="GiB free"):
        check_output_dir(tmp_path / "run", need_bytes=free + 2**27)
