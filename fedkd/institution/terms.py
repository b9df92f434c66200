"""Teacher-side terms: scalars a client computes on the query inputs with its own teacher.

Some methods need more from a teacher than its logits: DeepInversion's and
CuDFKD's BatchNorm feature statistics, DAFL's activation of the penultimate
features. Those live inside the teacher, so the client computes them where
the teacher lives and returns only the scalar; a Backward then differentiates
it (with the logits) w.r.t. the inputs. Nothing else about the teacher leaves.

The host serves the terms of this registry by name (``ForwardRequest.terms``,
``BackwardRequest.grad_terms`` in ``fedkd.v1``); a term its model cannot
compute (no BatchNorm layer, no final linear layer) is refused with
FAILED_PRECONDITION naming it. A term is a statistic: the method weights it
(DAFL minimises ``-0.1 * activation``).

Registered terms:

- ``feature-statistics``: sum over BatchNorm layers l of
  ||mu_l(x) - running_mean_l||_2 + ||var_l(x) - running_var_l||_2
  (DeepInversion; the ``bn_loss`` of the original contract); for a DP-SGD
  teacher (GroupNorm) the same against the statistics it released with
  differential privacy (``dp-feature-epsilon``), when it did;
- ``activation``: mean |f_T(x)| over the batch and the features of the input to
  the teacher's last linear layer (DAFL's L_a with the sign left to the method).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import ClassVar

import torch
from torch import Tensor, nn

from fedkd.contract import ACTIVATION, FEATURE_STATISTICS


class _HookedTerm:
    """A term computed from forward hooks, on only between ``begin`` and ``end``."""

    name: ClassVar[str]

    def __init__(self) -> None:
        self.enabled = False
        self._terms: list[Tensor] = []

    def begin(self) -> None:
        self.enabled = True
        self._terms = []

    def end(self) -> Tensor:
        self.enabled = False
        terms, self._terms = self._terms, []
        if not terms:
            return torch.zeros(())
        return torch.stack(terms).sum()


class FeatureStatistics(_HookedTerm):
    """Forward hooks on a model's BatchNorm layers for the DeepInversion statistics loss.

    loss = sum_l ||mu_l(x) - running_mean_l||_2 + ||var_l(x) - running_var_l||_2,
    where mu_l and var_l are the batch statistics of the inputs of BN layer l.
    """

    name = FEATURE_STATISTICS

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.layers = self.bn_layers(model)
        for layer in self.layers:
            layer.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        if not self.enabled:
            return
        x = inputs[0]
        dims = [0] + list(range(2, x.ndim))
        mean = x.mean(dim=dims)
        var = x.var(dim=dims, unbiased=False)
        ref_mean, ref_var = self.reference(module)
        self._terms.append(torch.norm(mean - ref_mean, 2) + torch.norm(var - ref_var, 2))

    @staticmethod
    def reference(module: nn.Module) -> tuple[Tensor, Tensor]:
        """What a layer's batch statistics are compared with: BatchNorm's running statistics, or the statistics
        a DP teacher released for its GroupNorm layer (``released_mean`` / ``released_var``)."""
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            assert module.running_mean is not None and module.running_var is not None
            return module.running_mean, module.running_var
        mean, var = module.released_mean, module.released_var
        assert isinstance(mean, Tensor) and isinstance(var, Tensor)
        return mean, var

    @staticmethod
    def bn_layers(model: nn.Module) -> list[nn.Module]:
        """The layers with reference statistics: BatchNorm with running statistics, and a DP teacher's GroupNorm
        layers carrying its DP-released statistics."""
        return [m for m in model.modules()
                if (isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None
                    and m.running_var is not None)
                or (isinstance(m, nn.GroupNorm) and isinstance(getattr(m, "released_mean", None), Tensor))]

    def __bool__(self) -> bool:
        return bool(self.layers)


class Activation(_HookedTerm):
    """DAFL's activation term: mean |f| of the features entering the teacher's last linear layer."""

    name = ACTIVATION

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        self.layer = linears[-1] if linears else None
        if self.layer is not None:
            self.layer.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        if self.enabled:
            self._terms.append(inputs[0].abs().mean())

    def __bool__(self) -> bool:
        return self.layer is not None


TERMS: dict[str, type[FeatureStatistics] | type[Activation]] = {
    FeatureStatistics.name: FeatureStatistics,
    Activation.name: Activation,
}


def unknown_terms(names: Iterable[str]) -> list[str]:
    return [n for n in names if n not in TERMS]


class TermSet:
    """Every registered term, hooked into one model; ``available`` are those the model can compute."""

    def __init__(self, model: nn.Module) -> None:
        self.terms = {name: factory(model) for name, factory in TERMS.items()}
        self.available = tuple(name for name, term in self.terms.items() if term)

    def run(self, model: nn.Module, x: Tensor, names: Sequence[str]) -> tuple[Tensor, dict[str, Tensor]]:
        """The model's logits on ``x`` and the value of each term in ``names`` (all available)."""
        for name in names:
            self.terms[name].begin()
        values: dict[str, Tensor] = {}
        try:
            logits = model(x)
        finally:
            for name in names:
                values[name] = self.terms[name].end()
        return logits, values


def available_terms(model: nn.Module) -> tuple[str, ...]:
    """The registered terms ``model`` can compute (without hooking it)."""
    out = []
    if FeatureStatistics.bn_layers(model):
        out.append(FEATURE_STATISTICS)
    if any(isinstance(m, nn.Linear) for m in model.modules()):
        out.append(ACTIVATION)
    return tuple(out)
