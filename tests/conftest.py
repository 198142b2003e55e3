"""Shared pytest fixtures: paths of the tiny HF fixtures and the mergekit goldens.

Fixtures are built by ``scripts/make_tiny_models.py`` (tests/data/tiny/) and
``scripts/make_mergekit_goldens.py`` (tests/data/mergekit/<case>/{config.yml, model.safetensors}).
Golden configs name models by paths relative to the repo root: use the ``in_repo_root`` fixture
(or ``REPO_ROOT``) when running them.
"""

from __future__ import annotations

import os

import pytest

# CLI merges enable JAX's persistent compilation cache: keep the tests' cache out of ~/.cache.
if "JMERGE_COMPILE_CACHE" not in os.environ:
    import tempfile
    os.environ["JMERGE_COMPILE_CACHE"] = tempfile.mkdtemp(prefix="jmerge-test-xla-")

REPO_ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
DATA_DIR = os.path.join(REPO_ROOT, "tests", "data")
TINY_DIR = os.path.join(DATA_DIR, "tiny")
MERGEKIT_DIR = os.path.join(DATA_DIR, "mergekit")


@pytest.fixture(scope="session")
def repo_root() -> str:
    """Absolute path of the repository root."""
    return REPO_ROOT


@pytest.fixture
def in_repo_root(monkeypatch) -> str:
    """Run the test with the repo root as working directory (golden configs use relative paths)."""
    monkeypatch.chdir(REPO_ROOT)
    return REPO_ROOT


@pytest.fixture(scope="session")
def tiny_dir() -> str:
    """tests/data/tiny: base/, ft1..ft3/ (tiny bf16 Llama), tied_base/, tied_ft1..2/, gpt2_base/, gpt2_ft1..2/."""
    if not os.path.isdir(os.path.join(TINY_DIR, "base")):
        pytest.skip("tiny fixtures missing; run scripts/make_tiny_models.py")
    return TINY_DIR


@pytest.fixture(scope="session")
def tiny_base(tiny_dir) -> str:
    """HF dir of the tiny bf16 Llama base model (with a tokenizer)."""
    return os.path.join(tiny_dir, "base")


@pytest.fixture(scope="session")
def tiny_fts(tiny_dir) -> list[str]:
    """HF dirs of the three fine-tuned variants of ``tiny_base``."""
    return [os.path.join(tiny_dir, f"ft{i}") for i in (1, 2, 3)]


@pytest.fixture(scope="session")
def tiny_tied(tiny_dir) -> tuple[str, list[str]]:
    """(base dir, [ft dirs]) of the tied-embedding variant (no lm_head tensor)."""
    return os.path.join(tiny_dir, "tied_base"), [os.path.join(tiny_dir, f"tied_ft{i}") for i in (1, 2)]


@pytest.fixture(scope="session")
def tiny_gpt2(tiny_dir) -> tuple[str, list[str]]:
    """(base dir, [ft dirs]) of a tiny GPT-2 (tied wte, Conv1D weights, ``transformer.h.N`` names, biases)."""
    return os.path.join(tiny_dir, "gpt2_base"), [os.path.join(tiny_dir, f"gpt2_ft{i}") for i in (1, 2)]


def mergekit_cases() -> list[str]:
    """Names of the stored mergekit golden cases (usable in ``pytest.mark.parametrize``)."""
    if not os.path.isdir(MERGEKIT_DIR):
        return []
    return sorted(d for d in os.listdir(MERGEKIT_DIR) if os.path.isfile(os.path.join(MERGEKIT_DIR, d, "config.yml")))


@pytest.fixture(scope="session")
def mergekit_golden():
    """``mergekit_golden(case) -> (config_yaml_text, path to mergekit's model.safetensors)``."""

    def get(case: str) -> tuple[str, str]:
        d = os.path.join(MERGEKIT_DIR, case)
        if not os.path.isfile(os.path.join(d, "config.yml")):
            pytest.skip(f"mergekit golden {case!r} missing; run scripts/make_mergekit_goldens.py")
        with open(os.path.join(d, "config.yml")) as f:
            return f.read(), os.path.join(d, "model.safetensors")

    return get
