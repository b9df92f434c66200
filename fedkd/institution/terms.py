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
- ``class-feature-statistics``: the same per class, for a teacher whose institution
  computed the statistics of its own images of each class (:func:`fit_class_statistics`,
  ``teacher-class-statistics``): the batch is split softly by the teacher's own
  softmax p_ik, and sum_l sum_k (m_k / B) (||mu_lk(x) - mu_lk|| + ||var_lk(x) - var_lk||)
  with m_k = sum_i p_ik, mu_lk(x) and var_lk(x) the p_.k-weighted batch statistics
  (classes with m_k < 1 are left out of that batch). One mean over all classes cannot
  tell a batch of mixed-up classes from a batch of real ones; per-class means can;
- ``activation``: mean |f_T(x)| over the batch and the features of the input to
  the teacher's last linear layer (DAFL's L_a with the sign left to the method).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedkd.contract import ACTIVATION, CLASS_FEATURE_STATISTICS, FEATURE_STATISTICS

if TYPE_CHECKING:
    from fedkd.data import DatasetSpec, ImageData

# A class with fewer of the institution's own images than this keeps BatchNorm's running statistics as its reference
# (statistics of a handful of images are noise, not a class).
MIN_CLASS_IMAGES = 20
CLASS_FIELDS = ("mean", "var", "count")  # per BatchNorm layer: (K, C), (K, C), (K,)


