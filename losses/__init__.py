"""Contrastive losses as functions of embeddings: InfoNCE, Matryoshka, cross-process gathering, cached steps."""
from twinfold.losses.cached import ReplayMismatch, cached_backward, chunked, uncached_backward
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

__all__ = ["DEFAULT_TEMPERATURE", "MIN_TEMPERATURE", "ROLES", "SIMILARITIES", "InfoNCE", "Matryoshka",
           "ReplayMismatch", "average_gradient", "cached_backward", "check_dims", "chunked", "gather_no_grad",
           "gather_with_grad", "info_nce", "rank_offset", "text_keys", "truncate", "uncached_backward"]
