"""JSON round-trip shared by every option dataclass (groups, SFW, DSP, OPQ).

Options travel through ``OTOTrainingArguments`` and ``config.json``, so a misspelt key must fail
loudly instead of being dropped: :meth:`JsonConfigMixin.from_dict` rejects unknown names.
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from typing import Any, ClassVar, TypeVar

_Config = TypeVar("_Config", bound="JsonConfigMixin")


class JsonConfigMixin:
    """``to_dict``/``from_dict``/``to_json``/``from_json`` for a dataclass.

    Example::

        >>> from hf_oto.graph import GroupConfig
        >>> GroupConfig.from_json(GroupConfig(prune_hidden=True).to_json()).prune_hidden
        True
        >>> GroupConfig.from_options({"prune_heads": False}, prune_hidden=True).prune_heads
        False
        >>> GroupConfig().replace(prune_head=False)
        Traceback (most recent call last):
        ValueError: unknown GroupConfig fields ['prune_head']; known: [...]
    """

    # Name used in the unknown-option error, e.g. "sfw options".
    config_label: ClassVar[str] = "options"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls: type[_Config], data: dict[str, Any]) -> _Config:
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown {cls.config_label} {unknown}; known: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_json(cls: type[_Config], text: str) -> _Config:
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_options(cls: type[_Config], config: _Config | dict[str, Any] | None = None, **options: Any) -> _Config:
        """A new config from an instance, a dict or nothing, with ``options`` on top."""
        base = {} if config is None else dict(config) if isinstance(config, dict) else config.to_dict()
        return cls.from_dict({**base, **options})

    def replace(self: _Config, **options: Any) -> _Config:
        """A copy with ``options`` changed (checked like :meth:`from_dict`)."""
        return type(self).from_options(self, **options)
