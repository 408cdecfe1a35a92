"""Reliability: run folders (no symbolic links) and locks, checksummed checkpoints (export checks them too), recipe
changes on resume, SIGTERM/SIGINT, checkpoints across devices, and throughput that counts training time only."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.helpers import (
    REPO,
    logged_steps,
    recipe_args,
    records,
    run_process,
    start_process,
    train_command,
    train_in_process,
    weights,
)
from twinfold.models import BiEncoder
from twinfold.models.export import main as export_main
from twinfold.models.files.atomic import OverwriteRefused
from twinfold.train.checkpoint import complete_checkpoints, prune_checkpoints, save_checkpoint
from twinfold.train.config import ConfigError
from twinfold.train.lock import RunLock
from twinfold.train.resume import claim_run_folder, recipe_changes


def train_cli(out, *overrides, tiny, own_process=False):
    """`python -m twinfold.train` of the smoke recipe on the tiny BERT, run in this process or (`own_process`) in a
    process of its own: a run refused once it holds its folder's lock keeps it until its process ends."""
    args = recipe_args(out, *overrides, tiny=tiny)
    return run_process(train_command(args)) if own_process else train_in_process(args)


def identical(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_key_the_checkpoints_recipe_lacks_counts_as_its_default():
    old = {"model": {"name_or_path": "m"}, "train": {"batch_size": 8}}
    new = {"model": {"name_or_path": "m", "dtype": "auto"}, "train": {"batch_size": 8}}
    assert recipe_changes(old, new, 1, 1) == ([], [])
    new["model"]["dtype"] = "bfloat16"
    assert recipe_changes(old, new, 1, 1) == (["model.dtype: 'auto' -> 'bfloat16'"], [])


def test_recipe_changes_are_split_into_breaking_and_harmless():
    old = {"model": {"name_or_path": "m", "allow_pickle": False}, "loss": {"temperature": 0.05},
           "train": {"batch_size": 8, "seed": 42, "max_steps": 10, "epochs": 1, "resume": False, "save_steps": 2},
           "eval": {"batch_size": 64}, "log": {"wandb": False}}
    same = json.loads(json.dumps(old))
    assert recipe_changes(old, {**same, "train": {**same["train"], "resume": True}}, 1, 1) == ([], [])
    new = json.loads(json.dumps(old))
    new["train"].update(batch_size=16, max_steps=20, epochs=2, save_steps=5)
    new["eval"]["batch_size"], new["log"]["wandb"], new["model"]["allow_pickle"] = 32, True, True
    new["loss"]["temperature"] = 0.1
    assert recipe_changes(old, new, 1, 2) == (
        ["loss.temperature: 0.05 -> 0.1", "train.batch_size: 8 -> 16", "processes: 1 -> 2"],
        ["eval.batch_size: 64 -> 32", "log.wandb: False -> True", "model.allow_pickle: False -> True",
         "train.epochs: 1 -> 2", "train.max_steps: 10 -> 20", "train.save_steps: 2 -> 5"])
    shorter = json.loads(json.dumps(old))
    shorter["train"]["max_steps"], shorter["model"]["name_or_path"] = 5, "other"
    assert recipe_changes(old, shorter, 1, 1)[0] == ["model.name_or_path: 'm' -> 'other'", "train.max_steps: 10 -> 5"]


def test_a_run_folder_holding_other_files_or_another_run_is_refused(tmp_path, tiny_bert_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "config.yaml").write_text("my own config\n")
    (project / "paper.tex").write_text("draft")
    result = train_cli(project, tiny=tiny_bert_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: train.output_dir: {project} holds 1 entries twinfold did not write (e.g. 'paper.tex'); choose a new "
        "or empty train.output_dir (it holds a run's files only)")
    assert (project / "config.yaml").read_text() == "my own config\n" and len(list(project.iterdir())) == 2

    run = tmp_path / "run"
    (run / "checkpoints" / "step-2").mkdir(parents=True)
    (run / "checkpoints" / "step-2" / "trainer_state.json").write_text("{}")
    result = train_cli(run, tiny=tiny_bert_path)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1] == (
        f"error: train.output_dir: {run} already holds a run (checkpoints up to step-2); continue it with "
        "train.resume=true or choose another train.output_dir")


