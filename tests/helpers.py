"""What many tests share: the repository root, running a training recipe (in this process, or as
`python -m twinfold.train` / `accelerate launch` processes), and reading what a run wrote."""
import contextlib
import io
import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.yaml"  # the recipe of the end-to-end tests: a few steps on SciFact pairs


def recipe_args(out: Path, *overrides: str, tiny: Path | None = None) -> list[str]:
    """Arguments of `python -m twinfold.train`: configs/smoke.yaml writing into `out`, on the tiny BERT at `tiny`
    (128 dims, texts cut at 32 tokens) when given, then `overrides`."""
    on_tiny = [f"model.name_or_path={tiny}", "model.max_length=32", "loss.matryoshka_dims=[128,64]"] if tiny else []
    return [str(SMOKE), f"train.output_dir={out}", *on_tiny, *overrides]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_command(args: list[str], processes: int = 1) -> list[str]:
    """`python -m twinfold.train ARGS`, or `accelerate launch` of it on `processes` CPU processes (gloo)."""
    if processes == 1:
        return [sys.executable, "-m", "twinfold.train", *args]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port()), "-m", "twinfold.train", *args]


def start_process(command: list[str], **env: str) -> subprocess.Popen:
    """Start `command` in the repository with one OpenMP thread and `env` added; its stderr is a text pipe."""
    return subprocess.Popen(command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", **env},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def run_process(command: list, env: dict[str, str] | None = None, cwd: Path = REPO,
                check: bool = False) -> subprocess.CompletedProcess:
    """Run `command` in `cwd` with the environment `env` (default: this one, with one OpenMP thread); its output is
    captured as text. `check`: fail, showing the ends of its output, unless it exits with 0."""
    command = [str(c) for c in command]
    result = subprocess.run(command, cwd=cwd, env=env or {**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=600)
    if check:
        assert result.returncode == 0, f"{' '.join(command)}:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


@contextlib.contextmanager
def like_a_new_process():
    """Run accelerate code in this process as if in one of its own: accelerate's state is new; torch's threads, the
    random generators and the environment are put back afterwards."""
    from accelerate.state import AcceleratorState

    threads, environ = torch.get_num_threads(), dict(os.environ)
    rng = torch.get_rng_state(), random.getstate(), np.random.get_state()
    AcceleratorState._reset_state(True)  # an Accelerator made earlier in this process would be reused
    try:
        yield
    finally:
        AcceleratorState._reset_state(True)
        torch.set_num_threads(threads)
        torch.set_rng_state(rng[0])
        random.setstate(rng[1])
        np.random.set_state(rng[2])
        os.environ.clear()
        os.environ.update(environ)


def train_in_process(args: list[str]) -> subprocess.CompletedProcess:
    """`python -m twinfold.train ARGS` run by its `main` in this process (`like_a_new_process`): the exit code,
    stdout and stderr, with the log lines the command prints."""
    from twinfold.train.__main__ import main

    stdout, stderr = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(stderr)  # main's logging.basicConfig adds none to a root logger that has one
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        with like_a_new_process(), contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = main(args)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    return subprocess.CompletedProcess(["python", "-m", "twinfold.train", *args], code, stdout.getvalue(),
                                       stderr.getvalue())


def run_train(tmp_path: Path, name: str, *overrides: str, processes: int = 1, tiny: Path | None = None) -> Path:
    """Train `recipe_args` into `tmp_path/name` (one process: in this one); fail on a non-zero exit. Returns the
    run folder."""
    out = tmp_path / name
    args = recipe_args(out, *overrides, tiny=tiny)
    result = train_in_process(args) if processes == 1 else run_process(train_command(args, processes))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def records(out: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl."""
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def logged_steps(out: Path) -> int:
    """How many training steps a run has logged so far (0 before its metrics.jsonl exists)."""
    path = out / "metrics.jsonl"
    return sum('"loss"' in line for line in path.read_text().splitlines()) if path.exists() else 0


def kill_after(out: Path, proc: subprocess.Popen, at: int) -> None:
    """SIGKILL the run `proc` (writing into `out`) once step `at` is logged and a checkpoint is complete."""
    deadline = time.time() + 300
    # any complete checkpoint: the first one is pruned once two later ones exist (train.save_total_limit 2)
    while not any((out / "checkpoints").glob("step-*/trainer_state.json")) or logged_steps(out) < at:
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:] if proc.stderr else ""
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "final").exists(), f"the run finished before it was killed after step {at}"


def killed_then_resumed_is_uninterrupted(tmp_path: Path, tiny: Path, overrides: tuple, kill_steps: tuple[int, int]):
    """Run `overrides` uninterrupted, and again SIGKILLed (a process of its own) after a random step in
    `kill_steps`, then resumed; assert identical final weights; return the resumed run's folder."""
    overrides = (*overrides, "train.log_steps=1")  # a row per step to kill after
    full = run_train(tmp_path, "full", *overrides, tiny=tiny)
    out = tmp_path / "killed"
    proc = start_process(train_command(recipe_args(out, *overrides, tiny=tiny)))
    at = random.randint(*kill_steps)
    kill_after(out, proc, at)
    run_train(tmp_path, "killed", *overrides, "train.resume=true", tiny=tiny)
    assert max_diff(weights(full / "final"), weights(out / "final")) == 0.0, f"killed after step {at}"
    return out
