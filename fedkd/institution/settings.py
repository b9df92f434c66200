"""An institution's teacher settings: how a client trains its teacher and what its host grants and answers.

Declarations only (each field's default, rule, one-line meaning and the key that sets it, ``teacher-epochs`` for
``TeacherSettings.epochs``); torch-free, so a command checks them before it loads a model. What reads them:
:mod:`fedkd.institution.training` (the recipe), :mod:`fedkd.institution.host` (the limits). A client's privacy
settings are :mod:`fedkd.institution.privacy.settings`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fedkd.options import BATCH_LIMIT, Section, bounded, choice, described


@dataclass(frozen=True)
class TeacherSettings(Section):
    """How each client trains its teacher (on its own partition only) and what its host serves. In a one-machine
    run and a Flower simulation these keys stand in for every client's own."""

    model: str = field(default="lenet5", metadata=described(
        "each client's teacher architecture: one model name, or one per client, comma-separated", scope="client",
        key="teacher-model"))
    epochs: int = field(default=40, metadata=bounded(0, None, help="epochs a client trains its teacher",
                                                     scope="client", key="teacher-epochs"))
    lr: float = field(default=1e-3, metadata=bounded(0.0, 10.0, open_low=True, help="teacher Adam learning rate",
                                                     scope="client", key="teacher-lr"))
    batch_size: int = field(default=64, metadata=bounded(1, BATCH_LIMIT, help="teacher training batch",
                                                         scope="client", key="teacher-batch-size"))
    label_smoothing: float = field(default=0.1, metadata=bounded(
        0.0, 1.0, help="label smoothing of teacher training", scope="client", key="teacher-label-smoothing"))
    recipe: str = field(default="closed", metadata=choice(
        "closed", "open-set", help="how clients train their teachers: closed (the classes only) or open-set (one "
        "more output, 'unknown', learned from the client's own images corrupted; the ensemble weighs each answer "
        "by 1 - p(unknown)); not with dp-sgd or pate", scope="client", key="teacher-recipe"))
    density: bool = field(default=False, metadata=described(
        "each client also fits a density of its own images (per class, a probabilistic-PCA Gaussian) and answers "
        "every input's log-density with its logits; the ensemble weighs each answer by the posterior of who knows "
        "the input (density-sharpness); under privacy-mode none it also draws images from it when asked (a class's "
        "mean with its own spread, what the density's gradients give; student-refit-draw); not with dp-sgd, pate or "
        "teacher-recipe=open-set", scope="client",
        key="teacher-density"))
    class_statistics: bool = field(default=False, metadata=described(
        "each client also computes, per class, the BatchNorm statistics of its own images and releases the "
        "class-feature-statistics term on them (cudfkd.class-statistics weighs it); they say more about its data "
        "than the model's running statistics; privacy-mode none only", scope="client",
        key="teacher-class-statistics"))
    # An institution's own `fedkd teacher --access` is authoritative.
    access: str = field(default="gradient", metadata=described(
        "what each client grants, one or one per client: gradient (Forward and Backward), logits (Forward only; "
        "its gradient term estimated by zeroth order) or labels (hard labels only)", scope="client",
        key="teacher-access"))
    max_query_batch: int = field(default=1024, metadata=bounded(
        1, BATCH_LIMIT, help="the largest batch a teacher host answers", scope="client", key="max-query-batch"))
