"""Retrieval evaluation parts: BEIR data, BM25, metrics and the report."""
