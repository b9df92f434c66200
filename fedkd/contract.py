"""The contract between an institution and the coordinator, as Python types: what crosses the trust boundary.

Both sides import this module and nothing on either side is imported by it: the query context every call
carries (:class:`QueryContext`: purpose, method, schedule), what a teacher says about itself
(:class:`TeacherDescription`), what a Forward answers (:class:`ForwardReply`), what a client has released
(:class:`QueryStats`), the access modes a client grants, the names of the teacher-side terms, and
:class:`QueryError`, a refusal with its gRPC status code. The wire form of each is ``fedkd.v1``
(``protos/fedkd/v1/fedkd.proto``); ``fedkd.codec`` converts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from fedkd.data import DatasetSpec

# Teacher-side terms (computed by the institution with its own teacher, ``fedkd.institution.terms``)
FEATURE_STATISTICS = "feature-statistics"  # BatchNorm feature statistics (DeepInversion; the old ``bn_loss``)
# The same per class, against the statistics of the institution's own images of that class (opt-in: they say more)
CLASS_FEATURE_STATISTICS = "class-feature-statistics"
ACTIVATION = "activation"  # DAFL's activation of the penultimate features
TERM_NAMES = (FEATURE_STATISTICS, CLASS_FEATURE_STATISTICS, ACTIVATION)

ACCESS_MODES = ("gradient", "logits")  # what a client grants unless it says otherwise
ALL_ACCESS_MODES = ("gradient", "logits", "labels")
VOTE_SMOOTHING = 0.1  # a labels-only teacher's answer, as the coordinator's aggregators see it: log((1-e) 1_y + e/C)


def access_modes(mode: str) -> tuple[str, ...]:
    """The access modes a client granting ``mode`` (``teacher-access``) announces: gradient implies logits;
    labels is hard labels only (a client granting logits answers labels too, if asked)."""
    return {"gradient": ("gradient", "logits"), "logits": ("logits",), "labels": ("labels",)}[mode]


def unusable(description: TeacherDescription, spec: DatasetSpec) -> str | None:
    """Why a teacher cannot serve a run on the data ``spec`` describes (naming the field), or None when it can."""
    if description.num_classes != spec.num_classes:
        return f"num_classes {description.num_classes}, the run's data has {spec.num_classes} classes"
    if tuple(description.input_shape) != tuple(spec.input_shape):
        return f"input_shape {tuple(description.input_shape)}, the run's data has {tuple(spec.input_shape)}"
    for name in ("mean", "std"):
        mine, theirs = getattr(description, name), getattr(spec, name)
        if any(abs(a - b) > 1e-6 for a, b in zip(mine, theirs)):
            return f"{name} {tuple(mine)}, the run's data is normalised with {name} {tuple(theirs)}"
    return None


def vote_logits(labels: Tensor, num_classes: int) -> Tensor:
    """(B,) hard labels -> (B, C) logits of the smoothed vote, so every aggregator can combine them. An
    abstention (label -1, a PATE client not confident about the row) is the uniform vote: no information."""
    labels = labels.long()
    votes = torch.full((len(labels), num_classes), VOTE_SMOOTHING / num_classes)
    given = labels >= 0
    votes[torch.arange(len(labels))[given], labels[given]] += 1.0 - VOTE_SMOOTHING
    votes[~given] = 1.0 / num_classes
    return votes.log()


class QueryError(ValueError):
    """A query the host refuses (the host counts its own refusals). ``code`` is the gRPC status it maps to."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


PURPOSES = ("synthesis", "distill", "evaluate")  # why the coordinator asks


@dataclass(frozen=True)
class QueryContext:
    """What every query carries besides its inputs: the epoch and student step it is asked at, why it is asked
    (``purpose``: synthesis, a generator learning from the answers; distill, answers the student trains on;
    evaluate, measuring teachers and ensemble), the method that asks, and the method's schedule as named numbers
    (CuDFKD's curriculum: ``lambda`` and ``adv_weight``, docs/methods.md). The coordinator decides all of it; an
    institution can audit what it answers under."""

    epoch: int = 0
    step: int = 0
    purpose: str = ""
    method: str = ""
    schedule: tuple[tuple[str, float], ...] = ()  # (name, value) pairs, sorted by name
    # The coordinator weighs this query's answers by the teachers' log-densities: a teacher with a density
    # releases it only then (0 in its column otherwise; the ensemble's density-gate decides).
    log_density: bool = False
    # With log_density: the class whose component of its density a teacher's column gives in this query (one
    # class of its data; its whole density where it models none alone). None: the whole density.
    density_class: int | None = None

    @classmethod
    def of(cls, *, epoch: int = 0, step: int = 0, purpose: str = "", method: str = "",
           **schedule: float) -> QueryContext:
        """A context with the schedule given as keywords: ``QueryContext.of(epoch=2, lam=0.5)`` (``lam`` is the
        schedule's ``lambda``)."""
        named = {("lambda" if k == "lam" else k): float(v) for k, v in schedule.items()}
        return cls(epoch, step, purpose, method, tuple(sorted(named.items())))

    def value(self, name: str, default: float = 0.0) -> float:
        """A number of the schedule (``default`` when the method's schedule has none of that name)."""
        return dict(self.schedule).get(name, default)

    @property
    def lam(self) -> float:
        """CuDFKD's self-paced threshold lambda_t."""
        return self.value("lambda")

    @property
    def adv_weight(self) -> float:
        """CuDFKD's adversarial weight a_adv(epoch)."""
        return self.value("adv_weight")

    def asked_for(self, purpose: str) -> QueryContext:
        return dataclasses.replace(self, purpose=purpose)


