"""The bi-encoder and everything about using it after training: encode, quantise, export, load."""
from models.bi_encoder import BiEncoder, EncoderSettings, truncate
from models.embeddings import EmbeddingSet, FingerprintMismatch, check_same_model
from models.loading import ModelLoadError
from models.resolve import resolve_model_path

__all__ = ["BiEncoder", "EncoderSettings", "EmbeddingSet", "FingerprintMismatch", "ModelLoadError",
           "check_same_model", "resolve_model_path", "truncate"]
