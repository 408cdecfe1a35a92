"""models.atomic: outputs never replace what twinfold did not write; folders carry checksums of their files."""
import json
import sysconfig
from pathlib import Path

import pytest

from tests.helpers import run_process
from twinfold.models import BiEncoder
from twinfold.models.files.atomic import MANIFEST, OverwriteRefused, atomic_directory, verify_manifest


def cli(*args):
    """Run the installed `twinfold` command."""
    command = [str(Path(sysconfig.get_path("scripts")) / "twinfold"), *args]
    return run_process(command)


def test_manifest_lists_every_file_and_names_what_is_damaged(tmp_path):
    with atomic_directory(tmp_path / "out") as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "a.bin").write_bytes(b"0123456789")
        (tmp / "b.txt").write_text("hello")
    out = tmp_path / "out"
    files = json.loads((out / MANIFEST).read_text())["files"]
    assert files == {"b.txt": {"size": 5, "sha256": "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"},
                     "sub/a.bin": {"size": 10, "sha256": files["sub/a.bin"]["sha256"]}}
    assert verify_manifest(out) is None
    (out / "sub" / "a.bin").write_bytes(b"01234")
    assert verify_manifest(out) == "sub/a.bin has 5 bytes, expected 10"
    (out / "sub" / "a.bin").write_bytes(b"0123456780")
    assert verify_manifest(out) == "sub/a.bin does not match its checksum"
    (out / "sub" / "a.bin").unlink()
    assert verify_manifest(out) == "sub/a.bin is missing"
    (out / MANIFEST).unlink()
    assert verify_manifest(out) == f"{MANIFEST} is missing or unreadable"


def test_save_replaces_empty_folders_and_its_own_exports_but_nothing_else(tiny_bert_path, tmp_path):
    model = BiEncoder.from_pretrained(tiny_bert_path)
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "chapter1.tex").write_text("years of work")
    with pytest.raises(OverwriteRefused, match=r"holds 1 file\(s\) twinfold did not write \(e.g. 'chapter1.tex'\)"):
        model.save_pretrained(thesis)
    assert (thesis / "chapter1.tex").read_text() == "years of work" and len(list(thesis.iterdir())) == 1
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep")
    with pytest.raises(OverwriteRefused, match="is not a folder twinfold wrote"):
        model.save_pretrained(a_file)
    assert a_file.read_text() == "keep"

    (tmp_path / "empty").mkdir()
    model.save_pretrained(tmp_path / "empty")
    model.save_pretrained(tmp_path / "empty")  # an earlier twinfold export is replaced
    assert verify_manifest(tmp_path / "empty") is None
    (tmp_path / "empty" / "my-notes.md").write_text("added by hand")  # no longer only twinfold's
    with pytest.raises(OverwriteRefused, match="'my-notes.md'"):
        model.save_pretrained(tmp_path / "empty")
    model.save_pretrained(thesis, overwrite=True)
    assert not (thesis / "chapter1.tex").exists() and BiEncoder.from_pretrained(thesis).dim == 128


def test_export_cli_refuses_a_folder_it_did_not_write(tiny_bert_path, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "photos.zip").write_bytes(b"\x00" * 1000)
    result = cli("export", str(tiny_bert_path), str(home))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: {home} holds 1 file(s) twinfold did not write (e.g. 'photos.zip'); nothing was changed. "
        "Choose another folder or pass --overwrite to replace it"]
    assert (home / "photos.zip").read_bytes() == b"\x00" * 1000
    assert cli("export", str(tiny_bert_path), str(tmp_path / "new")).returncode == 0
    assert cli("export", str(tiny_bert_path), str(tmp_path / "new")).returncode == 0  # its own export
    assert cli("export", str(tiny_bert_path), str(home), "--overwrite").returncode == 0
    assert not (home / "photos.zip").exists()


def test_encode_and_evaluate_clis_refuse_outputs_they_did_not_write(tiny_bert_path, tmp_path, data_dir):
    docs = tmp_path / "docs.jsonl"
    docs.write_text('{"_id": "1", "text": "a cell"}\n{"_id": "2", "text": "a gene"}\n')
    mine = tmp_path / "mine.safetensors"
    mine.write_bytes(b"not embeddings")
    encode = ("encode", "--model", str(tiny_bert_path), "--input", str(docs), "--no-progress", "--output")
    result = cli(*encode, str(mine))
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: {mine} exists and is not a twinfold embedding file; nothing was changed. "
                                     "Choose another path or pass --overwrite / overwrite=True to replace it")
    assert mine.read_bytes() == b"not embeddings"
    ours = tmp_path / "ours.safetensors"
    assert cli(*encode, str(ours)).returncode == 0
    assert cli(*encode, str(ours)).returncode == 0  # a twinfold embedding file is replaced
    assert cli(*encode, str(mine), "--overwrite").returncode == 0

    report_dir = tmp_path / "results"
    report_dir.mkdir()
    (report_dir / "draft.md").write_text("my draft")
    result = cli("evaluate", "--model", str(tiny_bert_path), "--data", str(data_dir / "scifact-nano"),
                 "--out", str(report_dir), "--no-progress")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (f"error: {report_dir} holds 1 entries twinfold did not write (e.g. 'draft.md'); "
                                     "choose a new or empty folder or pass --overwrite")
    assert (report_dir / "draft.md").read_text() == "my draft"
