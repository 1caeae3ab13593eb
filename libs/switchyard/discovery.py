"""Find the policy classes of a `policies/` package by name (one file per policy; routing and
autoscaling both use it, so adding a policy is adding a file)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from types import ModuleType
from typing import TypeVar

T = TypeVar("T")


def discover(package: ModuleType, base: type[T], kind: str) -> dict[str, type[T]]:
    """Concrete subclasses of `base` defined in `package`'s modules, by their `name`."""
    found: dict[str, type[T]] = {}
    for module_info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{module_info.name}")
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, base) and not inspect.isabstract(value) \
                    and value is not base and value.__module__ == module.__name__:
                name = value.name  # type: ignore[attr-defined]
                if name in found:
                    raise RuntimeError(f"two {kind} policies are named {name!r}")
                found[name] = value
    return found
