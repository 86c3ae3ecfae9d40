"""Named implementations of one kind (objectives, fine-tuning tasks): the only list of their names.

A package lists its implementations in its ``__init__`` as ``"module:attribute"`` paths, so the names are known
(config validation, help text) without importing the implementations or torch; an implementation is imported
when it is first looked up. A name registered twice is an error, and so is one that is not registered.

    OBJECTIVES = Registry("objective")
    OBJECTIVES.add("contrastive", "pretrain.objectives.contrastive:Contrastive")
    OBJECTIVES["contrastive"]  # imports the module, returns the class (its ``name`` attribute set)
"""

from __future__ import annotations

import importlib
from typing import Any, Iterator

from mmfuse.schema import ConfigError


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._paths: dict[str, str] = {}
        self._loaded: dict[str, Any] = {}

    def add(self, name: str, path: str) -> None:
        """Register ``path`` (``"package.module:Attribute"``) under ``name``; a name already taken is refused."""
        if name in self._paths:
            raise ValueError(f"{self.kind} {name!r} is registered twice: {self._paths[name]} and {path}")
        if ":" not in path:
            raise ValueError(f"{self.kind} {name!r}: {path!r} is not a 'module:attribute' path")
        self._paths[name] = path

    def names(self) -> tuple[str, ...]:
        """The registered names, in registration order."""
        return tuple(self._paths)

    def __contains__(self, name: object) -> bool:
        return name in self._paths

    def __iter__(self) -> Iterator[str]:
        return iter(self._paths)

    def __len__(self) -> int:
        return len(self._paths)

    def check(self, name: str, key: str) -> None:
        """A ConfigError naming the config ``key`` and the known names when ``name`` is not registered."""
        if name not in self._paths:
            raise ConfigError(f"{key}={name!r} is not a known {self.kind}; known: {', '.join(self._paths)}")

    def __getitem__(self, name: str) -> Any:
        if name not in self._loaded:
            self.check(name, self.kind)
            module, attribute = self._paths[name].split(":")
            value = getattr(importlib.import_module(module), attribute)
            value.name = name
            self._loaded[name] = value
        return self._loaded[name]
