"""A teacher that says how much an input looks like its own data (``teacher-density=on``): who knows *this* input.

Under label skew every teacher answers every input confidently, including inputs of classes it never saw, and no
rule for combining answers tells which teacher knows *this* input (issue 28). A client can, though, say how likely
an input is under a model of its own images, and densities over the same input space are comparable across
clients: their softmax is the posterior p(client | x) of the mixture the clients' data make together, Bayes'
rule for "who knows this input". The coordinator weighs each teacher's answer by that posterior
(``fedkd.coordinator.aggregation.density_gate``).

The model is deliberately simple, fitted in one pass, and differentiable (the teacher-side losses need input
gradients through it): per class the client holds, a probabilistic PCA Gaussian (Tipping and Bishop, 1999) over
the normalised input values, ``rank`` principal directions and one isotropic variance for the rest; the client's
density is their mixture, weighted by its class shares. The answer's extra output is the log-density divided by
the number of input values (nats per value), so that it is of the size of a logit whatever the image size.

Measured on the teachers' own images (``docs/robustness.md``): on pathological splits (two classes per client)
routing by this posterior picks a teacher that owns the input's class for 84 % of Fashion-MNIST's test images and
97 % of MNIST-5k's, where every rule that only combines the teachers' answers stays below 0.53. Closed-set
answers from FedOV-style open-set teachers (``teacher-recipe=open-set``) call most other clients' clothes their
own on Fashion-MNIST; the density does not depend on the classifier at all.

Privacy: the density is fitted on the client's raw images, so it is not covered by DP-SGD's or PATE's guarantee;
fedkd refuses it with those modes. Under ``output-noise`` the extra output is released like any logit (clipped and
noised by the release policy), so noised that the coordinator ignores it (the teacher answers ungated).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from fedkd.data import DatasetSpec, ImageData

DEFAULT_RANK = 30  # principal directions per class (measured: docs/robustness.md)
MIN_CLASS_IMAGES = 5  # fewer images of a class than this: the class is left out of the mixture
VARIANCE_FLOOR = 1e-4  # in normalised input units squared
DENSITY_FIELDS = ("means", "bases", "variances", "noise", "log_prior")


class GaussianDensity(nn.Module):
    """A mixture of probabilistic-PCA Gaussians over flattened inputs; ``forward`` gives each input's
    log-density per input value (B,)."""

    means: Tensor
    bases: Tensor
    variances: Tensor
    noise: Tensor
    log_prior: Tensor

    classes: Tensor

    def __init__(self, means: Tensor, bases: Tensor, variances: Tensor, noise: Tensor, log_prior: Tensor,
                 classes: Tensor | None = None) -> None:
        super().__init__()
        state = {"means": means, "bases": bases, "variances": variances, "noise": noise, "log_prior": log_prior}
        check_density(state if classes is None else {**state, "classes": classes})
        self.register_buffer("means", means.float())  # (M, D)
        self.register_buffer("bases", bases.float())  # (M, D, R) orthonormal columns
        self.register_buffer("variances", variances.float())  # (M, R) along the bases, each >= noise
        self.register_buffer("noise", noise.float())  # (M,) the isotropic variance off the bases
        self.register_buffer("log_prior", log_prior.float())  # (M,) log of each component's share
        # (M,) the class each component models; -1: a component of several classes, or not recorded (densities
        # fitted before stop 75 keep none; loading infers it from the teacher's label counts where it can)
        self.register_buffer("classes", torch.full((len(means),), -1, dtype=torch.long) if classes is None
                             else classes.long())

    @property
    def dims(self) -> int:
        return int(self.means.shape[1])

    def forward(self, x: Tensor) -> Tensor:
        return torch.logsumexp(self.components(x) * self.dims + self.log_prior[:, None], 0) / self.dims

    def components(self, x: Tensor) -> Tensor:
        """(M, B): each input's log-density per input value under each component alone (its prior left out)."""
        flat = x.flatten(1).to(self.means.dtype)  # (B, D)
        d, r = self.dims, self.bases.shape[-1]
        if flat.shape[1] != d:
            raise ValueError(f"the density was fitted to inputs of {d} values, this batch has {flat.shape[1]}")
        centred = flat.unsqueeze(0) - self.means.unsqueeze(1)  # (M, B, D)
        along = torch.bmm(centred, self.bases)  # (M, B, R)
        off = centred.pow(2).sum(-1) - along.pow(2).sum(-1)  # (M, B) squared distance off the bases
        mahalanobis = (along.pow(2) / self.variances.unsqueeze(1)).sum(-1) + off.clamp_min(0) / self.noise[:, None]
        log_det = self.variances.log().sum(-1) + (d - r) * self.noise.log()  # (M,)
        return -0.5 * (mahalanobis + log_det[:, None] + d * math.log(2 * math.pi)) / d

    def of_class(self, x: Tensor, label: int) -> Tensor:
        """(B,) each input's log-density per input value under the component of class ``label`` alone (what a
        query's ``density_class`` asks for: one class of the client's data, its prior left out), or under the
        whole density where no component models that class alone (too few images of it, or not recorded)."""
        match = (self.classes == label).nonzero().flatten()
        return self.components(x)[int(match[0])] if len(match) else self(x)

    def draw(self, label: int, count: int, generator: torch.Generator | None = None) -> Tensor:
        """(count, D) flattened inputs drawn from the component of class ``label`` (a probabilistic-PCA draw: the
        class mean, plus each principal direction times the square root of its variance times a standard normal
        draw, plus isotropic noise of the variance off them), in the normalised space the density was fitted in.
        ValueError where no component models that class alone. A draw says nothing a Backward of the class's
        log-density does not: the gradients at ``dims`` + 1 points give its mean and precision exactly."""
        match = (self.classes == label).nonzero().flatten()
        if not len(match):
            raise ValueError(f"the density has no component of class {label} alone")
        return self.draw_component(int(match[0]), count, generator)

    def draw_component(self, j: int, count: int, generator: torch.Generator | None = None) -> Tensor:
        """(count, D) draws of component ``j`` (:meth:`draw`, by the component's index)."""
        device = self.means.device  # drawn on the CPU (a CPU generator), then moved
        along = torch.randn(count, self.bases.shape[-1], generator=generator).to(device) * self.variances[j].sqrt()
        off = torch.randn(count, self.dims, generator=generator).to(device) * self.noise[j].sqrt()
        return self.means[j] + along @ self.bases[j].T + off

    def to_state(self) -> dict[str, Tensor]:
        return {name: getattr(self, name).detach().clone() for name in (*DENSITY_FIELDS, "classes")}


