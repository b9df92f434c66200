"""What every distillation method provides to the driver, and the parts they share.

A method is a short file that reads like its paper: its options dataclass (registered with it in
``fedkd.coordinator.methods``, keys ``METHOD.KEY``), its losses, and what one step of an epoch does with the
shared building blocks: the :class:`~fedkd.coordinator.synthesis.Synthesizer` (generator, targets, best
iterate), the :class:`~fedkd.coordinator.synthetic_pool.SyntheticPool` (every batch with the ensemble's
answers), the :class:`~fedkd.coordinator.student.StudentTrainer` and the :class:`QueryBudget`.
:class:`PoolMethod` owns the epoch loop, the pool, the student and the budget: a method writes
``synthesis_round`` (and, where its student trains otherwise than on pool batches, ``student_round``, or
``round`` when the two go in another order). :class:`GeneratorMethod` adds the generator (six of the seven
methods); DeepInversion, which optimises pixels, has none. A method reaches the teachers only through the
ensemble.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

import torch
from torch import Tensor, nn

from fedkd.augment import random_affine
from fedkd.contract import QueryContext, QueryError
from fedkd.coordinator.climb import climb
from fedkd.coordinator.ensemble import Ensemble
from fedkd.coordinator.pool import QuorumError
from fedkd.coordinator.settings import StudentSettings, SynthesisSettings
from fedkd.coordinator.student import StudentTrainer
from fedkd.coordinator.synthesis import Synthesizer, SyntheticBatch, balanced_targets
from fedkd.coordinator.synthetic_pool import SyntheticPool
from fedkd.data import DatasetSpec
from fedkd.metrics import MetricAverager
from fedkd.options import ConfigError

if TYPE_CHECKING:
    from fedkd.config import RunConfig

NUM_SAMPLE_IMAGES = 10


@dataclass(frozen=True)
class MethodContext:
    """Everything a method is built from; passed explicitly, never through globals."""

    config: RunConfig
    spec: DatasetSpec
    ensemble: Ensemble
    student: nn.Module
    device: torch.device


class DistillationMethod(Protocol):
    """A data-free distillation method run by the coordinator.

    ``train_epoch`` runs one epoch and returns its scalar metrics; the driver
    evaluates, checkpoints and reports around it. ``state_dict`` holds
    everything needed to resume bit-for-bit (generator, optimisers, schedule, pool).
    """

    name: str
    student: nn.Module

    def train_epoch(self, epoch: int, on_step: Callable[[], None] | None = None) -> dict[str, float]: ...

    def curriculum_state(self, epoch: int) -> QueryContext: ...

    def synthetic_samples(self) -> Tensor: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def fresh_inputs(self, count: int, seed: int) -> Tensor | None:
        """``count`` normalised inputs the student never trained on, for judging it without labels; None where
        the method has nothing to draw them from. Leaves the run's state (random streams, models) as it was."""
        ...

    def answer_blends(self, share: float, seed: int, on_batch: Callable[[], None] | None = None,
                      warp: float = 0.0) -> Blends:
        """Blend random pairs of pool samples into ``share`` x the pool's size new samples and have the teachers
        answer them (a Forward, counted, within the query budget), for :meth:`refit` to train on beside the pool;
        kept in :meth:`state_dict`, so a method that holds them already asks nothing. ``warp`` > 0: each image
        of a pair warped by a random affine map of that strength first (:func:`fedkd.augment.random_affine`).
        ``on_batch`` after each answered batch. Leaves the run's random streams as they were."""
        ...

    def answer_climbs(self, steps: int, on_batch: Callable[[], None] | None = None) -> Blends:
        """Have a copy of each pool sample climb one teacher's density, the teachers that answer one in turn
        (:func:`fedkd.coordinator.climb.climb`, ``steps`` steps), and the teachers answer the climbed samples, for
        :meth:`refit` to train on beside the pool; kept in :meth:`state_dict`, as the blends are."""
        ...

    def refit(self, student: nn.Module, share: float, seed: int) -> tuple[int, int]:
        """Train ``student`` (freshly built) on the whole final pool (and the blends :meth:`answer_blends` and the
        climbed samples :meth:`answer_climbs` had answered) for ``share`` of the steps the method's own student
        took, times (the pool and those samples) / the pool, so that each is drawn as often as a pool sample is in
        a refit on the pool alone, with the method's student settings and a schedule of its own; no query.
        Returns (the samples, the steps) it trained on; (0, 0) where the method keeps no pool beyond its last
        batch, and ``student`` is left untouched. Leaves the run's random streams as they were."""
        ...


