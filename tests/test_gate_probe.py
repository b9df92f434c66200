"""The gate probe of issue 28 (simulations/gate_probe.py): its ensemble and its unknown-to-all share."""

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "simulations"))

import gate_probe  # noqa: E402


def _logits(known: list[float], unknown: list[float]) -> torch.Tensor:
    """(K=2, B=len, C + 1 = 3): class 0 for teacher 0, class 1 for teacher 1, the unknown logit given."""
    rows = []
    for k, (own, unk) in enumerate(zip(known, unknown)):
        row = torch.full((1, 3), -5.0)
        row[0, k], row[0, 2] = own, unk
        rows.append(row)
    return torch.stack([torch.cat([r] * 2) for r in rows])  # the same two inputs for both teachers


def test_a_gate_of_ones_is_the_plain_ensemble_and_a_gate_picks_a_teacher():
    logits = _logits([4.0, 4.0], [0.0, 0.0])
    weights, has = torch.full((2, 2), 0.5), torch.tensor([True, True])
    plain = gate_probe.combine(logits, weights, has, 2)
    assert torch.allclose(gate_probe.combine(logits, weights, has, 2, torch.ones(2, 2)), plain)
    picked = gate_probe.combine(logits, weights, has, 2, torch.tensor([[0.0, 2.0], [0.0, 2.0]]))
    assert picked.argmax(1).tolist() == [1, 1]  # only teacher 1's vote counts


def test_unknown_to_all_counts_the_inputs_no_teacher_calls_its_own():
    nobody = _logits([0.0, 0.0], [6.0, 6.0])
    somebody = _logits([6.0, 0.0], [0.0, 6.0])
    assert gate_probe.unknown_to_all(nobody, 2) == 1.0
    assert gate_probe.unknown_to_all(somebody, 2) == 0.0