def check_density(state: Any) -> None:
    """Raise ValueError naming the field unless ``state`` is a consistent density (shapes, finite values,
    positive variances): a checkpoint is a file the user gives, checked like any other."""
    if not isinstance(state, dict) or not all(isinstance(state.get(k), Tensor) for k in DENSITY_FIELDS):
        raise ValueError(f"density is not a table of the tensors {', '.join(DENSITY_FIELDS)}")
    means, bases, variances, noise, prior = (state[k] for k in DENSITY_FIELDS)
    if means.dim() != 2 or len(means) < 1:
        raise ValueError(f"density means have shape {tuple(means.shape)}, not (components, values)")
    m, d = means.shape
    if bases.dim() != 3 or bases.shape[:2] != (m, d) or not 0 <= bases.shape[2] < d:
        raise ValueError(f"density bases have shape {tuple(bases.shape)}, not ({m}, {d}, rank below {d})")
    if tuple(variances.shape) != (m, bases.shape[2]) or tuple(noise.shape) != (m,) or tuple(prior.shape) != (m,):
        raise ValueError("density variances, noise or log_prior do not match the number of components and the rank")
    for name in DENSITY_FIELDS:
        if not bool(torch.isfinite(state[name]).all()):
            raise ValueError(f"density {name} holds a value that is not finite")
    if not (bool((variances > 0).all()) and bool((noise > 0).all())):
        raise ValueError("density variances must be above 0")
    classes = state.get("classes")
    if classes is not None:  # optional: densities fitted before stop 75 record none
        if not isinstance(classes, Tensor) or classes.dtype not in (torch.int64, torch.int32) \
                or tuple(classes.shape) != (m,):
            raise ValueError(f"density classes must be an integer tensor of shape ({m},), one class per component")
        named = classes[classes >= 0]
        if bool((classes < -1).any()) or len(named.unique()) != len(named):
            raise ValueError("density classes must be distinct class indices (or -1 for a component of several)")


