"""Differential privacy, owned by the client: DP-SGD teachers (``dpsgd``), the release policy its teacher host
applies to every answer (``policy``), the ledger that accounts every release against its budget (``ledger``),
and the settings that say which (``settings``, torch-free).

The names below load on first use, so reading a client's settings (``fedkd.institution.privacy.settings``)
does not import Opacus or torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedkd.institution.privacy.dpsgd import (
        MECHANISM,
        DPSettings,
        contract_status,
        default_delta,
        make_private_model,
        release_noise_multiplier,
        train_dp_sgd,
    )
    from fedkd.institution.privacy.ledger import BudgetExhausted, Entry, PrivacyLedger, recompute_epsilon
    from fedkd.institution.privacy.policy import ReleasePolicy
    from fedkd.institution.privacy.settings import MODES, PrivacySettings

_WHERE = {"MECHANISM": "dpsgd", "DPSettings": "dpsgd", "contract_status": "dpsgd", "default_delta": "dpsgd",
          "make_private_model": "dpsgd", "release_noise_multiplier": "dpsgd", "train_dp_sgd": "dpsgd",
          "BudgetExhausted": "ledger", "Entry": "ledger", "PrivacyLedger": "ledger", "recompute_epsilon": "ledger",
          "ReleasePolicy": "policy", "MODES": "settings", "PrivacySettings": "settings"}

__all__ = ["MECHANISM", "MODES", "BudgetExhausted", "DPSettings", "Entry", "PrivacyLedger", "PrivacySettings",
           "ReleasePolicy", "contract_status", "default_delta", "make_private_model", "recompute_epsilon",
           "release_noise_multiplier", "train_dp_sgd"]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
