"""Export a model folder that twinfold and sentence-transformers both load.

    python -m twinfold.models.export SRC DST [--dtype float32|bfloat16|float16] [--onnx | --onnx-int8 | --adapter]

SRC: a training checkpoint (its `model/` folder is used) or any model folder; a folder twinfold wrote is checked
against its manifest first (a damaged file is named, nothing is exported). DST gets `model.safetensors`,
`config.json`, tokenizer files, `twinfold.json`, the sentence-transformers layout and `README.md` (the model
card, see models.card). `--onnx` adds `onnx/model.onnx` (the encoder, for `SentenceTransformer(DST,
backend="onnx")` and `compute="onnx"`), `--onnx-int8` that and its int8 copy (see models.onnx). The weights keep
SRC's dtype unless `--dtype` names another. A LoRA model is written merged into ordinary weights; with
`--adapter`, as its adapter alone, which peft, sentence-transformers and twinfold load over the base model (see
models.lora). DST must be new, empty or an earlier twinfold export (`--overwrite` replaces anything else), and
never a training checkpoint or a folder inside a run's `checkpoints/` (SRC and DST swapped, say), whatever the
options.
"""
import argparse
import json
import logging
import sys
from pathlib import Path

from twinfold.models.card import write_model_card
from twinfold.models.families import DTYPES
from twinfold.models.head import save_dense
from twinfold.models.loading import POOLING_KEYS
from twinfold.models.lora import ADAPTER_CONFIG, has_lora
from twinfold.models.onnx import export_onnx
from twinfold.models.tokens import ends_with_eos, eos_appending_copy

log = logging.getLogger(__name__)
EXPORT_FORMAT = 1
CHECKPOINT_STATE = "trainer_state.json"  # written last into every complete training checkpoint (train.checkpoint)


def write_model_folder(model, folder: Path, onnx: bool = False, onnx_int8: bool = False,
                       adapter: bool = False) -> None:
    """Write `model` (a BiEncoder) into an existing empty `folder`; `onnx` adds the encoder as ONNX, `onnx_int8`
    that and its int8 copy (see `models.onnx`). A LoRA model is written with its adapter merged into the weights,
    or with `adapter` as its adapter alone (`adapter_config.json`, `adapter_model.safetensors`; models.lora)."""
    folder = Path(folder)
    if adapter and not has_lora(model.encoder):
        raise ValueError("the model has no LoRA adapter to export; export it without --adapter")
    if not adapter:
        model = model.merged()
    if onnx or onnx_int8:
        export_onnx(model, folder, int8=onnx_int8)
    # a PeftModel writes its adapter only; the embeddings never train (and peft would ask the hub whether they did)
    extra = {"save_embedding_layers": False} if adapter else {}
    model.encoder.save_pretrained(folder, safe_serialization=True, **extra)
    save_tokenizer(model, folder)
    s = model.settings
    meta = {"format": EXPORT_FORMAT, **model.settings_dict(), "fingerprint": model.fingerprint(), **model.info}
    _write_json(folder / "twinfold.json", meta)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    for dense in model.head:
        idx = len(modules)
        save_dense(dense, folder / f"{idx}_Dense")
        modules.append({"idx": idx, "name": str(idx), "path": f"{idx}_Dense",
                        "type": "sentence_transformers.models.Dense"})
    if s.normalize:
        idx = len(modules)
        modules.append({"idx": idx, "name": str(idx), "path": f"{idx}_Normalize",
                        "type": "sentence_transformers.models.Normalize"})
    _write_json(folder / "modules.json", modules)
    (folder / "1_Pooling").mkdir()
    _write_json(folder / "1_Pooling" / "config.json", {
        "word_embedding_dimension": model.encoder.config.hidden_size,
        **{key: s.pooling == mode for mode, key in POOLING_KEYS.items()},
        "include_prompt": True,
    })
    _write_json(folder / "sentence_bert_config.json", {"max_seq_length": s.max_length, "do_lower_case": False})
    _write_json(folder / "config_sentence_transformers.json", {
        "prompts": s.prompts, "default_prompt_name": s.default_prompt_name, "similarity_fn_name": s.similarity})
    write_model_card(model, folder)


