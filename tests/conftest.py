"""Shared pytest fixtures: paths of the tiny HF fixtures and the mergekit goldens.

Fixtures are built by ``scripts/make_tiny_models.py`` (tests/data/tiny/) and
``scripts/make_mergekit_goldens.py`` (tests/data/mergekit/<case>/{config.yml, model.safetensors}).
Golden configs name models by paths relative to the repo root: use the ``in_repo_root`` fixture
(or ``REPO_ROOT``) when running them.
"""

from __future__ import annotations

import gc
import os
import sys

import pytest

# CLI merges enable JAX's persistent compilation cache: keep the tests' cache out of ~/.cache (and out of a
# $JMERGE_COMPILE_CACHE the user set), and give every test process its own directory. pytest-xdist's
# workers inherit the controller's environment, and JAX writes cache entries without a lock and not
# atomically (lru_cache.put with eviction off): workers sharing one directory could read each other's
# half-written entries. Once a CLI test turned the cache on, the worker uses it for every later compile.
# (Subprocesses that a test starts use their test process's directory while it waits for them.)
if os.environ.get("JMERGE_TEST_CACHE_PID") != str(os.getpid()):
    import tempfile
    os.environ["JMERGE_COMPILE_CACHE"] = tempfile.mkdtemp(prefix=f"jmerge-test-xla-{os.getpid()}-")
    os.environ["JMERGE_TEST_CACHE_PID"] = str(os.getpid())

REPO_ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
DATA_DIR = os.path.join(REPO_ROOT, "tests", "data")
TINY_DIR = os.path.join(DATA_DIR, "tiny")
MERGEKIT_DIR = os.path.join(DATA_DIR, "mergekit")


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """After each test module, drop JAX's cached executables.

    Every XLA:CPU executable keeps its JIT-compiled code in memory mappings of its own, and JAX's caches keep
    thousands of executables: two test modules alone left ~27,000 mappings in one process, so a worker that
    runs half of this suite nears the kernel's ``vm.max_map_count`` (65530), where XLA cannot map memory for
    its next executable. That is the likely cause of the CI crashes seen (a worker segfaulted in the unwinder
    while an error from ``backend_compile_and_load`` or ``deserialize_executable`` was thrown). With this
    fixture the largest count at a module's end in a full run is ~21,000 (``test_chunks.py``);
    ``tests/test_jit_mappings.py`` checks that ``jax.clear_caches()`` releases the mappings.
    """
    yield
    jax = sys.modules.get("jax")
    if jax is not None:
        jax.clear_caches()
        gc.collect()


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