@dataclass(frozen=True)
class TeacherDescription:
    """What a teacher tells the coordinator about itself (the Describe call)."""

    client: int
    model: str
    num_classes: int
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    access_modes: tuple[str, ...] = ACCESS_MODES
    has_feature_statistics: bool = False
    num_samples: int | None = None
    label_counts: tuple[int, ...] | None = None
    privacy: dict[str, float | str] | None = None
    terms: tuple[str, ...] = ()  # teacher-side terms it computes (fedkd.institution.terms), besides feature statistics
    evaluates_student: bool = False  # it evaluates the final student on held-out data of its own
    unknown_output: bool = False  # its answers carry one more output, "unknown" (teacher-recipe=open-set)
    # its answers carry one more output, the input's log-density per input value under its own data
    # (teacher-density=on); never with unknown_output
    log_density_output: bool = False
    # it answers Draw: images drawn from its density's component of one class (a density released as computed:
    # privacy-mode none)
    draws_density: bool = False

    @property
    def outputs(self) -> int:
        """The width of its logits: the classes, and "unknown" or the log-density when it has that output."""
        return self.num_classes + int(self.unknown_output or self.log_density_output)

    @property
    def mechanism(self) -> str:
        """The privacy mechanism it declares (``privacy["mechanism"]``: dp-sgd, output-noise, pate), "" for none."""
        return str((self.privacy or {}).get("mechanism") or "")

    @property
    def available_terms(self) -> tuple[str, ...]:
        """Every teacher-side term this teacher computes (feature statistics as the old flag states it)."""
        extra = (FEATURE_STATISTICS,) if self.has_feature_statistics and FEATURE_STATISTICS not in self.terms else ()
        return tuple(self.terms) + extra


def releases_density(description: TeacherDescription, state: QueryContext, labels: bool = False) -> bool:
    """Whether a Forward's answer carries the teacher's log-density: a teacher with one, asked for logits in a
    query whose context asks for it (a labels answer names a class, never the density)."""
    return description.log_density_output and state.log_density and not labels


@dataclass(frozen=True)
class StudentToEvaluate:
    """The final student as an institution that evaluates it receives it: a fedkd model name or ``torchvision:NAME``
    (never code: the institution imports none that the coordinator names), the constructor's arguments, and every
    parameter and buffer by name."""

    model: str
    args: dict[str, Any]
    weights: dict[str, Tensor]


@dataclass(frozen=True)
class StudentEvaluation:
    """An institution's evaluation of the student on its own held-out data, as its release policy released it
    (exact without a privacy mechanism; else noised and accounted in its ledger)."""

    correct: float
    examples: float
    epsilon: float = 0.0  # what this release cost
    privacy: dict[str, float | str] | None = None  # the ledger after it

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.examples if self.examples > 0 else None


@dataclass(frozen=True)
class ForwardReply:
    logits: Tensor  # (B, C) float32, (B, C + 1) from a teacher with an unknown output (for a labels answer: the
    # smoothed vote over the C classes, see vote_logits)
    # labels below: -1 where a PATE client abstains
    terms: dict[str, Tensor] = dataclasses.field(default_factory=dict)  # 0-d float32 per asked-for term
    labels: Tensor | None = None  # (B,) int64, when hard labels were asked for
    ref: Any = None  # what a Backward names to follow this Forward (when it was asked with keep)


@dataclass
class QueryStats:
    """What a client has released: queries answered, samples and bytes on the wire."""

    forward_calls: int = 0
    backward_calls: int = 0
    samples: int = 0
    bytes: int = 0  # tensor payload (inputs, outputs, gradients)
    refused: int = 0
    missed: int = 0  # queries a teacher did not answer (dropped out, deadline, refusal): coordinator side
    wire_bytes: int = 0  # serialized messages both ways, when a transport has a wire
    answer_ms: int = 0  # milliseconds the coordinator waited for this teacher's answers, summed: coordinator side
    late: int = 0  # queries the straggler policy went on without (also counted as missed): coordinator side
    # samples whose answer carried the teacher's log-density (teacher-density=on, released only where the
    # query's context asked for it: the coordinator's density-gate)
    density_samples: int = 0
    draw_calls: int = 0  # Draws answered: images drawn from the teacher's density (teacher-density=on)
    drawn_samples: int = 0  # the images those Draws released (also counted in samples)

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    def count_forward(self, inputs: Tensor, reply: ForwardReply, *, density: bool = False) -> None:
        """One Forward answered: its samples, and its tensor payload (inputs out; logits, or labels, and the terms
        back); ``density``: the answer carried the teacher's log-density. The host counts what it released, each
        pool what it received, with this one rule."""
        self.forward_calls += 1
        self.samples += len(inputs)
        if density:
            self.density_samples += len(inputs)
        if reply.labels is not None:
            self.bytes += inputs.nbytes + reply.labels.nbytes
        else:
            self.bytes += inputs.nbytes + reply.logits.nbytes + 4 * len(reply.terms)

    def count_draw(self, images: Tensor) -> None:
        """One Draw answered: the images it released (nothing travelled out but the request)."""
        self.draw_calls += 1
        self.samples += len(images)
        self.drawn_samples += len(images)
        self.bytes += images.nbytes

    def count_backward(self, inputs: Tensor, grad_logits: Tensor, grad_inputs: Tensor, *, by_ref: bool = False) -> None:
        """One Backward answered; the inputs travel (and are counted) again unless it named its Forward."""
        self.backward_calls += 1
        self.samples += len(inputs)
        self.bytes += (0 if by_ref else inputs.nbytes) + grad_logits.nbytes + grad_inputs.nbytes