class _HookedTerm:
    """A term computed from forward hooks, on only between ``begin`` and ``end``; ``remove`` takes the hooks off
    the model again (a term used once, outside a teacher's lifetime: ``simulations/refit_probe.py``)."""

    name: ClassVar[str]

    def __init__(self) -> None:
        self.enabled = False
        self._terms: list[Tensor] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _attach(self, layers: Iterable[nn.Module]) -> None:
        self._handles += [layer.register_forward_hook(self._hook) for layer in layers]

    def _hook(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        raise NotImplementedError

    def remove(self) -> None:
        """Take the term's hooks off the model (the model then runs as if it had never been hooked)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def begin(self) -> None:
        self.enabled = True
        self._terms = []

    def end(self, outputs: Tensor | None = None) -> Tensor:
        """The term's value on the batch just run; ``outputs``: the model's outputs on it (a term that needs them
        is finished with them)."""
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
        self._attach(self.layers)

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


class ClassFeatureStatistics(_HookedTerm):
    """The per-class BatchNorm statistics term (``class-feature-statistics``), in the model's one forward pass:
    hooks keep each BN layer's per-sample channel moments, and ``end`` weighs them by the teacher's own softmax.

    Only layers carrying ``class_mean`` / ``class_var`` / ``class_count`` buffers
    (:func:`attach_class_statistics`) take part; a class with fewer than :data:`MIN_CLASS_IMAGES` own images is
    compared with the layer's running statistics instead."""

    name = CLASS_FEATURE_STATISTICS

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.layers = class_statistics_layers(model)
        self._moments: list[tuple[nn.Module, Tensor, Tensor]] = []
        self._attach(self.layers)

    def begin(self) -> None:
        super().begin()
        self._moments = []

    def _hook(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        if not self.enabled:
            return
        x = inputs[0]
        dims = list(range(2, x.ndim))
        first = x.mean(dim=dims) if dims else x  # (B, C) per-sample channel means ...
        second = x.pow(2).mean(dim=dims) if dims else x.pow(2)  # ... and mean squares
        self._moments.append((module, first, second))

    def end(self, outputs: Tensor | None = None) -> Tensor:
        self.enabled = False
        moments, self._moments = self._moments, []
        if not moments or outputs is None:
            return torch.zeros(())
        classes = _buffer(moments[0][0], "class_mean").shape[0]
        p = torch.softmax(outputs[..., :classes].float(), -1)  # (B, K): the teacher's own split of the batch
        mass = p.sum(0)  # (K,) each class's share of the batch, in samples
        # Every class takes part, weighed by its mass: the moments are weighted means (bounded), so a class's part
        # fades continuously as its mass does, and the term stays smooth in the inputs. (A cut at a mass of one
        # sample made it jump where a class crossed the cut, and an honest gradient failed the coordinator's
        # consistency check there.) The clamp only keeps a class of no mass at all from dividing by zero.
        w = p / mass.clamp_min(1e-12)  # (B, K) each class's weights over the batch
        total = torch.zeros((), device=outputs.device)
        for module, first, second in moments:
            mu = w.T @ first  # (K, C)
            var = (w.T @ second - mu.pow(2)).clamp_min(0.0)
            ref_mean, ref_var = _class_reference(module)
            distance = torch.linalg.vector_norm(mu - ref_mean, dim=1) + torch.linalg.vector_norm(var - ref_var, dim=1)
            total = total + (mass / len(p) * distance).sum()
        return total


def _class_reference(module: nn.Module) -> tuple[Tensor, Tensor]:
    """Each class's reference statistics (K, C): the class's own, or the running statistics for a class the
    institution holds too few images of."""
    enough = (_buffer(module, "class_count") >= MIN_CLASS_IMAGES).unsqueeze(1)
    running_mean, running_var = FeatureStatistics.reference(module)
    return (torch.where(enough, _buffer(module, "class_mean"), running_mean.unsqueeze(0)),
            torch.where(enough, _buffer(module, "class_var"), running_var.unsqueeze(0)))


def _buffer(module: nn.Module, name: str) -> Tensor:
    value = getattr(module, name)
    assert isinstance(value, Tensor)
    return value


def _batchnorm_layers(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    """The model's BatchNorm layers with running statistics, by module name (what class statistics are kept for)."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None}


def class_statistics_layers(model: nn.Module) -> list[nn.Module]:
    """The BatchNorm layers carrying their institution's per-class statistics."""
    return [m for m in _batchnorm_layers(model).values() if isinstance(getattr(m, "class_mean", None), Tensor)]


def class_statistics_of(model: nn.Module, data: ImageData, spec: DatasetSpec) -> dict[str, dict[str, Tensor]]:
    """The per-class statistics of a client's own labelled images (in [0, 1], normalised here as the teacher sees
    them) in ``model``'s BatchNorm layers (:func:`fit_class_statistics`)."""
    return fit_class_statistics(model, spec.normalize(data.images), data.labels, spec.num_classes)


@torch.no_grad()
def fit_class_statistics(model: nn.Module, inputs: Tensor, labels: Tensor, num_classes: int, *,
                         batch_size: int = 512) -> dict[str, dict[str, Tensor]]:
    """Per BatchNorm layer (by its module name) and class, the channel mean and variance of the layer's input over
    the institution's own ``inputs`` of that class (normalised, as the teacher sees them), with the class's image
    count; the model runs in eval mode, as it answers. Deterministic."""
    layers = _batchnorm_layers(model)
    if not layers:
        raise ValueError("the model has no BatchNorm layer with running statistics: no class statistics to fit")
    if len(inputs) != len(labels) or len(inputs) == 0:
        raise ValueError(f"class statistics need labelled images: {len(inputs)} images, {len(labels)} labels")
    first: dict[str, Tensor] = {}  # per layer: (K, C) sums over each class's images and positions of x ...
    second: dict[str, Tensor] = {}  # ... and of x^2
    positions: dict[str, int] = {}  # values per channel per image
    batch: dict[str, Tensor] = {}

    def keep(name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
            batch[name] = args[0].detach().double()
        return hook

    handles = [m.register_forward_hook(keep(name)) for name, m in layers.items()]
    was_training = model.training
    model.eval()
    device = next(iter(model.parameters()), torch.zeros(())).device
    try:
        for start in range(0, len(inputs), batch_size):
            model(inputs[start:start + batch_size].to(device))
            onehot = F.one_hot(labels[start:start + batch_size].long().to(device), num_classes).double()  # (b, K)
            for name, x in batch.items():
                dims = list(range(2, x.ndim))
                positions[name] = x[0, 0].numel()
                s1 = onehot.T @ (x.sum(dim=dims) if dims else x)
                s2 = onehot.T @ (x.pow(2).sum(dim=dims) if dims else x.pow(2))
                first[name] = first[name] + s1 if name in first else s1
                second[name] = second[name] + s2 if name in second else s2
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    counts = torch.bincount(labels.long().cpu(), minlength=num_classes)[:num_classes]
    out = {}
    for name in first:
        n = (counts.double() * positions[name]).clamp_min(1.0).unsqueeze(1).to(first[name].device)
        mean = first[name] / n
        var = (second[name] / n - mean.pow(2)).clamp_min(0.0)
        out[name] = {"mean": mean.float().cpu(), "var": var.float().cpu(), "count": counts.clone()}
    return out


def check_class_statistics(model: nn.Module, statistics: Any, num_classes: int) -> None:
    """Raise ValueError naming the layer and field unless ``statistics`` fits ``model``'s BatchNorm layers: a table
    per layer name of finite ``mean`` and non-negative ``var`` (classes, channels) and non-negative ``count``
    (classes,). A checkpoint is a file the user gives, checked like any other."""
    if not isinstance(statistics, dict) or not statistics:
        raise ValueError("class statistics are not a table of BatchNorm layers")
    layers = _batchnorm_layers(model)
    for name, entry in statistics.items():
        layer = layers.get(name)
        if layer is None:
            raise ValueError(f"class statistics name layer {name!r}, which is not a BatchNorm layer of the model")
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), Tensor) for k in CLASS_FIELDS):
            raise ValueError(f"class statistics of layer {name!r} are not the tensors {', '.join(CLASS_FIELDS)}")
        shape = (num_classes, layer.num_features)
        for key in ("mean", "var"):
            value = entry[key]
            if tuple(value.shape) != shape or not value.is_floating_point():
                raise ValueError(f"class statistics {key} of layer {name!r} have shape {tuple(value.shape)}, not "
                                 f"{shape} (classes, channels) of floats")
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"class statistics {key} of layer {name!r} hold a value that is not finite")
        if bool((entry["var"] < 0).any()):
            raise ValueError(f"class statistics var of layer {name!r} hold a negative variance")
        count = entry["count"]
        if tuple(count.shape) != (num_classes,) or count.is_floating_point() or bool((count < 0).any()):
            raise ValueError(f"class statistics count of layer {name!r} is not {num_classes} non-negative integers")


