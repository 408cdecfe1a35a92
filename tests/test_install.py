"""The installed distribution: everything under `twinfold`, beside a project with its own top-level `models` and
`train`; the `twinfold` command and its subcommands."""
import os
import re
import shutil
import site
import sys
import zipfile
from pathlib import Path

import pytest

from tests.helpers import REPO, recipe_args, run_process
from twinfold.train.cli import COMMANDS, main

USER_PROJECT = {  # a user's project that installs top-level `models` and `train` of its own
    "pyproject.toml": '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n'
                      '[project]\nname = "user-project"\nversion = "1.0"\n'
                      '[tool.setuptools]\npackages = ["models", "train"]\n',
    "models/__init__.py": 'OWNER = "user"\n',
    "train/__init__.py": 'OWNER = "user"\n',
}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel setuptools builds from a copy of the sources (a build in the checkout would leave build/ there)."""
    tmp = tmp_path_factory.mktemp("wheel")
    for name in ("models", "losses", "train"):
        shutil.copytree(REPO / name, tmp / "src" / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, tmp / "src")
    run_process([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-index", "--no-build-isolation",
                 "-w", tmp / "dist", tmp / "src"], check=True)
    return next((tmp / "dist").glob("twinfold-*.whl"))


def fresh_venv(path: Path) -> Path:
    """A new virtual environment that sees this environment's packages (torch, transformers, ...) but not its
    twinfold: a site folder named in a .pth file joins sys.path, but the .pth files inside it (the editable
    install's import hook) are not run. Returns its python."""
    run_process([sys.executable, "-m", "venv", "--without-pip", path], check=True)
    python = path / "bin" / "python"
    purelib = run_process([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], check=True)
    purelib = Path(purelib.stdout.strip())
    (purelib / "test-environment.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return python


def test_wheel_installs_only_the_twinfold_package(wheel):
    dist_info = "-".join(wheel.name.split("-")[:2]) + ".dist-info"
    assert {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()} == {"twinfold", dist_info}


def test_wheel_trains_beside_a_project_with_its_own_models_and_train(wheel, tmp_path, tiny_bert_path, data_dir):
    python = fresh_venv(tmp_path / "venv")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}
    user = tmp_path / "user-project"
    for name, text in USER_PROJECT.items():
        (user / name).parent.mkdir(parents=True, exist_ok=True)
        (user / name).write_text(text)
    for target in (wheel, user):  # --ignore-installed: this environment's editable twinfold is visible to pip
        run_process([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--no-build-isolation",
                     "--ignore-installed", target], env=env, cwd=tmp_path, check=True)

    pairs, out = tmp_path / "pairs.jsonl", tmp_path / "run"
    pairs.write_text("".join((data_dir / "scifact-train-pairs" / "train.jsonl").read_text().splitlines(True)[:16]))
    data = "data.train=[{path: %s, columns: {anchor: anchor, positive: positive}}]" % pairs
    run_process([tmp_path / "venv" / "bin" / "twinfold", "train",
                 *recipe_args(out, "train.max_steps=2", data, tiny=tiny_bert_path)], env=env, cwd=tmp_path, check=True)
    assert (out / "final" / "model.safetensors").exists()

    probe = ("import twinfold.train.loop, twinfold.models, models, train; "
             "print(models.OWNER, train.OWNER, twinfold.models.BiEncoder.__module__, twinfold.models.__file__)")
    probed = run_process([python, "-c", probe], env=env, cwd=tmp_path, check=True)
    owner_models, owner_train, bi_encoder, location = probed.stdout.split()
    assert (owner_models, owner_train, bi_encoder) == ("user", "user", "twinfold.models.bi_encoder")
    assert Path(location).is_relative_to(tmp_path / "venv")


def test_code_names_modules_by_their_installed_names():
    """A module named by its folder (`models.bi_encoder` for `twinfold.models.bi_encoder`) imports or runs from the
    checkout's root too, as a second copy of the modules, but not once installed."""
    old = re.compile(r"^[ \t]*(from|import) (models|losses|train)\b|(-m |\"-m\", \")(models|train)\b", re.M)
    found = []
    for folder in ("models", "losses", "train", "scripts", "tests"):
        for path in (REPO / folder).rglob("*.py"):
            source = path.read_text()
            found += [f"{path.relative_to(REPO)}:{source.count(chr(10), 0, m.start()) + 1}"
                      for m in old.finditer(source)]
    assert not found, f"name modules twinfold.models, twinfold.train, twinfold.losses: {found}"


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_has_help_under_its_name(command, capsys):
    with pytest.raises(SystemExit) as exit:
        main([command, "--help"])
    assert exit.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: twinfold {command} ")


def test_twinfold_lists_its_commands_and_refuses_others(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--help"])
    overview = capsys.readouterr().out
    assert exit.value.code == 0 and all(f"    {command} " in overview for command in COMMANDS)
    with pytest.raises(SystemExit) as exit:
        main(["fit"])
    assert exit.value.code == 2 and "invalid choice: 'fit'" in capsys.readouterr().err
