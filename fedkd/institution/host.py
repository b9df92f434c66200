"""The teacher host: the only code that touches a client's teacher.

It answers the two calls of the query contract and nothing else:

- ``forward(inputs, state, terms=...)`` -> logits (B, C), and the value of each
  asked-for teacher-side term on those inputs (a scalar each; the registry is
  ``fedkd.institution.terms``: BatchNorm feature statistics, DAFL's activation, ...);
- ``backward(inputs, grad_logits, state, grad_terms=...)`` -> the gradient of
  the server's loss w.r.t. the inputs: the vector-Jacobian product of
  (logits, terms) with (grad_logits, grad_terms). Either stateless (the
  inputs are sent again and the forward pass is recomputed) or naming the
  Forward it follows: a Forward asked with ``keep=ID`` keeps its autograd
  graph (the last ``keep_graphs`` of them), and ``backward(None, ...,
  forward_id=ID)`` differentiates it without the inputs travelling again or
  the teacher running twice.

Every call carries the server's :class:`QueryContext`, so each client can
audit the schedule it is being queried under. Bad requests raise
:class:`QueryError` with a gRPC-style status code and a message naming the
problem; the host keeps serving afterwards.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from fedkd.contract import (
    ACCESS_MODES,
    FEATURE_STATISTICS,
    ForwardReply,
    QueryContext,
    QueryError,
    QueryStats,
    StudentEvaluation,
    StudentToEvaluate,
    TeacherDescription,
    releases_density,
    vote_logits,
)
from fedkd.institution.density import WithDensity
from fedkd.institution.privacy import contract_status
from fedkd.institution.terms import FeatureStatistics, TermSet, available_terms
from fedkd.metrics import predict
from fedkd.models import build_classifier, is_code_spec

if TYPE_CHECKING:
    from fedkd.data import ImageData
    from fedkd.institution.privacy.policy import ReleasePolicy

logger = logging.getLogger(__name__)

def load_error(exc: BaseException, limit: int = 300) -> str:
    """What ``load_state_dict`` (or building a model) said, on one line: the missing and unexpected keys and the
    shape mismatches, without torch's "Error(s) in loading state_dict for X:" preamble."""
    text = " ".join(str(exc.args[0] if exc.args else exc).split())
    if text.startswith("Error(s) in loading state_dict for") and ":" in text:
        text = text.split(":", 1)[1].strip()
    return text[:limit]


def describe_checkpoint(ckpt: dict[str, Any], model: nn.Module, *, client: int, share_label_counts: bool = True,
                        access_modes: tuple[str, ...] = ACCESS_MODES,
                        policy: ReleasePolicy | None = None) -> TeacherDescription:
    """What the teacher in a ``fedkd.teacher.v1`` checkpoint says about itself (never its weights).

    With a release ``policy`` (the client's privacy settings) the label histogram is released as the policy
    says (declined, exact, or noisy and accounted) and the privacy status is the policy's. Without one, a DP
    teacher releases nothing about its data outside the DP guarantee: no sample or label counts.
    """
    privacy = policy.status() if policy is not None else contract_status(ckpt.get("privacy"))
    shape = tuple(int(d) for d in ckpt["input_shape"])
    counts = tuple(int(c) for c in ckpt["label_counts"])
    if policy is not None:
        label_counts = policy.label_counts(counts if share_label_counts else None)
        privacy = policy.status()  # after the histogram's cost
    else:
        label_counts = counts if share_label_counts and privacy is None else None
    terms_released = policy is None or policy.releases_terms
    if policy is not None and policy.mode == "pate":
        access_modes = ("labels",)  # shard teachers answer labels (Confident-GNMax) and nothing else
    return TeacherDescription(
        client=client, model=ckpt["model"], num_classes=int(ckpt["num_classes"]),
        input_shape=(shape[0], shape[1], shape[2]), mean=tuple(ckpt["mean"]), std=tuple(ckpt["std"]),
        access_modes=access_modes,
        has_feature_statistics=terms_released and bool(FeatureStatistics.bn_layers(model)),
        terms=available_terms(model) if terms_released else (),
        num_samples=int(ckpt["num_samples"]) if privacy is None else None,
        label_counts=label_counts,
        privacy=privacy,
        unknown_output=bool(ckpt.get("unknown_output", False)),
        log_density_output="density" in ckpt,
        # a Draw gives what the density's gradients give (its class means and spreads), as computed: only where
        # the density is released as computed, not where the policy noises or withholds what leaves
        draws_density="density" in ckpt and (policy.mode == "none" if policy is not None else privacy is None),
    )


