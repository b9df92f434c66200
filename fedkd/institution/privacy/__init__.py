"""Differential privacy, owned by the client: DP-SGD teachers (``dpsgd``), the release policy its teacher host
applies to every answer (``policy``), and the ledger that accounts every release against its budget (``ledger``).
"""

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
from fedkd.institution.privacy.policy import MODES, PrivacySettings, ReleasePolicy

__all__ = ["MECHANISM", "MODES", "BudgetExhausted", "DPSettings", "Entry", "PrivacyLedger", "PrivacySettings",
           "ReleasePolicy", "contract_status", "default_delta", "make_private_model", "recompute_epsilon",
           "release_noise_multiplier", "train_dp_sgd"]