def require_input_gradients(ensemble: Ensemble, method: str) -> None:
    """Stop at start-up when a method that trains its generator through the teachers' input gradients can get
    none: no client grants gradients and zeroth-order estimation is off."""
    if ensemble.gradient_members or (ensemble.logits_members and ensemble.zeroth_order.directions > 0):
        return
    grants = ", ".join(f"client {d.client}: {'+'.join(d.access_modes)}" for d in ensemble.descriptions)
    raise ConfigError(f"method={method} trains its generator through the teachers' input gradients and no client "
                      f"grants gradient access ({grants}); set zo-directions > 0 to estimate them from logits, or "
                      "have at least one client grant gradient (labels-only clients give no gradient at all)")


def require_terms(ensemble: Ensemble, method: str, terms: dict[str, tuple[str, float]]) -> tuple[str, ...]:
    """The teacher-side terms the method uses: those of ``terms`` (name -> the option that weights it, and its
    value) weighted above 0. Stops at start-up when a client cannot compute one, naming the clients and what
    they lack."""
    used = tuple(term for term, (_, weight) in terms.items() if weight > 0)
    for term in used:
        option = terms[term][0]
        lacking = ensemble.lacking(term)
        if lacking:
            clients = ", ".join(f"client {c}" for c in lacking)
            raise ConfigError(f"method={method} needs the teacher-side term {term!r} from every client and "
                              f"{clients} cannot compute it (labels-only access, or a teacher without the layers "
                              f"it needs); set {method}.{option}=0 to go without it")
    return used


class QueryBudget:
    """Query samples a method may still spend (``query-budget``; 0 = no limit), counted by the teacher pool.

    The count is every sample of every Forward and Backward, summed over the
    teachers, from the moment the budget was opened (the driver's evaluation
    queries before distillation do not count against it).
    """

    def __init__(self, ensemble: Ensemble, limit: int) -> None:
        self.ensemble, self.limit = ensemble, limit
        self.start = self._total()
        self.last_cost = 0

    def _total(self) -> int:
        return sum(s.samples for s in self.ensemble.pool.stats())

    @property
    def spent(self) -> int:
        return self._total() - self.start

    def allows(self, estimate: int) -> bool:
        """Whether a round estimated to cost ``estimate`` samples (or what the last one cost) fits."""
        return self.fits(max(estimate, self.last_cost))

    def fits(self, cost: int) -> bool:
        """Whether ``cost`` more query samples fit in the budget."""
        return self.limit == 0 or self.spent + cost <= self.limit

    def charge(self, before: int) -> None:
        """Record what the round that began at ``spent == before`` cost."""
        self.last_cost = self.spent - before

    def state_dict(self) -> dict[str, Any]:
        return {"start": self.start, "last_cost": self.last_cost}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.start, self.last_cost = int(state["start"]), int(state["last_cost"])


Options = TypeVar("Options")


@dataclass(frozen=True)
class Blends:
    """What :meth:`DistillationMethod.answer_blends` left: the blended samples answered (all of them, or as many
    as the budget and the teachers allowed), those asked in this session (0 when the checkpoint held them) and,
    when it stopped short, why."""

    answered: int
    asked: int = 0
    stopped: str = ""