def classes_from_counts(label_counts: Any, components: int) -> Tensor | None:
    """The class of each component of a density :func:`fit_density` fitted to images of these ``label_counts``
    (the classes of at least :data:`MIN_CLASS_IMAGES` images, in order), where their number is ``components``;
    None where it cannot tell (a checkpoint of a density fitted before the classes were recorded)."""
    if not isinstance(label_counts, (list, tuple)) or not all(isinstance(n, int) for n in label_counts):
        return None
    held = [c for c, n in enumerate(label_counts) if n >= MIN_CLASS_IMAGES]
    return torch.tensor(held, dtype=torch.long) if held and len(held) == components else None


def fit_density(images: Tensor, labels: Tensor, num_classes: int, *, rank: int = DEFAULT_RANK) -> GaussianDensity:
    """The density of the client's own normalised ``images`` (N, C, H, W): one probabilistic-PCA Gaussian per
    class with at least :data:`MIN_CLASS_IMAGES` images (of at most ``rank`` directions, fewer for a class with
    few images: its other directions get the variance left over), mixed by the classes' shares. Deterministic."""
    flat = images.flatten(1).double()
    d = flat.shape[1]
    parts, held = [], []
    for c in range(num_classes):
        rows = flat[labels == c]
        if len(rows) >= MIN_CLASS_IMAGES:
            parts.append(rows)
            held.append(c)
    if not parts:  # too few images of every class: one component for all of them
        if len(flat) < 2:
            raise ValueError(f"a density needs at least 2 images of the client's own, it has {len(flat)}")
        parts, held = [flat], [-1]
    ranks = [max(0, min(rank, d - 1, len(p) - 2)) for p in parts]
    width = max(ranks)  # components with fewer directions get zero columns, of the noise's variance
    total = sum(len(p) for p in parts)
    means, bases, variances, noise, prior = [], [], [], [], []
    for rows, r in zip(parts, ranks, strict=True):
        mean = rows.mean(0)
        _, s, vh = torch.linalg.svd(rows - mean, full_matrices=False)
        spread = s.pow(2) / max(1, len(rows) - 1)  # variances along the principal directions
        rest = (spread.sum() - spread[:r].sum()) / (d - r)  # the mean variance of the directions left out
        floor = rest.clamp_min(VARIANCE_FLOOR)
        basis = torch.zeros(d, width, dtype=flat.dtype)
        basis[:, :r] = vh[:r].T
        along = torch.full((width,), float(floor), dtype=flat.dtype)
        along[:r] = spread[:r].clamp_min(floor)
        means.append(mean)
        bases.append(basis)
        variances.append(along)
        noise.append(floor)
        prior.append(math.log(len(rows) / total))
    return GaussianDensity(torch.stack(means).float(), torch.stack(bases).float(), torch.stack(variances).float(),
                           torch.stack(noise).float(), torch.tensor(prior), torch.tensor(held)).eval()


def density_of(data: ImageData, spec: DatasetSpec, *, rank: int = DEFAULT_RANK) -> GaussianDensity:
    """The density of a client's own labelled images (in [0, 1], normalised here as the teacher sees them), at
    ``rank`` principal directions a class."""
    return fit_density(spec.normalize(data.images), data.labels, spec.num_classes, rank=rank)


class WithDensity(nn.Module):
    """A teacher whose answers carry one output more: the input's log-density per input value under the client's
    own data (:class:`GaussianDensity`). ``classifier`` is the teacher itself, unchanged."""

    def __init__(self, classifier: nn.Module, density: GaussianDensity) -> None:
        super().__init__()
        self.classifier = classifier
        self.density = density

    def forward(self, x: Tensor) -> Tensor:
        logits = self.classifier(x)
        return torch.cat([logits, self.density(x).unsqueeze(-1).to(logits.dtype)], -1)


def classifier_of(model: nn.Module) -> nn.Module:
    """The classifier of a teacher, without its density when it has one."""
    return model.classifier if isinstance(model, WithDensity) else model