def save_tokenizer(model, folder: Path) -> None:
    """Save the tokenizer; with `append_eos`, one that appends the EOS token itself where it does not already, so
    that sentence-transformers loading the folder tokenizes as twinfold does (a warning says when it cannot)."""
    from transformers import AutoTokenizer

    tokenizer = model.tokenizer
    if not model.settings.append_eos or ends_with_eos(tokenizer):
        tokenizer.save_pretrained(folder)
        return
    if getattr(tokenizer, "backend_tokenizer", None) is not None:
        eos_appending_copy(tokenizer).save_pretrained(folder)
        if ends_with_eos(AutoTokenizer.from_pretrained(folder)):
            return
    else:
        tokenizer.save_pretrained(folder)
    log.warning("%s: the saved tokenizer does not append the EOS token; twinfold appends it (append_eos in "
                "twinfold.json), sentence-transformers loading this folder will not", folder)


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def model_folder_of(src: Path) -> Path:
    """The model folder inside a training checkpoint (a model or LoRA adapter folder), or `src` itself."""
    inner = src / "model"
    return inner if (inner / "config.json").exists() or (inner / ADAPTER_CONFIG).exists() else src


def check_intact(src: Path) -> None:
    """Raise `ModelLoadError` naming the damaged file if a checkpoint, or a folder carrying a manifest, does not
    match its manifest (`models.atomic.verify_manifest`)."""
    from twinfold.models.files.atomic import MANIFEST, verify_manifest
    from twinfold.models.loading import ModelLoadError

    for folder in dict.fromkeys((src, model_folder_of(src))):
        if (folder / CHECKPOINT_STATE).exists() or (folder / MANIFEST).exists():
            if problem := verify_manifest(folder):
                raise ModelLoadError(f"{folder} is damaged: {problem}; nothing was exported (export an intact "
                                     "checkpoint, e.g. an earlier step)")


def check_not_a_checkpoint(dst: Path) -> None:
    """Raise `OverwriteRefused` if `dst` is, or is inside, a training checkpoint or a run's `checkpoints/` folder."""
    from twinfold.models.files.atomic import OverwriteRefused

    dst = Path(dst).resolve()
    for folder in (dst, *dst.parents):
        checkpoint = (folder / CHECKPOINT_STATE).is_file()
        if checkpoint or (folder.name == "checkpoints" and folder.is_dir()
                          and any((c / CHECKPOINT_STATE).is_file() for c in folder.iterdir())):
            kind = "a training checkpoint" if checkpoint else "a run's checkpoints folder"
            raise OverwriteRefused(f"{dst} is {'' if folder == dst else 'inside '}{kind} ({folder}); an export "
                                   "never goes there (are SRC and DST swapped?); choose another folder")


def main(argv: list[str] | None = None, prog: str = "python -m twinfold.models.export") -> int:
    from twinfold.models.bi_encoder import BiEncoder
    from twinfold.models.files.atomic import check_replaceable, check_writable
    from twinfold.models.loading import ModelLoadError

    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path, help="training checkpoint or model folder")
    parser.add_argument("dst", type=Path, help="output folder: new, empty or an earlier export (replaced atomically)")
    parser.add_argument("--overwrite", action="store_true", help="replace DST even if twinfold did not write it")
    parser.add_argument("--allow-pickle", action="store_true", help="accept pytorch_model.bin weights")
    parser.add_argument("--trust-remote-code", action="store_true", help="run the model's own code")
    parser.add_argument("--dtype", choices=DTYPES[1:], help="dtype of the exported weights (default: SRC's)")
    parser.add_argument("--onnx", action="store_true", help="add onnx/model.onnx (needs the onnx extra)")
    parser.add_argument("--onnx-int8", action="store_true", help="add onnx/model.onnx and its int8 copy")
    parser.add_argument("--adapter", action="store_true",
                        help="SRC has a LoRA adapter: write the adapter alone (loads over its base), not merged")
    args = parser.parse_args(argv)
    if args.adapter and (args.onnx or args.onnx_int8):
        parser.error("--adapter writes no weights of the base: not with --onnx or --onnx-int8")
    try:
        # before loading anything
        check_not_a_checkpoint(args.dst)
        check_replaceable(args.dst, args.overwrite, "Choose another folder or pass --overwrite to replace it")
        check_writable(args.dst, "DST")
        check_intact(args.src)
        model = BiEncoder.from_pretrained(model_folder_of(args.src), dtype=args.dtype or "auto",
                                          allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code)
        model.save_pretrained(args.dst, overwrite=args.overwrite, onnx=args.onnx, onnx_int8=args.onnx_int8,
                              adapter=args.adapter)
    except (ModelLoadError, OSError, ImportError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {args.src} -> {args.dst} (fingerprint {model.fingerprint()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
