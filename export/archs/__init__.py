"""The architecture registry: one module per architecture in this package, each registering a class.

Every stage asks the registry instead of keeping its own tables: `for_model_type("qwen2")` for a
Hugging Face config, `for_gguf_arch("gemma3")` for a GGUF. Adding an architecture is one module
here (a subclass of `base.Architecture` decorated with `@register`) plus its tests; this package
imports every module in it, so nothing else needs editing.
"""

from __future__ import annotations

import importlib
import pkgutil

from recover_lora.errors import RecoverLoraError
from recover_lora.export.archs.base import Architecture

_REGISTRY: list[type[Architecture]] = []


def register(cls: type[Architecture]) -> type[Architecture]:
    """Class decorator: make an architecture known to every stage (registration order = lookup order)."""
    if any(a.model_type == cls.model_type for a in _REGISTRY):
        raise RecoverLoraError(f"internal error: architecture {cls.model_type!r} registered twice")
    _REGISTRY.append(cls)
    return cls


def _load_all() -> None:
    for module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
        if module != "base":
            importlib.import_module(f"{__name__}.{module}")


def architectures() -> list[type[Architecture]]:
    return list(_REGISTRY)


def supported() -> str:
    return ", ".join(a.describe() for a in _REGISTRY)


def for_model_type(model_type: str) -> type[Architecture]:
    """The architecture of a config.json `model_type`."""
    for arch in _REGISTRY:
        if arch.model_type == model_type:
            return arch
    raise RecoverLoraError(f"unsupported architecture {model_type!r}; supported: {supported()}")


def for_gguf_arch(gguf_arch: str) -> type[Architecture]:
    """The architecture that reads a GGUF's `general.architecture` (llama -> llama, not mistral)."""
    for arch in _REGISTRY:
        if arch.gguf_arch == gguf_arch and arch.reads_gguf:
            return arch
    names = sorted({a.gguf_arch for a in _REGISTRY})
    raise RecoverLoraError(f"unsupported GGUF architecture {gguf_arch!r}; supported: {', '.join(names)}")


_load_all()
