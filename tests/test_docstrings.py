"""Docstring rules: every public function and class has a Google-style docstring (a summary line first) that
ends with a ``References:`` line; every named merge method cites at least one author and year."""

from __future__ import annotations

import importlib
import inspect
import re

import pytest

import jmerge

MODULES = ["jmerge", "jmerge.core", "jmerge.methods", "jmerge.learned", "jmerge.io", "jmerge.mergekit",
           "jmerge.pipeline", "jmerge.cli", "jmerge.kernels", "jmerge.models", "jmerge.moe", "jmerge.lora",
           "jmerge.sweep", "jmerge.dynamic", "jmerge.dynamic.nnx"]


def _public():
    out = []
    for modname in MODULES:
        mod = importlib.import_module(modname)
        for name in getattr(mod, "__all__", []):
            obj = getattr(mod, name, None)
            if inspect.isfunction(obj) or inspect.isclass(obj):
                out.append(pytest.param(obj, id=f"{modname}.{name}"))
    return out


def _own_doc(obj) -> str:
    """The object's own docstring (``inspect.getdoc`` would fall back to a base class's), cleaned."""
    return inspect.cleandoc(obj.__doc__ or "")


def test_public_names_found():
    assert len(_public()) > 100


@pytest.mark.parametrize("obj", _public())
def test_public_docstring(obj):
    doc = _own_doc(obj)
    assert doc, f"{obj.__qualname__} has no docstring"
    summary = doc.splitlines()[0].strip()
    assert summary, f"{obj.__qualname__}: the docstring does not start with a summary line"
    # A dataclass without a docstring gets ``Name(field: type, ...)`` as its __doc__: not a summary.
    assert not summary.startswith(f"{obj.__name__}("), f"{obj.__qualname__}: auto-generated dataclass docstring"
    assert "References:" in doc, f"{obj.__qualname__}: the docstring has no 'References:' line"


_AUTHOR_YEAR = re.compile(r"[A-Z][A-Za-z'\-]+.*?\(?\b(?:1[89]|20)\d{2}\b\)?", re.S)


@pytest.mark.parametrize("name", sorted(jmerge.available_methods()))
def test_method_cites_author_and_year(name):
    factory = jmerge.available_methods()[name]
    doc = _own_doc(factory)
    assert "References:" in doc, f"method {name!r}: the docstring has no 'References:' line"
    refs = doc[doc.index("References:") + len("References:"):]
    assert _AUTHOR_YEAR.search(refs), f"method {name!r}: 'References:' names no author with a year"