def _remember(memory: OrderedDict[Any, Any], key: Any, value: Any, limit: int) -> None:
    """Put ``key`` in a bounded memory as its newest entry; the oldest beyond ``limit`` are forgotten."""
    memory[key] = value
    memory.move_to_end(key)
    while len(memory) > limit:
        memory.popitem(last=False)


class TeacherHost:
    """Serves one teacher through the query contract, enforcing the client's limits."""

    def __init__(
        self,
        model: nn.Module,
        description: TeacherDescription,
        *,
        max_batch: int = 1024,
        device: torch.device | str = "cpu",
        remember: int = 64,
        keep_graphs: int = 4,
        policy: ReleasePolicy | None = None,
        evaluation: ImageData | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.terms = TermSet(self.model)
        self.description = description
        if claimed := [t for t in description.available_terms if t not in self.terms.available]:
            if FEATURE_STATISTICS in claimed:
                raise ValueError("description claims feature statistics but the model has no BatchNorm layers")
            raise ValueError(f"description claims teacher-side term(s) {', '.join(claimed)} the model cannot compute")
        self.max_batch = max_batch
        # Held-out data of the institution's own on which it evaluates the final student when the hub asks (it
        # says so in its description); the counts are released through the policy, like every answer.
        self.evaluation = evaluation
        if evaluation is not None:
            if len(evaluation) == 0:
                raise ValueError("the evaluation data holds no images")
            if tuple(evaluation.images.shape[1:]) != tuple(description.input_shape):
                raise ValueError(f"the evaluation images have shape {tuple(evaluation.images.shape[1:])}, the "
                                 f"teacher takes {tuple(description.input_shape)}")
            description = dataclasses.replace(description, evaluates_student=True)
            self.description = description
        # The client's release policy (privacy mode, noise, budget, ledger); None: answers as computed.
        self.policy = policy
        if policy is not None and policy.mode != "none" and description.draws_density:
            # a draw cannot be noised or accounted like a row: under any other mode the teacher draws nothing
            description = dataclasses.replace(description, draws_density=False)
            self.description = description
        self.stats = QueryStats()
        self.last_state: QueryContext | None = None
        self._lock = threading.Lock()
        # Digests of the last ``remember`` Forward inputs: a Backward is only answered for inputs the
        # host has answered a Forward for, so gradients are never released for arbitrary probes.
        self._seen: OrderedDict[bytes, None] = OrderedDict()
        self._remember = remember
        # Graphs of Forwards a Backward will follow (id -> inputs, logits, term values), bounded.
        self._kept: OrderedDict[Any, tuple[Tensor, Tensor, dict[str, Tensor]]] = OrderedDict()
        self._keep_graphs = keep_graphs

    def describe(self) -> TeacherDescription:
        """The description, with the privacy status as the ledger stands now."""
        if self.policy is None:
            return self.description
        return dataclasses.replace(self.description, privacy=self.policy.status())

    # The two calls -----------------------------------------------------------

    def forward(self, inputs: Tensor, state: QueryContext, *, terms: Sequence[str] = (), labels: bool = False,
                keep: Any = None) -> ForwardReply:
        """Logits and the asked-for teacher-side ``terms``, or with ``labels`` hard labels only (all a labels-only
        client releases). ``keep``: an id a Backward will name; the graph is kept for it (only when this client
        grants gradients)."""
        with self._lock:
            self._check_inputs(inputs)
            names = tuple(dict.fromkeys(terms))
            modes = self.description.access_modes
            if not labels and "logits" not in modes:
                self._refuse("FAILED_PRECONDITION", "this client grants hard labels only; ask for labels")
            if names and "logits" not in modes:
                self._refuse("FAILED_PRECONDITION", f"this client grants hard labels only, no teacher-side terms "
                             f"(asked for {', '.join(names)})")
            self._check_terms(names)
            self._check_density_class(state)
            if self.policy is not None:
                self._charge("labels" if labels else "logits", len(inputs))
            self.last_state = state
            self._remember_inputs(inputs)
            x = inputs.to(self.device)
            if keep is not None and "gradient" in modes and not labels:
                x = x.detach().requires_grad_(True)
                with torch.enable_grad():
                    logits, values = self._run(x, names, state)
                _remember(self._kept, keep, (x, logits, values), self._keep_graphs)
            else:
                with torch.no_grad():
                    logits, values = self._run(x, names, state)
            if labels:
                votes = logits.detach()
                if self.description.log_density_output:  # a vote names a class, never the density column
                    votes = votes[..., :self.description.num_classes]
                hard = (self.policy.release_labels(votes) if self.policy is not None else votes.argmax(-1).cpu())
                if self.description.unknown_output:  # "unknown" on top: the teacher abstains
                    hard = torch.where(hard >= self.description.num_classes, torch.full_like(hard, -1), hard)
            elif self.policy is not None:
                logits = self.policy.release("logits", logits.detach())
            if labels:
                reply = ForwardReply(vote_logits(hard, self.description.num_classes), labels=hard)
            else:
                reply = ForwardReply(logits.detach().cpu(), {k: v.detach().cpu() for k, v in values.items()})
            self.stats.count_forward(inputs, reply, density=releases_density(self.description, state, labels))
            return reply

    def draw(self, count: int, label: int, state: QueryContext, *, seed: int) -> Tensor:
        """``count`` inputs (count, C, H, W) drawn from this teacher's density's component of class ``label``, in
        the normalised space its Forward takes (:meth:`GaussianDensity.draw`; ``seed`` the draw's random stream,
        the coordinator's, so that a resumed run draws the same). Only a teacher whose description says it draws
        (a density released as computed)."""
        with self._lock:
            if not self.description.draws_density:
                self._refuse("FAILED_PRECONDITION", "this teacher draws no images: it answers no density, or its "
                             "privacy mode noises or withholds what it releases")
            if not isinstance(count, int) or count < 1:
                self._refuse("INVALID_ARGUMENT", f"a Draw asks for at least one image, got {count!r}")
            if count > self.max_batch:
                self._refuse("RESOURCE_EXHAUSTED", f"a Draw of {count} images exceeds this client's maximum batch of "
                             f"{self.max_batch}")
            classes = self.description.num_classes
            if not isinstance(label, int) or not 0 <= label < classes:
                self._refuse("INVALID_ARGUMENT", f"density_class {label!r} is not one of the {classes} classes")
            if not isinstance(self.model, WithDensity):
                self._refuse("FAILED_PRECONDITION", "this teacher draws no images: it holds no density")
            generator = torch.Generator().manual_seed(int(seed) % 2**63)
            try:
                with torch.no_grad():
                    images = self.model.density.draw(label, count, generator)
            except ValueError:  # no component of that class alone
                self._refuse("FAILED_PRECONDITION", f"this teacher's density models no class {label} of its own "
                             "(it holds too few images of it)")
            images = images.view(count, *self.description.input_shape)
            self.last_state = state
            images = images.detach().float().cpu()
            self.stats.count_draw(images)
            return images

    def _check_density_class(self, state: QueryContext) -> None:
        """Refuse a query whose ``density_class`` is not one of the task's classes (before anything is charged)."""
        classes, label = self.description.num_classes, getattr(state, "density_class", None)  # None: no context
        if label is not None and not 0 <= label < classes:
            self._refuse("INVALID_ARGUMENT", f"density_class {label} is not one of the {classes} classes")

    def _run(self, x: Tensor, names: Sequence[str], state: QueryContext) -> tuple[Tensor, dict[str, Tensor]]:
        """The model's outputs and the asked-for terms on ``x``, as this teacher releases them: the log-density
        column only in a query that asks for it (``state.log_density``: the coordinator weighs by densities); 0
        otherwise, and cut from the graph, so neither the value nor its gradient leaves (a density gives the
        client's class means away: docs/robustness.md)."""
        logits, values = self.terms.run(self.model, x, names)
        classes = self.description.num_classes
        if self.description.log_density_output and not state.log_density:
            logits = torch.cat([logits[..., :classes], torch.zeros_like(logits[..., classes:])], -1)
        elif self.description.log_density_output and state.density_class is not None:
            # one class of the client's data asked for (student-refit-climb): that class's component alone
            density = self.model.density if isinstance(self.model, WithDensity) else None
            if density is not None:
                column = density.of_class(x, state.density_class).unsqueeze(-1).to(logits.dtype)
                logits = torch.cat([logits[..., :classes], column], -1)
        return logits, values

    def backward(
        self,
        inputs: Tensor | None,
        grad_logits: Tensor,
        state: QueryContext,
        *,
        grad_terms: Mapping[str, float] | None = None,
        forward_id: Any = None,
    ) -> Tensor:
        """The input gradient of <grad_logits, logits> + sum_t grad_terms[t] * term_t; ``inputs`` None with
        ``forward_id`` naming a Forward asked with ``keep``."""
        with self._lock:
            if "gradient" not in self.description.access_modes:
                self._refuse("FAILED_PRECONDITION", "this client does not grant gradient access")
            weights = dict(grad_terms or {})
            kept = None
            if forward_id is not None:
                kept = self._kept.pop(forward_id, None)
                if kept is None and inputs is None:
                    self._refuse("FAILED_PRECONDITION", f"Backward names Forward {forward_id!r}, which this teacher "
                                 f"does not keep (it keeps the last {self._keep_graphs} asked with keep); send the "
                                 "inputs again or Forward first")
            if kept is not None:
                inputs = kept[0].detach()
            if inputs is None:
                self._refuse("INVALID_ARGUMENT", "Backward needs the inputs or the id of the Forward it follows")
            assert inputs is not None
            self._check_inputs(inputs)
            expected = (len(inputs), self.description.outputs)
            if grad_logits.dtype != torch.float32 or tuple(grad_logits.shape) != expected:
                self._refuse("INVALID_ARGUMENT", f"grad_logits must be float32 of shape {expected}, got "
                             f"{grad_logits.dtype} {tuple(grad_logits.shape)}")
            if not torch.isfinite(grad_logits).all():
                self._refuse("INVALID_ARGUMENT", "grad_logits contains NaN or infinite values")
            self._check_terms(list(weights))
            for name, value in weights.items():
                if not math.isfinite(value):
                    self._refuse("INVALID_ARGUMENT", f"the gradient of term {name!r} is not finite")
            if kept is None and self._digest(inputs) not in self._seen:
                self._refuse("FAILED_PRECONDITION", "Backward for inputs this teacher has not answered a Forward "
                             f"for (it keeps the last {self._remember}); send Forward first")
            if kept is not None and (missing := [n for n in weights if n not in kept[2]]):
                self._refuse("FAILED_PRECONDITION", f"Backward asks for the gradient of term(s) "
                             f"{', '.join(map(repr, missing))}, which the Forward it names did not compute")
            self._check_density_class(state)
            if self.policy is not None:
                self._charge("input gradients", len(inputs))
            self.last_state = state
            with torch.enable_grad():
                if kept is not None:
                    x, logits, values = kept
                else:
                    x = inputs.to(self.device).detach().requires_grad_(True)
                    logits, values = self._run(x, list(weights), state)
                outputs, grads = [logits], [grad_logits.to(self.device)]
                for name, value in weights.items():
                    if values[name].requires_grad:  # a layer-free term (no BN layer hit) is a constant
                        outputs.append(values[name])
                        grads.append(torch.tensor(float(value), device=self.device))
                (grad_inputs,) = torch.autograd.grad(outputs, [x], grads)
            if self.policy is not None:
                grad_inputs = self.policy.release("input gradients", grad_inputs)
            self.stats.count_backward(inputs, grad_logits, grad_inputs, by_ref=kept is not None)
            return grad_inputs.detach().cpu()

    def evaluate_student(self, student: StudentToEvaluate, state: QueryContext) -> StudentEvaluation:
        """The final student's (correct, examples) on this institution's held-out data, released through its
        policy. The student is rebuilt from a fedkd model name or ``torchvision:NAME`` (code the hub names is
        refused) on the meta device, so an architecture the weights do not fill allocates nothing."""
        if self.evaluation is None:
            self._refuse("FAILED_PRECONDITION", "this institution evaluates no student (it was given no evaluation "
                                                "data)")
        assert self.evaluation is not None
        if is_code_spec(student.model):
            self._refuse("FAILED_PRECONDITION", f"the student {student.model!r} is built by code, and this "
                         "institution imports none that the coordinator names")
        channels, height, width = self.description.input_shape
        try:
            with torch.device("meta"):
                model = build_classifier(student.model, num_classes=self.description.num_classes, channels=channels,
                                         image_size=(height, width), args=student.args)
            model.load_state_dict(student.weights, strict=True, assign=True)
        except (KeyError, ValueError, TypeError, RuntimeError) as exc:
            self._refuse("INVALID_ARGUMENT", f"the student {student.model!r} cannot be rebuilt from the weights "
                         f"sent: {load_error(exc)}")
        left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if left:
            self._refuse("INVALID_ARGUMENT", f"the student's weights leave {', '.join(left[:3])} unset")
        data = self.evaluation
        mean = torch.tensor(self.description.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.description.std).view(1, -1, 1, 1)
        try:
            logits = predict(model.float().to(self.device), (data.images - mean) / std, batch_size=self.max_batch,
                             device=self.device)
        except RuntimeError as exc:
            self._refuse("INVALID_ARGUMENT", f"the student fails on this task's inputs: {load_error(exc)}")
        if logits.shape != (len(data), self.description.num_classes):
            self._refuse("INVALID_ARGUMENT", f"the student answers {tuple(logits.shape)} for {len(data)} inputs; the "
                         f"task has {self.description.num_classes} classes")
        correct = int((logits.argmax(1) == data.labels).sum())
        with self._lock:
            self.last_state = state
            if self.policy is None:
                return StudentEvaluation(float(correct), float(len(data)))
            before = self.policy.ledger.spent
            try:
                released = self.policy.evaluation_counts(correct, len(data))
            except QueryError:
                self.stats.refused += 1
                raise
            return StudentEvaluation(*released, epsilon=self.policy.ledger.spent - before,
                                     privacy=self.policy.status())

    def forget_kept(self) -> None:
        """Drop the kept graphs (a new session numbers its Forwards afresh)."""
        with self._lock:
            self._kept.clear()

    # Helpers --------------------------------------------------------------------

    def _charge(self, kind: str, rows: int) -> None:
        """Record a release's privacy cost before it is made; past the budget, refuse (counted) and release nothing."""

        assert self.policy is not None
        try:
            self.policy.charge_rows(kind, rows)
        except QueryError:  # the budget (or the mechanism) refuses: counted here, like every refusal of the host
            self.stats.refused += 1
            raise

    def _check_terms(self, names: Sequence[str]) -> None:
        """Refuse, naming it, a term this host does not compute (unknown, or not possible for its model)."""
        if names and self.policy is not None and not self.policy.releases_terms:
            self._refuse("FAILED_PRECONDITION", f"privacy-mode={self.policy.mode} releases logits and input "
                         f"gradients only, no teacher-side terms (asked for {', '.join(names)})")
        for name in names:
            if name not in self.terms.terms:
                self._refuse("FAILED_PRECONDITION", f"unknown teacher-side term {name!r}; this client computes "
                             f"{', '.join(self.description.available_terms) or 'none'}")
            if name not in self.description.available_terms:
                why = {FEATURE_STATISTICS: " (no BatchNorm layers)"}.get(name, "")
                self._refuse("FAILED_PRECONDITION", f"this teacher does not compute the term {name!r}{why}; it "
                             f"computes {', '.join(self.description.available_terms) or 'none'}")

    @staticmethod
    def _digest(inputs: Tensor) -> bytes:
        return hashlib.blake2b(inputs.detach().cpu().contiguous().numpy().data, digest_size=16).digest()

    def _remember_inputs(self, inputs: Tensor) -> None:
        _remember(self._seen, self._digest(inputs), None, self._remember)

    def _refuse(self, code: str, message: str) -> None:
        self.stats.refused += 1
        raise QueryError(code, message)

    def _check_inputs(self, inputs: Tensor) -> None:
        shape = self.description.input_shape
        if not isinstance(inputs, Tensor):
            self._refuse("INVALID_ARGUMENT", f"inputs must be a tensor, got {type(inputs).__name__}")
        if inputs.dtype != torch.float32:
            self._refuse("INVALID_ARGUMENT", f"inputs must be float32, got {inputs.dtype}")
        if inputs.ndim != 4 or tuple(inputs.shape[1:]) != shape:
            self._refuse("INVALID_ARGUMENT", f"inputs must have shape (B, {', '.join(map(str, shape))}), "
                         f"got {tuple(inputs.shape)}")
        if len(inputs) == 0:
            self._refuse("INVALID_ARGUMENT", "empty batch")
        if len(inputs) > self.max_batch:
            self._refuse("RESOURCE_EXHAUSTED", f"batch of {len(inputs)} exceeds this client's maximum of "
                         f"{self.max_batch}")
        if not torch.isfinite(inputs).all():
            self._refuse("INVALID_ARGUMENT", "inputs contain NaN or infinite values")

