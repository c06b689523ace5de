"""The runnable examples in the public docstrings stay true (those marked ``+SKIP`` need a real model)."""

import doctest
import importlib
import pkgutil

import pytest

import hf_oto

MODULES = sorted(m.name for m in pkgutil.walk_packages(hf_oto.__path__, "hf_oto."))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples may name output folders
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, report=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples in {name} failed (run doctest on it)"


def test_the_examples_are_collected():
    finder = doctest.DocTestFinder()
    examples = sum(len(t.examples) for name in MODULES for t in finder.find(importlib.import_module(name)))
    assert examples > 50