def test_a_second_run_into_a_folder_in_use_is_refused_and_a_stale_lock_is_taken_over(tmp_path, tiny_bert_path,
                                                                                     caplog):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import time; from twinfold.train.lock import RunLock; "
                               f"RunLock({str(out)!r}).acquire(); "
                               "print('locked', flush=True); time.sleep(600)"],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = train_cli(out, tiny=tiny_bert_path)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        line = result.stderr.strip().splitlines()[-1]
        assert line.startswith(f"error: train.output_dir: {out} is in use by another run (pid {holder.pid} on ")
        assert line.endswith("wait for it to end or stop it, or choose another train.output_dir")
        with pytest.raises(ConfigError, match=f"in use by another run \\(pid {holder.pid} "):
            RunLock(out).acquire()
    finally:
        holder.kill()
        holder.wait()
    lock = RunLock(out).acquire()  # its process is gone: a stale lock
    assert f"taking over the stale lock of pid {holder.pid} on " in caplog.text
    assert json.loads((out / "run.lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert (out / "run.lock").read_text() == ""
    RunLock(out).acquire().release()  # released cleanly: no warning
    assert caplog.text.count("stale lock") == 1


def test_resume_skips_a_damaged_checkpoint_and_refuses_recipe_changes(tmp_path, tiny_bert_path):
    out = tmp_path / "run"
    common = ("model.dropout=0.1", "train.lr=1e-3")
    assert train_cli(out, *common, tiny=tiny_bert_path).returncode == 0  # 4 steps, checkpoints 2 and 4
    uninterrupted = weights(out / "final")

    result = train_cli(out, *common, "train.resume=true", "train.batch_size=16", "loss.temperature=0.1",
                       tiny=tiny_bert_path, own_process=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: train.resume: {out / 'checkpoints' / 'step-4'} was trained with another recipe; these changes "
        "break exact resumption: loss.temperature: 0.05 -> 0.1, train.batch_size: 8 -> 16. Undo them, or start a "
        "new run in another train.output_dir")

    damaged = out / "checkpoints" / "step-4" / "model" / "model.safetensors"
    size = damaged.stat().st_size
    damaged.write_bytes(damaged.read_bytes()[:1000])
    result = train_cli(out, *common, "train.resume=true", tiny=tiny_bert_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert (f"checkpoint {out / 'checkpoints' / 'step-4'} is damaged (model/model.safetensors has 1000 bytes, "
            f"expected {size}); it is not used") in result.stderr
    assert f"resumed from {out / 'checkpoints' / 'step-2'} (step 2)" in result.stderr
    assert identical(weights(out / "final"), uninterrupted)

    result = train_cli(out, *common, "train.resume=true", "train.max_steps=6", "eval.batch_size=32",
                       tiny=tiny_bert_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = records(out)
    assert {"step": 4, "resumed_with_changes": ["eval.batch_size: 64 -> 32", "train.max_steps: 4 -> 6"]} in rows
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]

    for folder in (out / "checkpoints").iterdir():
        (folder / "optimizer.pt").write_bytes(b"garbage")
    result = train_cli(out, *common, "train.resume=true", "train.max_steps=6", tiny=tiny_bert_path, own_process=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"error: train.resume: every checkpoint in {out / 'checkpoints'} is damaged (step-6: optimizer.pt has 7 "
        "bytes, expected")


@pytest.fixture(scope="module")
def uninterrupted_12_steps(tmp_path_factory, tiny_bert_path):
    out = tmp_path_factory.mktemp("full") / "run"
    result = train_cli(out, *SIGNAL_RUN, tiny=tiny_bert_path)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


SIGNAL_RUN = ("train.max_steps=12", "train.save_steps=null", "model.dropout=0.1", "train.lr=1e-3",
              "train.batch_size=16", "model.max_length=64")


# SIGINT takes the same handler (test_the_first_signal_is_recorded_and_a_second_one_acts_as_usual); one real
# preemption run is enough for the suite's time
@pytest.mark.parametrize("signum", [signal.SIGTERM], ids=["SIGTERM"])
def test_a_signal_checkpoints_and_stops_then_resume_ends_with_identical_weights(tmp_path, tiny_bert_path, signum,
                                                                                uninterrupted_12_steps):
    at = random.randint(1, 9)  # the step after which the signal is sent
    out = tmp_path / "run"
    proc = start_process(train_command(recipe_args(out, *SIGNAL_RUN, tiny=tiny_bert_path)))
    deadline = time.time() + 300
    while logged_steps(out) < at:
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:]
        time.sleep(0.005)
    proc.send_signal(signum)
    stderr = proc.communicate(timeout=300)[1]
    assert proc.returncode == 128 + signum, stderr[-2000:]
    name = signal.Signals(signum).name
    stopped = [int(p.name.split("-")[1]) for p in (out / "checkpoints").iterdir()]
    assert len(stopped) == 1 and at <= stopped[0] < 12, (at, stopped)
    assert stderr.strip().splitlines()[-1] == (
        f"stopped: stopped by {name} after step {stopped[0]}; {out / 'checkpoints' / f'step-{stopped[0]}'} is "
        "complete: continue with train.resume=true"), f"signal after step {at}"
    assert "Traceback" not in stderr and not (out / "final").exists()

    result = train_cli(out, *SIGNAL_RUN, "train.resume=true", tiny=tiny_bert_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert identical(weights(out / "final"), weights(uninterrupted_12_steps / "final")), f"signal after step {at}"
    full = [{k: v for k, v in r.items() if k != "pairs_per_s"} for r in records(uninterrupted_12_steps)]
    assert [r["loss"] for r in records(out)] == [r["loss"] for r in full]


def test_throughput_counts_training_time_only(tmp_path, tiny_bert_path, data_dir):
    out = tmp_path / "run"
    # the full SciFact corpus: an evaluation takes several times a training step, whatever the machine's load
    result = train_cli(out, f"eval.data={data_dir / 'scifact'}", "train.eval_steps=1", "train.max_steps=3",
                       tiny=tiny_bert_path)
    assert result.returncode == 0, result.stderr[-3000:]
    steps = [r for r in records(out) if "loss" in r]
    assert all(r["eval_s"] > 0 for r in steps) and steps[1]["checkpoint_s"] > 0 and steps[2]["checkpoint_s"] > 0
    for before, after in zip(steps, steps[1:]):
        train_s = 8 / after["pairs_per_s"]  # batch 8
        assert train_s < before["eval_s"], (train_s, before["eval_s"])  # the evaluation before it is not counted


def test_a_gpu_checkpoint_resumes_on_the_cpu_and_keeps_the_fp16_scaler_state(tmp_path, tiny_bert_path, monkeypatch):
    """A checkpoint whose tensors are tagged `cuda:0` (as torch.save writes them on a GPU) loads on a CPU machine."""
    from twinfold.losses import InfoNCE
    from twinfold.models import BiEncoder
    from twinfold.train.checkpoint import load_checkpoint, save_checkpoint

    def trained():
        torch.manual_seed(0)
        model, loss_fn = BiEncoder.from_pretrained(tiny_bert_path), InfoNCE(0.05, learnable=True)
        optimizer = torch.optim.AdamW([*model.parameters(), *loss_fn.parameters()], lr=1e-3)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (step + 1))
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3)
        return model, loss_fn, optimizer, scheduler, scaler

    model, loss_fn, optimizer, scheduler, scaler = trained()
    emb = {"anchor": model.embed(["a cell", "a gene"]), "positive": model.embed(["cells", "genes"])}
    scaler.scale(loss_fn(emb, None)).backward()
    scaler.step(optimizer)
    scaler.update()
    scaler.update(new_scale=256.0)
    scheduler.step()
    monkeypatch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
    rng_state = torch.get_rng_state()
    folder = save_checkpoint(tmp_path, 1, model, optimizer, scheduler, loss_fn, [{"cpu": rng_state}],
                             {"step": 1}, {"train": {}}, scaler)
    monkeypatch.undo()

    model2, loss_fn2, optimizer2, scheduler2, scaler2 = trained()
    state, rng = load_checkpoint(folder, model2, optimizer2, scheduler2, loss_fn2, scaler2)
    assert state == {"step": 1} and torch.equal(rng[0]["cpu"], rng_state)
    assert scaler2.get_scale() == 256.0 and scaler2.state_dict() == scaler.state_dict()
    for p, q in zip(optimizer.state.values(), optimizer2.state.values()):
        assert all(torch.equal(p[k], q[k]) and q[k].device.type == "cpu" for k in p)
    assert scheduler2.state_dict() == scheduler.state_dict()
    assert torch.equal(loss_fn2.log_temperature, loss_fn.log_temperature)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))


