"""Safe loading: check a model folder before any weights are read."""
import json
import struct
from pathlib import Path

from twinfold.losses import SIMILARITIES

TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer.model", "spiece.model", "vocab.json")


class ModelLoadError(RuntimeError):
    """A model folder or name that cannot be loaded, with what to do about it."""


def load_head_model(name_or_path: str | Path, what: str, auto_class, allow_pickle: bool = False,
                    trust_remote_code: bool = False):
    """(model, tokenizer, config) of a transformers model with a task head (a cross-encoder, a generator), checked
    like every model: a folder's weights before they are read, safetensors unless `allow_pickle`. `auto_class(config)`
    gives the Auto class to load it with, or raises `ModelLoadError` naming what the model is instead; `what` names
    the role in errors."""
    import pickle

    from transformers import AutoConfig, AutoTokenizer

    from twinfold.models.resolve import describe_attempts, resolve_model_path

    path = resolve_model_path(name_or_path)
    if Path(path).is_dir():
        check_model_folder(Path(path), allow_pickle=allow_pickle)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = auto_class(config).from_pretrained(path, config=config, use_safetensors=not allow_pickle or None,
                                                   trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except pickle.UnpicklingError as e:
        raise refused_pickle(path, e) from e
    except (OSError, ValueError) as e:
        where = f"cannot load {what} from {path}" if Path(path).is_dir() else \
            f"cannot resolve {what} {str(name_or_path)!r}; tried {describe_attempts(name_or_path)}"
        raise ModelLoadError(f"{where}: {e}") from e
    return model, tokenizer, config


def refused_pickle(where, error: Exception) -> ModelLoadError:
    """The one-line error for pickle weights that torch's weights-only loader refused (`pickle.UnpicklingError`)."""
    reason = next((line for line in str(error).splitlines() if "unsupported" in line), "not only tensors")
    return ModelLoadError(f"{where}: its pickle weights were refused by the safe loader, which reads tensors only "
                          f"({reason.strip()}); do not load this file")


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
    if not has_tokenizer(path):
        raise ModelLoadError(
            f"{path}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); save the tokenizer into the folder "
            "with tokenizer.save_pretrained(folder)"
        )


def has_tokenizer(path: Path) -> bool:
    return any((path / name).exists() for name in TOKENIZER_FILES)


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


# sentence-transformers' legacy boolean keys of a Pooling config.json, per pooling mode
POOLING_KEYS = {"cls": "pooling_mode_cls_token", "max": "pooling_mode_max_tokens", "mean": "pooling_mode_mean_tokens",
                "mean_sqrt_len_tokens": "pooling_mode_mean_sqrt_len_tokens",
                "weightedmean": "pooling_mode_weightedmean_tokens", "lasttoken": "pooling_mode_lasttoken"}


def read_sentence_transformers_layout(path: Path) -> tuple[dict, list[Path]]:
    """Settings (pooling, normalize, similarity, max_length, prompts) and the Dense module folders of a
    sentence-transformers layout; ({}, []) without `modules.json`.

    twinfold computes Transformer -> Pooling -> Dense* -> Normalize? exactly as sentence-transformers does;
    anything else raises ModelLoadError naming the module or mode, so no model loads as another network.
    """
    modules_file = path / "modules.json"
    if not modules_file.exists():
        return {}, []
    modules = sorted(_read_json(modules_file), key=lambda m: m.get("idx", 0))
    kinds = [str(m.get("type", "")).rpartition(".")[2] for m in modules]
    supported = "twinfold computes Transformer -> Pooling -> Dense (any number) -> Normalize (optional)"
    if kinds[:2] != ["Transformer", "Pooling"] or modules[0].get("path", "") != "":
        raise ModelLoadError(f"{modules_file}: the modules are {' -> '.join(kinds)} (Transformer at "
                             f"{modules[0].get('path')!r}); {supported}, with the Transformer in the folder itself")
    for i in range(2, len(modules)):
        if kinds[i] not in ("Dense", "Normalize") or kinds[i - 1] == "Normalize":
            raise ModelLoadError(f"{modules_file}: module {modules[i].get('path')!r} of type "
                                 f"{modules[i].get('type')!r} "
                                 f"after {' -> '.join(kinds[:i])} is not supported; {supported}. "
                                 "Convert the model, or use sentence-transformers for it")
    settings = {"normalize": kinds[-1] == "Normalize"}
    pooling_file = path / modules[1]["path"] / "config.json"
    pooling_config = _read_json(pooling_file)
    settings["pooling"] = _pooling_mode(pooling_config, pooling_file)
    for module in modules[2:]:
        config_file = path / module["path"] / "config.json"
        config = _read_json(config_file) if config_file.exists() else {}
        for key in ("module_input_name", "module_output_name"):
            if config.get(key) not in (None, "sentence_embedding"):
                raise ModelLoadError(f"{config_file}: {key} {config[key]!r} is not supported; twinfold applies "
                                     "Dense and Normalize to the pooled sentence embedding only")
    sbert = path / "sentence_bert_config.json"
    if sbert.exists():
        settings.update(_transformer_settings(_read_json(sbert), sbert))
    st_config = path / "config_sentence_transformers.json"
    if st_config.exists():
        settings.update(_prompt_settings(_read_json(st_config), st_config))
    if pooling_config.get("include_prompt", True) is False and any(settings.get("prompts", {}).values()):
        raise ModelLoadError(f"{pooling_file}: include_prompt false (prompt tokens left out of pooling) is not "
                             "supported; twinfold pools over the prompt too")
    return settings, [path / m["path"] for m, kind in zip(modules, kinds) if kind == "Dense"]


def _pooling_mode(config: dict, where: Path) -> str:
    """The one pooling mode of a Pooling config.json (new `pooling_mode` or legacy boolean keys)."""
    mode = config.get("pooling_mode")
    if mode is None:
        mode = [m for m, key in POOLING_KEYS.items() if config.get(key)] or ["mean"]
    modes = [mode] if isinstance(mode, str) else list(mode)
    if len(modes) != 1:
        raise ModelLoadError(f"{where}: pooling modes {' + '.join(modes)} concatenated are not supported; "
                             "twinfold pools with one mode")
    if modes[0] not in POOLING_KEYS:
        raise ModelLoadError(f"{where}: pooling mode {modes[0]!r} is not one of {', '.join(POOLING_KEYS)}")
    return modes[0]


def _transformer_settings(config: dict, where: Path) -> dict:
    """max_length from sentence_bert_config.json; refuse what would change the tokens or the states pooled."""
    if config.get("do_lower_case"):
        raise ModelLoadError(f"{where}: do_lower_case true (sentence-transformers lowercases every text) is not "
                             "supported; lowercase the tokenizer itself or the texts")
    if config.get("transformer_task", "feature-extraction") != "feature-extraction":
        raise ModelLoadError(f"{where}: transformer_task {config['transformer_task']!r} is not supported; "
                             "twinfold pools the encoder's last hidden state (feature-extraction)")
    output = (config.get("modality_config") or {}).get("text", {}).get("method_output_name", "last_hidden_state")
    if output != "last_hidden_state":
        raise ModelLoadError(f"{where}: method_output_name {output!r} is not supported; twinfold pools "
                             "last_hidden_state")
    return {"max_length": int(config["max_seq_length"])} if config.get("max_seq_length") else {}


def _prompt_settings(config: dict, where: Path) -> dict:
    """Every named prompt, the default prompt's name and the similarity, checked."""
    similarity = config.get("similarity_fn_name") or "cosine"
    if similarity not in SIMILARITIES:
        raise ModelLoadError(f"{where}: similarity_fn_name {similarity!r} is not supported; twinfold scores by "
                             f"{' or '.join(SIMILARITIES)}")
    prompts = config.get("prompts") or {}
    if not isinstance(prompts, dict) or not all(isinstance(v, str) for v in prompts.values()):
        raise ModelLoadError(f"{where}: prompts must map names to texts, got {prompts!r}")
    default = config.get("default_prompt_name")
    if default is not None and default not in prompts:
        raise ModelLoadError(f"{where}: default_prompt_name {default!r} is not one of the prompts "
                             f"({', '.join(prompts) or 'none'})")
    return {"similarity": similarity, "prompts": dict(prompts), "default_prompt_name": default}


def _read_json(file: Path):
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{file}: cannot read ({e})") from None
