"""Shared fixtures: the tiny random checkpoints of `support` (built once per session), both variants
(`tiny`) or the GQA one alone (`tiny_gqa`). Tests that need torch, transformers or many passes carry
the `torch` and `slow` markers (pyproject)."""

from __future__ import annotations

import pytest
from support import VARIANTS, Tiny, tiny_model  # support sets HF_HUB_OFFLINE before anything reads it


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session", params=list(VARIANTS))
def tiny(request, tiny_root) -> Tiny:
    return tiny_model(tiny_root, request.param)


@pytest.fixture(scope="session")
def tiny_gqa(request, tiny_root) -> Tiny:
    return tiny_model(tiny_root, "gqa")