def test_the_first_signal_is_recorded_and_a_second_one_acts_as_usual():
    from twinfold.train.signals import StopOnSignal

    # Python's own SIGINT handler before (another test's library may have changed it), and signals raised in this
    # thread: os.kill lets the kernel pick any thread, whose handler may run after the next lines on a busy machine
    original = signal.signal(signal.SIGINT, signal.default_int_handler)
    stop = StopOnSignal().install()
    try:
        signal.raise_signal(signal.SIGINT)
        assert stop.received == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):  # the user will not wait: Python's own handler is back
            signal.raise_signal(signal.SIGINT)
    finally:
        stop.uninstall()
        after = signal.signal(signal.SIGINT, original)
    assert after is signal.default_int_handler and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_symbolic_links_in_a_run_folder_are_refused_and_nothing_is_deleted_through_one(tmp_path):
    user = tmp_path / "user"
    (user / "step-1").mkdir(parents=True)
    (user / "step-1" / "trainer_state.json").write_text("{}")  # looks like a checkpoint, belongs to the user
    (user / "notes.txt").write_text("mine")
    for entry, target in (("config.yaml", user / "notes.txt"), ("run.lock", user / "notes.txt"), ("eval", user),
                          ("checkpoints", user), ("checkpoints/step-2", user / "step-1")):
        out = tmp_path / entry.replace("/", "-")
        (out / entry).parent.mkdir(parents=True)
        (out / entry).symlink_to(target)
        with pytest.raises(ConfigError, match=f"^train.output_dir: {out / entry} is a symbolic link; twinfold "
                                              "does not write or delete through links"):
            claim_run_folder(out, resume=True)
        assert not (out / "run.lock").exists() or (out / "run.lock").is_symlink()
    assert (user / "notes.txt").read_text() == "mine"

    for keep_last in (1, 0):  # pruning through a linked checkpoints folder or a linked step deletes nothing
        prune_checkpoints(tmp_path / "checkpoints", keep_last)
        prune_checkpoints(tmp_path / "checkpoints-step-2", keep_last)
    assert (user / "step-1" / "trainer_state.json").exists() and (user / "notes.txt").exists()
    run = tmp_path / "run"
    for step in (1, 2):
        (run / "checkpoints" / f"step-{step}").mkdir(parents=True)
        (run / "checkpoints" / f"step-{step}" / "trainer_state.json").write_text("{}")
    prune_checkpoints(run, 1)  # a real folder is still pruned
    assert [p.name for p in complete_checkpoints(run)] == ["step-2"]


