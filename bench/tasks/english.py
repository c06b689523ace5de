"""Real English sentences that install offline, grouped by document.

Sources: the Python language reference shipped as ``pydoc_data.topics`` (one document per topic),
the docstrings of the standard library's modules (one document per module, read with ``ast``,
nothing imported) and the long descriptions in the METADATA of a fixed list of installed packages
(one document each). Code, markup and tables are stripped; sentences of 6 to 40 words remain.
Documents are split into training and held-out sets by a hash of their name, so no held-out
sentence comes from a document seen in training. Deterministic for a given Python and package
set; :func:`fingerprint` says which one a result came from.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import re
import sys
from importlib import metadata

#: Packages whose METADATA prose is used (hf_oto's own dependencies: present wherever it runs).
METADATA_PACKAGES = ("transformers", "datasets", "accelerate", "torch", "huggingface_hub", "tokenizers",
                     "evaluate", "numpy", "safetensors")

_CODE_LINE = re.compile(r"^\s*(>>>|\.\.\.|\$|\||[{}\[\]()]|#|```|::|\.\. |[-=~^*+]{3,})")
_ROLE = re.compile(r":[a-z:]+:`~?([^`<]*?)(?:\s*<[^>]*>)?`")
_LINK = re.compile(r"!?\[([^\]]*)\]\([^)]*\)")
_MARKUP = re.compile(r"[`*_]{1,2}([^`*_]+)[`*_]{1,2}")
_URL = re.compile(r"https?://\S+")
_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
_SENTENCE = re.compile(r"^[A-Z\"'(][^<>{}\[\]|=\\]*[.!?]$")


def _prose(text: str) -> str:
    """Paragraph text with code blocks, markup, links and tables removed."""
    lines, in_code = [], False
    for line in text.splitlines():
        if line.strip().startswith("```"):
            in_code = not in_code
            continue
        if in_code or line.startswith(("    ", "\t")) or _CODE_LINE.match(line):
            lines.append("")
            continue
        lines.append(line.strip())
    text = "\n".join(lines)
    text = _URL.sub("", _LINK.sub(r"\1", _ROLE.sub(r"\1", text)))
    text = _MARKUP.sub(r"\1", text)
    return text


def sentences_of(text: str, min_words: int = 6, max_words: int = 40) -> list[str]:
    """The sentences of ``text`` that read as prose.

    Example:
        >>> sentences_of("A list is mutable. x = [1]\\n\\n    code\\nIt can hold any object of any type.")
        ['It can hold any object of any type.']
    """
    out = []
    for paragraph in re.split(r"\n\s*\n", _prose(text)):
        paragraph = " ".join(paragraph.split())
        for s in _SPLIT.split(paragraph):
            words = s.split()
            if min_words <= len(words) <= max_words and _SENTENCE.match(s) and sum(c.isalpha() for c in s) > 0.7 * len(s.replace(" ", "")):
                out.append(s)
    return out


def _topic_documents() -> dict[str, str]:
    from pydoc_data.topics import topics

    return {f"topic:{k}": v for k, v in topics.items()}


def _docstring_documents() -> dict[str, str]:
    docs = {}
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in ("this", "antigravity"):
            continue
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            continue
        try:
            with open(spec.origin, encoding="utf-8") as f:
                tree = ast.parse(f.read())
        except (OSError, SyntaxError, UnicodeDecodeError):
            continue
        parts = [ast.get_docstring(tree) or ""]
        parts += [ast.get_docstring(node) or "" for node in tree.body
                  if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))]
        text = "\n\n".join(p for p in parts if p)
        if text:
            docs[f"module:{name}"] = text
    return docs


def _metadata_documents() -> dict[str, str]:
    docs = {}
    for package in METADATA_PACKAGES:
        try:
            text = metadata.metadata(package).get_payload() or ""
        except metadata.PackageNotFoundError:
            continue
        if text:
            docs[f"package:{package}"] = text
    return docs


def documents() -> dict[str, list[str]]:
    """Document name -> its sentences (documents with none are left out)."""
    out = {}
    for source in (_topic_documents, _docstring_documents, _metadata_documents):
        for name, text in source().items():
            sentences = list(dict.fromkeys(sentences_of(text)))  # unique, in order
            if sentences:
                out[name] = sentences
    return out


def is_held_out(document: str, fraction: float = 0.2) -> bool:
    """Whether a document belongs to the held-out set (a stable hash of its name)."""
    digest = int(hashlib.sha256(document.encode()).hexdigest()[:8], 16)
    return digest / 0xFFFFFFFF < fraction


def split_sentences(held_out_fraction: float = 0.2) -> tuple[list[str], list[str]]:
    """``(training sentences, held-out sentences)``, split by document, each sentence once."""
    train, held = [], []
    seen = set()
    for name, sentences in sorted(documents().items()):
        target = held if is_held_out(name, held_out_fraction) else train
        for s in sentences:
            if s not in seen:
                seen.add(s)
                target.append(s)
    return train, held


def fingerprint(sentences: list[str]) -> str:
    """A short hash identifying a sentence list (to tell whether two runs used the same data)."""
    return hashlib.sha256("\n".join(sentences).encode()).hexdigest()[:12]