class PoolMethod(Generic[Options]):
    """What every method shares: the student trainer, the query budget, a synthetic pool, the epoch loop, and
    checkpointing of all of them. A method sets ``name``, builds its losses and writes :meth:`synthesis_round`;
    ``extra_state`` adds what else it must resume."""

    name = "pool"
    needs_gradients = True

    def __init__(self, context: MethodContext, *, student: StudentSettings | None = None,
                 student_total_steps: int | None = None, pool_size: int | None = None) -> None:
        """``student``: the student keys as the method trains with them (default: as given);
        ``student_total_steps`` the steps of its schedule (default: ``student-steps`` in every round)."""
        cfg = context.config
        self.config, self.spec, self.device = cfg, context.spec, context.device
        self.options: Options = cfg.options
        self.ensemble = context.ensemble
        if self.needs_gradients:
            require_input_gradients(self.ensemble, self.name)
        self.student = context.student.to(self.device)
        self.build_synthesis()
        total = student_total_steps
        if total is None:
            total = cfg.epochs * cfg.steps_per_epoch * cfg.student_steps
        self.trainer = StudentTrainer(self.student, self.spec, student or cfg.student, self.device, total_steps=total)
        self.pool = SyntheticPool(pool_size or cfg.pool.size, self.spec.input_shape, self.spec.num_classes)
        self.budget = QueryBudget(self.ensemble, cfg.pool.query_budget)
        # student-refit-mixup: blends of pool samples the teachers answered after the last epoch (uint8 images,
        # the ensemble's logits), or None before they are asked
        self.blends: tuple[Tensor, Tensor] | None = None
        self.blends_stopped = ""
        # student-refit-climb: pool samples moved up one teacher's density each, then answered; alike
        self.climbs: tuple[Tensor, Tensor] | None = None
        self.climbs_stopped = ""

    def build_synthesis(self) -> None:
        """Build what makes the synthetic samples before the student trainer (nothing here: the generator of
        :class:`GeneratorMethod`)."""

    def curriculum_state(self, epoch: int) -> QueryContext:
        """The context of a synthesis query: the epoch, the student's step, the method (and its schedule, for a
        method that has one)."""
        return QueryContext.of(epoch=epoch, step=self.trainer.steps, purpose="synthesis", method=self.name)

    def round_cost(self, steps: int = 1) -> int:
        """Query samples of one synthesis round: a Forward and a Backward of the batch per step per teacher."""
        return steps * self.config.batch_size * 2 * len(self.ensemble)

    def student_step_on_pool(self) -> dict[str, float]:
        images, answers = self.pool.sample(self.config.batch_size)
        return self.trainer.step(images, answers)

    # The epoch loop ----------------------------------------------------------------------------------------

    def train_epoch(self, epoch: int, on_step: Callable[[], None] | None = None) -> dict[str, float]:
        """``steps-per-epoch`` steps of :meth:`round`; the epoch's mean metrics, the method's own
        (:meth:`epoch_metrics`), then the rounds made, the pool's size and the budget spent."""
        self.start_epoch(epoch)
        metrics, rounds = MetricAverager(), 0
        for _ in range(self.config.steps_per_epoch):
            rounds += self.round(epoch, metrics)
            if on_step is not None:
                on_step()
        out = metrics.means()
        out.update(self.epoch_metrics(epoch))
        out.update({"synthesis_rounds": rounds, "pool_size": len(self.pool), "budget_spent": self.budget.spent})
        return out

    def start_epoch(self, epoch: int) -> None:
        """What a method does once before an epoch's steps (nothing by default)."""

    def round(self, epoch: int, metrics: MetricAverager) -> bool:
        """One step of the epoch: a synthesis round, then the student's steps. Whether a round was made."""
        made = self.synthesis_round(epoch, metrics)
        self.student_round(metrics)
        return made

    def synthesis_round(self, epoch: int, metrics: MetricAverager) -> bool:
        """Make (and answer) synthetic samples, add their metrics; False when the budget allows no round."""
        raise NotImplementedError

    def student_round(self, metrics: MetricAverager) -> None:
        """``student-steps`` student steps on pool batches (none while the pool is empty)."""
        if len(self.pool):
            for _ in range(self.config.student_steps):
                metrics.add(self.student_step())

    def student_step(self) -> dict[str, float]:
        """One student step on a pool batch (a method may weigh or mix the batch)."""
        return self.student_step_on_pool()

    def epoch_metrics(self, epoch: int) -> dict[str, float]:
        """A method's own per-epoch figures (its schedule, its stage), reported before the common ones."""
        return {}

    def synthetic_samples(self) -> Tensor:
        """Images in [0, 1], (10, C, H, W): what the synthesis makes now."""
        raise NotImplementedError

    def fresh_inputs(self, count: int, seed: int) -> Tensor | None:
        """``count`` normalised inputs the student never trained on; None where the method has nothing to draw
        them from."""
        return None

    def keeps_pool(self) -> bool:
        """Whether the pool holds more than the last batch (DAFL, DFAD train on fresh samples only: theirs is the
        last batch, nothing to refit on or blend)."""
        return len(self.pool) > self.config.batch_size

    def answer_blends(self, share: float, seed: int, on_batch: Callable[[], None] | None = None,
                      warp: float = 0.0) -> Blends:
        """See :class:`DistillationMethod`. Each blend is ``w * a + (1 - w) * b`` of two pool images drawn at
        random (each warped first where ``warp`` > 0), ``w`` uniform in [0, 1] (mixup with a uniform weight),
        quantised like every pool image, so the
        stored blend is exactly what the teachers saw. They are asked as the pool's last batches were (the last
        epoch's context, purpose ``distill``): release policies, client budgets and the reliability estimate
        apply as to any answer. A refusal (a client's budget spent, too few teachers) or the run's query budget
        stops the asking; what was answered is kept."""
        if self.blends is not None:
            return Blends(len(self.blends[0]), 0, self.blends_stopped)
        kept = self.keeps_pool()
        wanted = round(share * len(self.pool)) if kept else 0
        state = self.curriculum_state(self.config.epochs - 1).asked_for("distill")
        stored = self.pool.images[:len(self.pool)]
        draw = torch.Generator().manual_seed(seed)

        def blend(start: int, n: int) -> Tensor:
            a, b = (torch.randint(0, len(stored), (n,), generator=draw) for _ in range(2))
            w = torch.rand(n, 1, 1, 1, generator=draw)
            first, second = (random_affine(stored[i].float(), warp, draw) for i in (a, b))
            return torch.round(w * first + (1 - w) * second).clamp(0, 255).to(torch.uint8)

        self.blends, stopped = self._answered(blend, wanted, len(self.ensemble), "blends", state, on_batch)
        self.blends_stopped = stopped or ("" if kept else
                                          f"method {self.name} keeps no pool beyond its last batch, nothing to blend")
        return Blends(len(self.blends[0]), len(self.blends[0]), self.blends_stopped)

    def _answered(self, make: Callable[[int, int], Tensor], total: int, cost: int, noun: str, state: QueryContext,
                  on_batch: Callable[[], None] | None) -> tuple[tuple[Tensor, Tensor], str]:
        """``total`` samples made after the epochs and answered by the teachers, batch by batch: ``make(start, n)``
        gives a batch's uint8 images (its queries, ``cost`` query samples a sample with the answers, are checked
        against the query budget first); (images, the ensemble's logits) and why the asking stopped short ("" when
        it did not). Leaves the run's random streams as they were."""
        images, answers, stopped = [], [], ""
        batch = self.config.teachers.max_query_batch
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            for start in range(0, total, batch):
                n = min(batch, total - start)
                if not self.budget.fits(n * cost):
                    stopped = f"query-budget reached after {start:,} of {total:,} {noun}"
                    break
                made = make(start, n)
                try:
                    logits = self.ensemble(self.spec.normalize(made.float() / 255), state).logits
                except (QueryError, QuorumError) as exc:
                    stopped = f"the teachers stopped answering after {start:,} of {total:,} {noun} ({exc})"
                    break
                images.append(made)
                answers.append(logits.detach().float().cpu())
                if on_batch is not None:
                    on_batch()
        shape = (0, *self.spec.input_shape)
        return (torch.cat(images) if images else torch.zeros(shape, dtype=torch.uint8),
                torch.cat(answers) if answers else torch.zeros(0, self.spec.num_classes)), stopped

    def climbers(self) -> tuple[list[int], str]:
        """The teachers whose densities the pool's samples may climb: those that answer a density, grant gradients,
        that the reliability estimate keeps and whose density the coordinator's check did not refute; and, where
        there is none, why. The check runs only where the gate weighs by the densities: with the gate off a density
        only says where its own share of the copies climbs, every teacher answering them as it answers the pool,
        so a density claiming too much mass (what the check refutes) wins nothing."""
        ensemble = self.ensemble
        weights = ensemble.reliability.weights()
        members = [k for k in range(len(ensemble)) if bool(ensemble.answers_density[k])
                   and (k in ensemble.gradient_members or k in self.drawers())
                   and float(weights[k]) > 0 and k not in ensemble.density_check.refuted]
        return members, "" if members else ("no teacher with a density grants gradients (or draws) and is trusted")

    def drawers(self) -> set[int]:
        """The teachers whose share of the climbed samples is drawn from their densities instead
        (``student-refit-draw``): those whose descriptions say they draw."""
        if not self.config.student.refit_draw:
            return set()
        return {k for k, d in enumerate(self.ensemble.descriptions) if d.draws_density}

    def climbed_classes(self, k: int) -> list[int | None]:
        """The classes whose part of teacher ``k``'s density the pool's samples climb in turn: every class its label
        counts name (each a component of its density, the query's ``density_class``; a class it modelled with its
        others answers its whole density), or [None], its whole density, where it shares no label counts. Each
        teacher gets as many samples whatever it claims (a liar naming every class climbs no more of them)."""
        counts = self.ensemble.descriptions[k].label_counts or []
        held: list[int | None] = [c for c, count in enumerate(counts) if count > 0]
        return held or [None]

    def answer_climbs(self, steps: int, on_batch: Callable[[], None] | None = None) -> Blends:
        """See :class:`DistillationMethod`. Pool sample i climbs the density of climber i mod n
        (:meth:`climbers`), of one class it holds, its classes in turn (:meth:`climbed_classes`; the query's
        ``density_class``: the component of that class alone, where the whole density would take nearly every
        sample to its broadest class): each step a Forward of that teacher alone, keeping its graph, and a Backward
        of its log-density (grad_logits 1 on that column), asked in the context the pool's last batches were
        (purpose ``distill``). Then every teacher answers the climbed samples, quantised like pool images, as it
        answers the pool and the blends (its density released only where the gate weighs by it); a refusal or the
        query budget stops it, and what was answered is kept. A teacher that stops answering mid-climb leaves its
        samples where they got.

        A climber that draws (:meth:`drawers`) is asked instead for as many images drawn from its density's
        component of the class (one Draw a class a batch), in place of its copies' climb: a climb keeps the spread
        the generator's images happen to have along the class's principal directions, a draw has the class's own
        (measured with ``simulations/refit_probe.py``'s ``drawn``, docs/results.md). A draw refused, or not what
        was asked, leaves that class of that teacher to the climb from then on."""
        if self.climbs is not None:
            return Blends(len(self.climbs[0]), 0, self.climbs_stopped)
        members, why = self.climbers() if self.keeps_pool() else (
            [], f"method {self.name} keeps no pool beyond its last batch, nothing to climb")
        stored = self.pool.images[:len(self.pool)] if members else self.pool.images[:0]
        answering = self.curriculum_state(self.config.epochs - 1).asked_for("distill")  # as the pool's last batches
        state = dataclasses.replace(answering, log_density=True)  # the climber's density, gated or not
        pool = self.ensemble.pool

        def gradient_of(k: int, label: int | None) -> Callable[[Tensor], Tensor | None]:
            width = self.ensemble.descriptions[k].outputs
            asking = dataclasses.replace(state, density_class=label)

            def gradient(z: Tensor) -> Tensor | None:
                try:
                    asked = pool.forward(z.contiguous(), asking, only=[k], min_answers=0, keep=True)
                    if k not in asked:
                        return None
                    grad_logits = torch.zeros(len(z), width)
                    grad_logits[:, self.spec.num_classes] = 1.0  # the log-density's column, after the classes
                    return pool.backward(z, {k: (grad_logits, {})}, asking, refs={k: asked[k].ref}).get(k)
                except (QueryError, QuorumError):
                    return None
            return gradient

        held = {k: self.climbed_classes(k) for k in members}
        drawers = self.drawers() & set(members)
        undrawn: set[tuple[int, int | None]] = set()  # (teacher, class) pairs whose draw failed: climbed instead

        def target(i: int) -> tuple[int, int | None]:  # sample i: climber i mod n, its classes in turn
            k = members[i % len(members)]
            return k, held[k][(i // len(members)) % len(held[k])]

        def climbed(start: int, n: int) -> Tensor:
            x = self.spec.normalize(stored[start:start + n].float() / 255)
            targets = [target(i) for i in range(start, start + n)]
            for pair in dict.fromkeys(targets):
                mine = torch.tensor([j for j, t in enumerate(targets) if t == pair])
                k, label = pair
                if k in drawers and label is not None and pair not in undrawn:
                    seed = self.config.seed * 1_000_003 + start * 7_919 + k * 101 + label
                    # checked by the pool (dtype, shape, finite), None where refused or not what was asked
                    images = pool.draw(k, len(mine), label, dataclasses.replace(state, density_class=label),
                                       seed=seed)
                    if images is not None:
                        x[mine] = images
                        continue
                    undrawn.add(pair)
                if k in self.ensemble.gradient_members:
                    x[mine] = climb(x[mine], gradient_of(*pair), steps)[0]
            return torch.round(self.spec.denormalize(x).clamp(0, 1) * 255).to(torch.uint8)

        cost = max(1 if drawers else 0, 2 * steps if set(members) - drawers else 0) + len(self.ensemble)
        self.climbs, stopped = self._answered(climbed, len(stored), cost, "climbs", answering, on_batch)
        self.climbs_stopped = stopped or why
        return Blends(len(self.climbs[0]), len(self.climbs[0]), self.climbs_stopped)

    def refit(self, student: nn.Module, share: float, seed: int) -> tuple[int, int]:
        """See :class:`DistillationMethod`. The pool is sampled uniformly (the run's student saw the early
        samples far more often than the last ones, and through the method's curriculum): what ``student-refit``
        measured on Fashion-MNIST (docs/results.md); the blends and the climbed samples, where there are any, are
        drawn alike beside it, the steps growing with them (measured on Fashion-MNIST, docs/results.md: beside the
        climbed samples, twice the steps gained 0.1-1.0 points on three splits' means; beside the blends, stop 61's
        16x with one blend a sample)."""
        if not self.keeps_pool():
            return 0, 0
        extra = [part for part in (self.blends, self.climbs) if part is not None and len(part[0])]
        samples = len(self.pool) + sum(len(part[0]) for part in extra)
        grown = samples / max(1, len(self.pool))
        settings, steps = self.trainer.settings, max(1, round(share * grown * self.trainer.total_steps))
        if extra:
            images = torch.cat([self.pool.images[:len(self.pool)], *(part[0] for part in extra)])
            answers = torch.cat([self.pool.answers[:len(self.pool)], *(part[1] for part in extra)])

        def pool_batch(size: int, draw: torch.Generator) -> tuple[Tensor, Tensor]:
            if not extra:
                return self.pool.sample(size, generator=draw)
            idx = torch.randperm(len(images), generator=draw)[:size]
            return images[idx].float() / 255, answers[idx]

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            draw = torch.Generator().manual_seed(seed)
            trainer = StudentTrainer(student, self.spec, settings, self.device, total_steps=steps)
            for _ in range(steps):
                trainer.step(*self.refit_batch(pool_batch, draw))
        return samples + self.refit_extra_samples(), steps

    def refit_batch(self, pool_batch: Callable[[int, torch.Generator], tuple[Tensor, Tensor]],
                    draw: torch.Generator) -> tuple[Tensor, Tensor]:
        """One batch of the refit (images in [0, 1], answers): ``pool_batch(size, draw)`` draws from the pool and
        the blends. A method whose own student learns from more than the pool (HiDFD's real public images) mixes
        that in here, as its student steps do, and counts it in :meth:`refit_extra_samples`."""
        return pool_batch(self.config.batch_size, draw)

    def refit_extra_samples(self) -> int:
        """Samples beside the pool and the blends that :meth:`refit_batch` draws from."""
        return 0

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        state = {"trainer": self.trainer.state_dict(), "pool": self.pool.state_dict(),
                 "budget": self.budget.state_dict(), "extra": self.extra_state()}
        if self.blends is not None:
            state["blends"] = {"images": self.blends[0], "answers": self.blends[1], "stopped": self.blends_stopped}
        if self.climbs is not None:
            state["climbs"] = {"images": self.climbs[0], "answers": self.climbs[1], "stopped": self.climbs_stopped}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.trainer.load_state_dict(state["trainer"])
        self.pool.load_state_dict(state["pool"])
        self.budget.load_state_dict(state["budget"])
        # answered after the last epoch (student-refit-mixup, student-refit-climb); absent before
        for name in ("blends", "climbs"):
            saved = state.get(name)
            if saved is None:
                continue
            images, answers = saved["images"], saved["answers"]
            if tuple(images.shape[1:]) != tuple(self.spec.input_shape) or tuple(answers.shape) != (
                    len(images), self.spec.num_classes):
                raise ValueError(f"the saved {name} are images {tuple(images.shape)} with answers "
                                 f"{tuple(answers.shape)}; this run's samples are {self.spec.input_shape} with "
                                 f"{self.spec.num_classes} classes")
            setattr(self, name, (images.to(torch.uint8), answers.float()))
            setattr(self, f"{name}_stopped", str(saved["stopped"]))
        # a CuDFKD checkpoint of an earlier version keeps its method state (the curriculum) at the top level
        self.load_extra_state(state.get("extra", state))


class GeneratorMethod(PoolMethod[Options]):
    """A method whose synthetic samples come from the shared generator (:class:`Synthesizer`): the synthesizer,
    the sample grid from fixed latents, fresh inputs from the final generator, and their checkpoint."""

    name = "generator"

    def __init__(self, context: MethodContext, *, synthesis: SynthesisSettings | None = None,
                 student: StudentSettings | None = None, student_total_steps: int | None = None,
                 pool_size: int | None = None) -> None:
        """``synthesis``: the synthesis keys as the method uses them (default: as given); the rest as
        :class:`PoolMethod`'s."""
        self._synthesis = synthesis or context.config.synthesis
        super().__init__(context, student=student, student_total_steps=student_total_steps, pool_size=pool_size)
        self.fixed_latent = torch.randn(NUM_SAMPLE_IMAGES, self._synthesis.latent_dim,
                                        generator=torch.Generator().manual_seed(context.config.seed + 7))

    def build_synthesis(self) -> None:
        """The generator, built before the student trainer (the order the runs' random streams follow)."""
        self.synthesizer = Synthesizer(self.spec, self._synthesis, self.config.batch_size, self.device)

    def round_cost(self, steps: int | None = None) -> int:
        """Query samples of one synthesis round: ``synthesis-steps`` generator updates unless ``steps`` says."""
        return super().round_cost(self.synthesizer.settings.steps if steps is None else steps)

    def forward_cost(self) -> int:
        """Query samples of one Forward of a batch to every teacher."""
        return self.config.batch_size * len(self.ensemble)

    def synthesise(self, loss: Any, epoch: int) -> SyntheticBatch | None:
        """One synthesis round with ``loss`` (a SynthesisLoss), or None when the budget does not allow one."""
        if not self.budget.allows(self.round_cost()):
            return None
        before = self.budget.spent
        batch = self.synthesizer.round(loss)
        self.budget.charge(before)
        return batch

    def fresh_batch(self, epoch: int) -> SyntheticBatch | None:
        """A batch from the generator as it is, answered by a Forward alone; None past the budget."""
        if not self.budget.fits(self.forward_cost()):
            return None
        state = self.curriculum_state(epoch).asked_for("distill")  # answers the student trains on
        return self.synthesizer.draw(lambda x: self.ensemble(x, state).logits)

    def synthetic_samples(self) -> Tensor:
        """Images in [0, 1] from fixed latents, (10, C, H, W): how the generator evolves."""
        return self.synthesizer.samples(self.fixed_latent)

    @torch.no_grad()
    def fresh_inputs(self, count: int, seed: int) -> Tensor | None:
        """``count`` normalised images from the final generator with fresh latents and balanced classes, drawn as
        its batches were made (batch statistics, no shift); the run's random streams and the generator's
        BatchNorm statistics are left as they were."""
        synthesizer = self.synthesizer
        kept = {k: v.clone() for k, v in synthesizer.generator.state_dict().items()}
        size = synthesizer.batch_size
        out = []
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(seed)
            synthesizer.generator.train()
            for start in range(0, count, size):
                n = min(size, count - start)
                m = max(n, 2)  # batch statistics need two samples
                z = synthesizer.generator.sample_latent(m, self.device)
                targets = balanced_targets(m, self.spec.num_classes, self.device)
                out.append(self.spec.normalize(synthesizer.generate(z, targets))[:n].cpu())
        synthesizer.generator.load_state_dict(kept)
        return torch.cat(out)

    def state_dict(self) -> dict[str, Any]:
        return {"synthesizer": self.synthesizer.state_dict(), **super().state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.synthesizer.load_state_dict(state["synthesizer"])
        super().load_state_dict(state)
