"""Distillation methods, registered by name with their options.

``METHODS["cudfkd"]`` holds the builder and the options dataclass whose fields
are the method's namespaced config keys (``cudfkd.weight-bn``);
``build_method(name, context)`` builds one, and an unknown name fails with the
list of valid ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fedkd.methods.base import DistillationMethod, MethodContext, QueryBudget
from fedkd.methods.cudfkd import CuDFKD, CuDFKDOptions


@dataclass(frozen=True)
class MethodEntry:
    name: str
    build: Callable[[MethodContext], DistillationMethod]
    options: type
    summary: str


METHODS: dict[str, MethodEntry] = {e.name: e for e in (
    MethodEntry("cudfkd", CuDFKD, CuDFKDOptions, "CuDFKD: easy-to-hard curriculum (Li et al. 2023)"),
)}


def build_method(name: str, context: MethodContext) -> DistillationMethod:
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}; valid names: {', '.join(METHODS)}")
    return METHODS[name].build(context)


__all__ = ["METHODS", "DistillationMethod", "MethodContext", "MethodEntry", "QueryBudget", "build_method"]
