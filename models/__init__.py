"""The bi-encoder and everything about using it after training: encode, quantise, export, load."""
from twinfold.models.bi_encoder import BiEncoder, EncoderSettings, truncate
from twinfold.models.embeddings import EmbeddingSet, FingerprintMismatch, check_same_model
from twinfold.models.loading import ModelLoadError
from twinfold.models.resolve import resolve_model_path

__all__ = ["BiEncoder", "EncoderSettings", "EmbeddingSet", "FingerprintMismatch", "ModelLoadError",
           "check_same_model", "resolve_model_path", "truncate"]
