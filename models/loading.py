"""Safe loading: check a model folder before any weights are read."""
import json
import struct
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer.model", "spiece.model", "vocab.json")


class ModelLoadError(RuntimeError):
    """A model folder or name that cannot be loaded, with what to do about it."""


def check_model_folder(path: Path, allow_pickle: bool = False) -> None:
    """Raise ModelLoadError for a folder that is missing, partial, corrupt or pickle-only without opt-in."""
    if not path.is_dir():
        raise ModelLoadError(f"{path}: not a folder")
    if not (path / "config.json").exists():
        raise ModelLoadError(f"{path}: no config.json, so this is not a Hugging Face model folder")
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.exists():
        check_safetensors_file(single)
    elif index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        for shard in shards:
            if not (path / shard).exists():
                raise ModelLoadError(f"{path}: shard {shard} named in {index.name} is missing")
            check_safetensors_file(path / shard)
    elif any(path.glob("pytorch_model*.bin")):
        if not allow_pickle:
            raise ModelLoadError(
                f"{path}: has only pickle weights (pytorch_model.bin), which can run arbitrary code when loaded. "
                "Convert them to safetensors, or, if you trust their source, opt in with allow_pickle=True "
                "(command line: --allow-pickle; config: model.allow_pickle: true)."
            )
    else:
        raise ModelLoadError(f"{path}: no weights (model.safetensors) found")
    if not any((path / name).exists() for name in TOKENIZER_FILES):
        raise ModelLoadError(
            f"{path}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); save the tokenizer into the folder "
            "with tokenizer.save_pretrained(folder)"
        )


def check_safetensors_file(file: Path) -> None:
    """Check that a safetensors file's header parses and its data is all there (catches truncation)."""
    size = file.stat().st_size
    try:
        with open(file, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(header_len))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError) as e:
        raise ModelLoadError(f"{file}: corrupt safetensors file ({e})") from e
    if 8 + header_len + end > size:
        raise ModelLoadError(
            f"{file}: truncated ({size} bytes, the header promises {8 + header_len + end}); "
            "the file was not written completely: export or download it again"
        )


def read_sentence_transformers_settings(path: Path) -> dict:
    """Pooling, normalisation, max_length and prefixes from a sentence-transformers layout, if present."""
    settings: dict = {}
    modules_file = path / "modules.json"
    if not modules_file.exists():
        return settings
    modules = json.loads(modules_file.read_text())
    settings["normalize"] = any(m.get("type", "").endswith("Normalize") for m in modules)
    for module in modules:
        if module.get("type", "").endswith("Pooling"):
            pooling = json.loads((path / module["path"] / "config.json").read_text())
            for mode in ("mean", "cls", "max"):
                if pooling.get(f"pooling_mode_{mode}_tokens") or (mode == "cls" and pooling.get("pooling_mode_cls_token")):
                    settings["pooling"] = mode
                    break
            if pooling.get("pooling_mode") in ("mean", "cls", "max"):
                settings["pooling"] = pooling["pooling_mode"]
    sbert = path / "sentence_bert_config.json"
    if sbert.exists():
        max_len = json.loads(sbert.read_text()).get("max_seq_length")
        if max_len:
            settings["max_length"] = int(max_len)
    st_config = path / "config_sentence_transformers.json"
    if st_config.exists():
        prompts = json.loads(st_config.read_text()).get("prompts") or {}
        if prompts.get("query"):
            settings["query_prefix"] = prompts["query"]
        doc = prompts.get("document") or prompts.get("passage")
        if doc:
            settings["document_prefix"] = doc
    return settings
