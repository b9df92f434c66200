"""CuDFKD: dynamic data-free knowledge distillation by an easy-to-hard strategy.

Li et al., "Dynamic Data-Free Knowledge Distillation by Easy-to-Hard Learning
Strategy", Information Sciences 2023 (arXiv 2208.13648); docs/methods.md.

An epoch is ``steps-per-epoch`` rounds; a round is one synthesis round (the
shared synthesizer, ``synthesis-steps`` generator updates) whose batch goes to
the synthetic pool with the ensemble's answers, then ``student-steps`` student
steps on batches drawn from the whole pool. Once ``query-budget`` is spent
the rounds only train the student. Generator loss, on x = shift(G(z)) (or
G(z, y) with class-balanced targets y when the generator is class-conditional):

    L_G = -w_ent * H(mean_i p_T(x_i))              # class balance (the paper's first term)
          + w_oh * CE(T(x), argmax T(x))            # confident samples (the paper's; targets=balanced:
                                                    #   CE(T(x), y), the asked class)
          + w_bn * L_bn(x)                          # teacher BN statistics, computed by each client; where
                                                    #   a client releases per-class ones, (1 - s) L_bn + s L_cbn
                                                    #   for it (s = class-statistics, 1: L_cbn alone;
                                                    #   0 under strong label skew: class-statistics-unseen)
          + a_adv(e) * L_adv,  L_adv = -tau_a^2 mean_i m_i KL(p_T^tau_a(x_i) || p_S^tau_a(x_i))
          + w_known * -mean_i log max_k g_k(x_i)    # open-set teachers only: samples some trusted teacher
                                                    #   calls its own (g_k = 1 - p_k(unknown | x)); with
                                                    #   teachers' densities g_k is the density gate (K' x the
                                                    #   posterior): samples one teacher's data clearly claims

with the easy-to-hard ramp a_adv(e) (0 for the first quarter of training: the
warm-up) and the mask m_i = [argmax S(x_i) = argmax T(x_i)] as CuDFKD's own
code, CMI, Fast-Datafree and NAYER apply it (``adv-mask``). Student step on a
pool batch with the self-paced curriculum (per sample, scale-free threshold,
see ``fedkd.coordinator.curriculum``):

    l_i = tau^2 KL(p_T^tau(x_i) || p_S^tau(x_i));  v_i = v(l_i; lam_t);  L_S = mean_i v_i l_i
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fedkd.contract import CLASS_FEATURE_STATISTICS, FEATURE_STATISTICS, QueryContext
from fedkd.coordinator.curriculum import REGULARISERS, Curriculum
from fedkd.coordinator.losses import class_balance_entropy, kl_per_sample, known_loss, onehot_loss
from fedkd.coordinator.methods.base import GeneratorMethod, MethodContext
from fedkd.coordinator.student import judging
from fedkd.coordinator.synthesis import SynthesisLoss
from fedkd.metrics import MetricAverager
from fedkd.options import bounded, choice, validate_fields


@dataclass(frozen=True)
class CuDFKDOptions:
    """CuDFKD's own keys (``cudfkd.KEY``). Defaults tuned on the main job (docs/results.md)."""

    weight_entropy: float = field(default=20.0, metadata=bounded(
        0.0, 1e6, help="weight of the class-balance entropy term of the generator loss"))
    weight_onehot: float = field(default=1.0, metadata=bounded(
        0.0, 1e6, help="weight of the one-hot (confidence) term"))
    weight_bn: float = field(default=30.0, metadata=bounded(
        0.0, 1e6, help="weight of the BatchNorm-statistics term (computed by each client)"))
    class_statistics: float = field(default=1.0, metadata=bounded(
        0.0, 1.0, help="share of each teacher's BatchNorm-statistics term given to its per-class statistics, where "
        "it releases them (teacher-class-statistics=on; 1 = they replace its global ones); 0 = the global "
        "statistics only"))
    class_statistics_unseen: float = field(default=0.15, metadata=bounded(
        0.0, 1.0, help="the per-class statistics are weighed only where, by the label counts, less than this share "
        "of the teachers never saw a class (1 = always): they gain where the clients' classes overlap and lose "
        "under strong label skew (Fashion-MNIST Dirichlet(0.5) against (0.1), docs/results.md)"))
    weight_known: float = field(default=1.0, metadata=bounded(
        0.0, 1e6, help="weight of the term that keeps samples where some open-set teacher says 'mine' (or, with "
        "teacher-density=on, that one teacher's density clearly claims) (0 = off)"))
    targets: str = field(default="argmax", metadata=choice(
        "argmax", "balanced", help="the one-hot term's target: the teachers' argmax (the paper's) or balanced classes"))
    adv_start: float = field(default=0.0, metadata=bounded(
        0.0, 1e6, help="adversarial weight at the first epoch"))
    adv_step: float = field(default=0.5, metadata=bounded(
        0.0, 1e6, help="adversarial weight added each epoch (the easy-to-hard ramp)"))
    adv_temperature: float = field(default=3.0, metadata=bounded(
        0.0, 100.0, open_low=True, help="temperature of the adversarial KL term"))
    adv_mask: str = field(default="agree", metadata=choice(
        "agree", "disagree", "none",
        help="samples the adversarial term counts: where student and ensemble agree, disagree, or all"))
    self_paced: str = field(default="log", metadata=choice(
        *REGULARISERS, help="the self-paced regulariser weighting each sample of the student loss"))
    admit_start: float = field(default=0.5, metadata=bounded(
        0.0, 1.0, open_low=True, help="share of samples the curriculum admits at first"))
    admit_end: float = field(default=1.0, metadata=bounded(
        0.0, 1.0, open_low=True, help="share of samples admitted at the end"))
    lambda_start: float | None = field(default=None, metadata=bounded(
        0.0, 1e6, open_low=True,
        help="absolute self-paced threshold at first; auto: from the first epoch's loss distribution"))
    lambda_growth: float | None = field(default=None, metadata=bounded(
        0.0, 1e6, help="absolute growth of the threshold per student step; auto: to reach admit-end at the end"))

    def __post_init__(self) -> None:
        validate_fields(self)