def attach_class_statistics(model: nn.Module, statistics: dict[str, dict[str, Tensor]], num_classes: int) -> None:
    """Give each named BatchNorm layer its class statistics (``class_mean``, ``class_var``, ``class_count``, buffers
    that stay out of the ``state_dict``), checked first (:func:`check_class_statistics`)."""
    check_class_statistics(model, statistics, num_classes)
    layers = dict(model.named_modules())
    for name, entry in statistics.items():
        layer = layers[name]
        ref = layer.running_mean
        assert ref is not None
        layer.register_buffer("class_mean", entry["mean"].to(ref), persistent=False)
        layer.register_buffer("class_var", entry["var"].to(ref), persistent=False)
        layer.register_buffer("class_count", entry["count"].long().to(ref.device), persistent=False)


class Activation(_HookedTerm):
    """DAFL's activation term: mean |f| of the features entering the teacher's last linear layer."""

    name = ACTIVATION

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        self.layer = linears[-1] if linears else None
        self._attach([self.layer] if self.layer is not None else [])

    def _hook(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        if self.enabled:
            self._terms.append(inputs[0].abs().mean())

    def __bool__(self) -> bool:
        return self.layer is not None


TERMS: dict[str, type[FeatureStatistics] | type[ClassFeatureStatistics] | type[Activation]] = {
    FeatureStatistics.name: FeatureStatistics,
    ClassFeatureStatistics.name: ClassFeatureStatistics,
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
        logits: Tensor | None = None
        try:
            logits = model(x)
        finally:
            for name in names:
                values[name] = self.terms[name].end(logits)
        assert logits is not None
        return logits, values


def available_terms(model: nn.Module) -> tuple[str, ...]:
    """The registered terms ``model`` can compute (without hooking it)."""
    out = []
    if FeatureStatistics.bn_layers(model):
        out.append(FEATURE_STATISTICS)
    if class_statistics_layers(model):
        out.append(CLASS_FEATURE_STATISTICS)
    if any(isinstance(m, nn.Linear) for m in model.modules()):
        out.append(ACTIVATION)
    return tuple(out)
