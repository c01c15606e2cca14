"""Fixtures shared by the test modules."""

from __future__ import annotations

import pytest

import hf_fna.integration.backend


@pytest.fixture
def fna_calls(monkeypatch) -> list[int]:
    """The sequence lengths of the Nyström attention calls of the test (FNA really ran, not an exact fallback)."""
    lengths: list[int] = []
    original = hf_fna.integration.backend.nystrom_attention

    def counting(query, *args, **kwargs):
        lengths.append(query.shape[2])
        return original(query, *args, **kwargs)

    monkeypatch.setattr(hf_fna.integration.backend, "nystrom_attention", counting)
    return lengths