def adversarial_loss_masked(student_logits: Tensor, teacher_logits: Tensor, temperature: float, mask: str) -> Tensor:
    """L_adv = -tau^2 mean_i m_i KL_i(p_T || p_S): the generator seeks samples the student gets wrong."""
    kl = kl_per_sample(student_logits, teacher_logits, temperature)  # (B,)
    agree = (student_logits.argmax(1) == teacher_logits.argmax(1)).to(kl.dtype)
    m = {"agree": agree, "disagree": 1.0 - agree, "none": torch.ones_like(kl)}[mask]
    return -(kl * m).mean()


def mixed_statistics(member_terms: dict[str, tuple[Tensor, Tensor]], share: float) -> Tensor | None:
    """The BatchNorm-statistics term where some teachers release per-class statistics: per teacher,
    ``(1 - share) * feature-statistics + share * class-feature-statistics`` where it computes the per-class term,
    its feature-statistics alone where it does not; the mean over the teachers that compute either (None if
    none does)."""
    empty = (torch.zeros(0), torch.zeros(0, dtype=torch.bool))
    fs, fs_on = member_terms.get(FEATURE_STATISTICS, empty)
    cs, cs_on = member_terms.get(CLASS_FEATURE_STATISTICS, empty)
    if not len(cs):
        return fs[fs_on].mean() if bool(fs_on.any()) else None
    if not len(fs):
        fs, fs_on = torch.zeros_like(cs), torch.zeros_like(cs_on)
    mixed = torch.where(cs_on & fs_on, (1 - share) * fs + share * cs, torch.where(cs_on, cs, fs))
    used = cs_on | fs_on
    return mixed[used].mean() if bool(used.any()) else None


