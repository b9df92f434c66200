"""Distillation methods, registered by name.

``build_method("cudfkd", context)``; an unknown name fails with the list of
valid ones.
"""

from __future__ import annotations

from collections.abc import Callable

from fedkd.methods.base import DistillationMethod, MethodContext
from fedkd.methods.cudfkd import CuDFKD

METHODS: dict[str, Callable[[MethodContext], DistillationMethod]] = {
    "cudfkd": CuDFKD,
}


def build_method(name: str, context: MethodContext) -> DistillationMethod:
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}; valid names: {', '.join(METHODS)}")
    return METHODS[name](context)


__all__ = ["METHODS", "DistillationMethod", "MethodContext", "build_method"]
