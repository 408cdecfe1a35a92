"""Contrastive losses as functions of embeddings: InfoNCE, distillation from teacher scores (MarginMSE, KL),
Matryoshka, quantization-aware terms, cross-process gathering, cached steps."""
from twinfold.losses.cached import ReplayMismatch, cached_backward, chunked, uncached_backward
from twinfold.losses.distill import DISTILLATION_KINDS, Distillation, listwise_kl, margin_mse, student_scores
from twinfold.losses.distributed import average_gradient, gather_no_grad, gather_with_grad, rank_offset
from twinfold.losses.infonce import (
                                     DEFAULT_TEMPERATURE,
                                     MIN_TEMPERATURE,
                                     ROLES,
                                     SIMILARITIES,
                                     InfoNCE,
                                     info_nce,
                                     text_keys,
)
from twinfold.losses.matryoshka import Matryoshka, check_dims, truncate
from twinfold.losses.quantization import (
    ESTIMATORS,
    Quantized,
    binarize,
    fake_int8,
    int8_ranges,
    sign_bit_ranking_loss,
    sign_misalignment,
)

__all__ = ["DEFAULT_TEMPERATURE", "DISTILLATION_KINDS", "ESTIMATORS", "MIN_TEMPERATURE", "ROLES", "SIMILARITIES",
           "Distillation", "InfoNCE", "Matryoshka", "Quantized", "ReplayMismatch", "average_gradient", "binarize",
           "cached_backward", "check_dims", "chunked", "fake_int8", "gather_no_grad", "gather_with_grad", "info_nce",
           "int8_ranges", "listwise_kl", "margin_mse", "rank_offset", "sign_bit_ranking_loss", "sign_misalignment",
           "student_scores", "text_keys", "truncate", "uncached_backward"]