class CuDFKD(GeneratorMethod[CuDFKDOptions]):
    name = "cudfkd"

    def __init__(self, context: MethodContext) -> None:
        cfg = context.config
        super().__init__(context)
        opts = self.options
        self.curriculum = Curriculum(
            epochs=cfg.epochs, steps_per_epoch=cfg.steps_per_epoch * cfg.student_steps,
            adv_start=opts.adv_start, adv_step=opts.adv_step, regulariser=opts.self_paced,
            admit_start=opts.admit_start, admit_end=opts.admit_end,
            lambda_start=opts.lambda_start, lambda_growth=opts.lambda_growth,
        )
        self.use_bn = opts.weight_bn > 0 and self.ensemble.has_feature_statistics
        self.skewed = (opts.class_statistics_unseen < 1.0
                       and self.ensemble.unseen_share >= opts.class_statistics_unseen)
        self.use_class = (self.use_bn and opts.class_statistics > 0 and not self.skewed
                          and self.ensemble.computes(CLASS_FEATURE_STATISTICS))
        self.statistics_terms = ((FEATURE_STATISTICS, CLASS_FEATURE_STATISTICS) if self.use_class
                                 else (FEATURE_STATISTICS,) if self.use_bn else ())

    def curriculum_state(self, epoch: int) -> QueryContext:
        lam = self.curriculum.lam(self.trainer.steps)
        return QueryContext.of(epoch=epoch, step=self.trainer.steps, purpose="synthesis", method=self.name,
                               lam=float(min(lam, 1e30)),
                               adv_weight=self.curriculum.adv_weight(epoch))

    def generator_loss(self, state: QueryContext) -> SynthesisLoss:
        opts = self.options

        def loss_fn(x: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
            out = self.ensemble(x, state, terms=self.statistics_terms)
            t = out.logits  # (B, C)
            zero = torch.zeros((), device=x.device)
            entropy = -opts.weight_entropy * class_balance_entropy(t)
            onehot = opts.weight_onehot * (F.cross_entropy(t, targets) if opts.targets == "balanced"
                                           else onehot_loss(t))
            statistics = (mixed_statistics(out.member_terms, opts.class_statistics) if self.use_class
                          else out.terms.get(FEATURE_STATISTICS))
            bn = opts.weight_bn * statistics if statistics is not None else zero
            adv = zero
            if state.adv_weight > 0:
                with judging(self.student) as student:
                    adv = state.adv_weight * adversarial_loss_masked(student(x), t, opts.adv_temperature,
                                                                     opts.adv_mask)
            loss = entropy + onehot + bn + adv
            terms = {"loss_generator": loss, "loss_entropy": entropy, "loss_onehot": onehot, "loss_bn": bn,
                     "loss_adv": adv}
            if out.competence is not None and opts.weight_known > 0:
                # Open-set teachers: a sample no teacher calls its own teaches the student nothing about real
                # inputs (without this term 61-86 % of the last 5,000 samples of a pathological run's pool were
                # unknown to every teacher: simulations/gate_probe.py --no-gate). Distrusted teachers' say is left
                # out.
                trusted = self.ensemble.reliability.weights()[out.members] > 0
                known = opts.weight_known * known_loss(out.competence[trusted] if bool(trusted.any())
                                                       else out.competence)
                loss = loss + known
                terms.update(loss_generator=loss, loss_known=known)
            return loss, t, terms

        return loss_fn

    def synthesis_round(self, epoch: int, metrics: MetricAverager) -> bool:
        """One round into the pool (and synthesis-forward-batches more, answered by a Forward alone)."""
        state = self.curriculum_state(epoch)  # the student does not step during a round: one state serves it
        batch = self.synthesise(self.generator_loss(state), epoch)
        if batch is None:
            return False
        self.pool.add(batch.images, batch.answers, batch.targets)
        for _ in range(self.config.synthesis.forward_batches):
            if not self.budget.fits(self.forward_cost()):
                break
            extra = self.synthesizer.draw(lambda x: self.ensemble(x, state.asked_for("distill")).logits)
            self.pool.add(extra.images, extra.answers, extra.targets)
        metrics.add(batch.terms)
        return True

    def student_step(self) -> dict[str, float]:
        images, answers = self.pool.sample(self.config.batch_size)
        step = self.trainer.steps
        return self.trainer.step(images, answers, lambda losses: self.curriculum.weights(losses, step))

    def epoch_metrics(self, epoch: int) -> dict[str, float]:
        last = max(self.trainer.steps - 1, 0)
        return {"adv_weight": self.curriculum.adv_weight(epoch), "lambda": self.curriculum.lam(last),
                "admitted_target": self.curriculum.admitted_share(last)}

    def report(self) -> dict[str, Any]:
        """Which clients' feature statistics the BatchNorm-statistics term used (a DP teacher's only when it
        released them: dp-feature-epsilon)."""
        if not self.use_bn:
            why = "cudfkd.weight-bn is 0" if self.options.weight_bn <= 0 else "no client computes it"
            return {"feature_statistics": f"not used ({why})"}
        out = {"feature_statistics": self._users(FEATURE_STATISTICS)}
        if self.use_class:
            out["class_feature_statistics"] = (self._users(CLASS_FEATURE_STATISTICS)
                                               + f" (share {self.options.class_statistics:g}; by the label counts "
                                               f"{self.ensemble.unseen_share:.0%} of the teachers never saw a class)")
        elif self.options.class_statistics > 0 and not self.ensemble.computes(CLASS_FEATURE_STATISTICS):
            out["class_feature_statistics"] = "not used (no client releases them: teacher-class-statistics)"
        elif self.options.class_statistics > 0 and self.skewed:
            out["class_feature_statistics"] = (
                f"not used (by the label counts {self.ensemble.unseen_share:.0%} of the teachers never saw a class; "
                f"they are weighed below {self.options.class_statistics_unseen:.0%}: "
                "cudfkd.class-statistics-unseen)")
        return out

    def _users(self, term: str) -> str:
        lacking = self.ensemble.lacking(term)
        users = [d.client for d in self.ensemble.descriptions if d.client not in lacking]
        return (f"used, from client(s) {', '.join(map(str, users))}"
                + (f"; client(s) {', '.join(map(str, lacking))} compute none" if lacking else ""))

    def extra_state(self) -> dict[str, Any]:
        return {"curriculum": self.curriculum.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.curriculum.load_state_dict(state["curriculum"])
