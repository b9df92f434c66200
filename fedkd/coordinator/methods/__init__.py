"""Distillation methods, registered by name with their options.

``METHODS["cudfkd"]`` holds the builder and the options dataclass whose fields
are the method's namespaced config keys (``cudfkd.weight-bn``);
``build_method(name, context)`` builds one, and an unknown name fails with the
list of valid ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fedkd.coordinator.methods.base import DistillationMethod, MethodContext, QueryBudget
from fedkd.coordinator.methods.cudfkd import CuDFKD, CuDFKDOptions
from fedkd.coordinator.methods.dafl import DAFL, DAFLOptions
from fedkd.coordinator.methods.deepinversion import DeepInversion, DeepInversionOptions
from fedkd.coordinator.methods.dfad import DFAD, DFADOptions
from fedkd.coordinator.methods.hidfd import HiDFD, HiDFDOptions
from fedkd.coordinator.methods.rdskd import RDSKD, RDSKDOptions
from fedkd.coordinator.methods.tadfkd import TADFKD, TADFKDOptions


@dataclass(frozen=True)
class MethodEntry:
    name: str
    build: Callable[[MethodContext], DistillationMethod]
    options: type
    summary: str


METHODS: dict[str, MethodEntry] = {e.name: e for e in (
    MethodEntry("cudfkd", CuDFKD, CuDFKDOptions, "CuDFKD: easy-to-hard curriculum (Li et al. 2023)"),
    MethodEntry("tadfkd", TADFKD, TADFKDOptions, "TA-DFKD: no class prior, clean-sample selection (Shin et al. 2024)"),
    MethodEntry("rdskd", RDSKD, RDSKDOptions, "RDSKD: two stages, penalised loss increments (Han et al. 2021)"),
    MethodEntry("hidfd", HiDFD, HiDFDOptions, "HiDFD: a few public real images plus a generator (Tang et al. 2025)"),
    MethodEntry("dafl", DAFL, DAFLOptions, "DAFL: one-hot, activation and entropy priors (Chen et al. 2019)"),
    MethodEntry("dfad", DFAD, DFADOptions, "DFAD: adversarial, no priors (Fang et al. 2019)"),
    MethodEntry("deepinversion", DeepInversion, DeepInversionOptions,
                "DeepInversion: inputs optimised from noise (Yin et al. 2020)"),
)}


def build_method(name: str, context: MethodContext) -> DistillationMethod:
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}; valid names: {', '.join(METHODS)}")
    return METHODS[name].build(context)


__all__ = ["METHODS", "DistillationMethod", "MethodContext", "MethodEntry", "QueryBudget", "build_method"]