def test_export_refuses_a_damaged_checkpoint_and_never_writes_into_one(tmp_path, tiny_bert_path, capsys):
    model = BiEncoder.from_pretrained(tiny_bert_path)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    step = save_checkpoint(tmp_path / "run", 3, model, optimizer, scheduler, torch.nn.Linear(1, 1), [],
                           {"step": 3}, {})
    before = {p: p.read_bytes() for p in step.rglob("*") if p.is_file()}
    capsys.readouterr()
    for dst in (step, step / "model", step.parent / "step-9"):  # SRC and DST swapped, or a new folder among them
        assert export_main([str(tiny_bert_path), str(dst), "--overwrite"]) == 2
        kind = "a training checkpoint" if dst != step.parent / "step-9" else "a run's checkpoints folder"
        assert capsys.readouterr().err.splitlines() == [
            f"error: {dst.resolve()} is {'' if dst == step else 'inside '}{kind} "
            f"({step if dst != step.parent / 'step-9' else step.parent}); an export never goes there (are SRC and "
            "DST swapped?); choose another folder"]
    assert {p: p.read_bytes() for p in step.rglob("*") if p.is_file()} == before
    assert not (step.parent / "step-9").exists()
    with pytest.raises(OverwriteRefused, match="is a training checkpoint"):
        model.save_pretrained(step, overwrite=True)

    assert export_main([str(step), str(tmp_path / "good")]) == 0
    capsys.readouterr()
    weights_file = step / "model" / "model.safetensors"
    damaged = bytearray(weights_file.read_bytes())
    damaged[-1] ^= 1  # one bit of one weight: the file still loads
    weights_file.write_bytes(bytes(damaged))
    assert export_main([str(step), str(tmp_path / "bad")]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: {step} is damaged: model/model.safetensors does not match its checksum; nothing was exported "
        "(export an intact checkpoint, e.g. an earlier step)"]
    assert not (tmp_path / "bad").exists()
