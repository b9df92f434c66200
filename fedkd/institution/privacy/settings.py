"""A client's privacy settings (``fedkd teacher``'s flags, a node's config): what they accept, checked on
construction. Nothing here imports torch, so a command parses and checks them before it loads a model;
what the settings do is :mod:`fedkd.institution.privacy.policy`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from fedkd.options import BATCH_LIMIT, ConfigError, Section, bounded, choice, described, field_key

MODES = ("none", "dp-sgd", "output-noise", "pate")
LABEL_COUNT_NOISE = ("auto", "none", "gaussian", "laplace")


@dataclass(frozen=True, kw_only=True)
class PrivacySettings(Section):
    """A client's privacy settings: what its release policy applies to every answer, checked on construction
    (each error names the key). A run's config holds one for every client, where ``mode`` may list one mode per
    client (:meth:`for_client` picks one); a client's own settings hold its one mode."""

    mode: str = field(default="none", metadata=described(
        "none, dp-sgd (DP-SGD teacher; answers are free), output-noise (clipped, noised answers, accounted per "
        "row) or pate (shard teachers, labels by Confident-GNMax); one, or one per client", scope="client",
        key="privacy-mode"))
    budget: float = field(default=0.0, metadata=bounded(
        0.0, 1e6, help="a client's total epsilon (training included), enforced before every release; 0: unlimited",
        scope="client", key="privacy-budget"))
    delta: float = field(default=0.0, metadata=bounded(
        0.0, 0.1, help="delta of every guarantee; 0: 1 / (10 n), at most 1e-5", scope="client", key="dp-delta"))
    output_noise: float = field(default=1.0, metadata=bounded(
        0.0, 1e6, open_low=True, help="output-noise: Gaussian std per released row, in units of 2 x its clip",
        scope="client"))
    output_clip: float = field(default=10.0, metadata=bounded(
        0.0, 1e6, open_low=True, help="output-noise: L2 norm each logits row is clipped to", scope="client"))
    gradient_clip: float = field(default=1.0, metadata=bounded(
        0.0, 1e6, open_low=True, help="output-noise: L2 norm each input-gradient row is clipped to", scope="client"))
    share_label_counts: bool = field(default=True, metadata=described(
        "clients share their label histogram (released with noise under a privacy mechanism)", scope="client"))
    label_count_noise: str = field(default="auto", metadata=choice(
        *LABEL_COUNT_NOISE, help="noise on the released label histogram; auto: none without a mechanism, else "
        "gaussian", scope="client"))
    label_count_epsilon: float = field(default=0.5, metadata=bounded(
        0.0, 1e4, open_low=True, help="cost of one noisy label histogram", scope="client"))
    eval_epsilon: float = field(default=1.0, metadata=bounded(
        0.0, 1e4, open_low=True, help="cost of one noisy federated-evaluation release (Flower evaluate)",
        scope="client", key="dp-eval-epsilon"))
    pate_threshold: float = field(default=7.0, metadata=bounded(
        0.0, 1e6, help="pate: answer a row only when its noisy top vote reaches this (scale with pate-teachers)",
        scope="client"))
    pate_sigma1: float = field(default=2.0, metadata=bounded(
        0.0, 1e6, open_low=True, help="pate: noise std of the threshold check", scope="client"))
    pate_sigma2: float = field(default=1.0, metadata=bounded(
        0.0, 1e6, open_low=True, help="pate: noise std on each vote count for the answer", scope="client"))

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.modes or any(m not in MODES for m in self.modes):
            raise ConfigError(f"privacy-mode: {self.mode!r} is not one of {', '.join(MODES)} (or one per client, "
                              "comma-separated)")

    @property
    def modes(self) -> list[str]:
        """The modes ``mode`` names: one, or one per client."""
        return [m.strip() for m in self.mode.split(",") if m.strip()]

    def for_client(self, client: int) -> PrivacySettings:
        """Client ``client``'s own settings: its one mode (``mode`` names one for all clients or one per client)."""
        modes = self.modes
        return replace(self, mode=modes[0] if len(modes) == 1 else modes[client])

    @property
    def noisy_label_counts(self) -> str:
        """How label counts are released: none (exact), gaussian or laplace."""
        if self.label_count_noise != "auto":
            return self.label_count_noise
        return "none" if self.mode == "none" else "gaussian"


@dataclass(frozen=True)
class DPTrainingSettings(Section):
    """How a client trains a private teacher: DP-SGD (:mod:`fedkd.institution.privacy.dpsgd`) or PATE's shard
    teachers; the guarantee's delta is :attr:`PrivacySettings.delta`."""

    epsilon: float = field(default=8.0, metadata=bounded(
        0.0, 1e4, open_low=True, help="dp-sgd: the training's epsilon", scope="client", key="dp-epsilon"))
    max_grad_norm: float = field(default=1.0, metadata=bounded(
        0.0, 1e6, open_low=True, help="dp-sgd: per-sample gradient clip", scope="client", key="dp-max-grad-norm"))
    # DP-SGD wants larger batches than non-private training (the noise is per batch): on the main job at epsilon 8,
    # 256 / 3e-3 gives the best student of 64 / 1e-3, 256 / 1e-2 and 256 / 3e-3 over 3 seeds (docs/privacy.md).
    batch_size: int = field(default=256, metadata=bounded(
        1, BATCH_LIMIT, help="dp-sgd: expected batch (Poisson sampling at dp-batch-size / n)", scope="client",
        key="dp-batch-size"))
    lr: float = field(default=3e-3, metadata=bounded(
        0.0, 10.0, open_low=True, help="dp-sgd: Adam learning rate", scope="client", key="dp-lr"))
    feature_epsilon: float = field(default=0.0, metadata=bounded(
        0.0, 1e4, help="dp-sgd: epsilon of the DP-released feature statistics that let the BatchNorm-statistics "
        "term work with DP teachers; 0: not released", scope="client", key="dp-feature-epsilon"))
    feature_clip: float = field(default=5.0, metadata=bounded(
        0.0, 1e6, open_low=True, help="dp-sgd: each record's feature statistics clipped to this", scope="client",
        key="dp-feature-clip"))
    pate_teachers: int = field(default=10, metadata=bounded(
        2, 10_000, help="pate: shard teachers trained on disjoint shards of a client's records", scope="client",
        key="pate-teachers"))


def settings_keys() -> dict[str, str]:
    """Configuration key -> :class:`PrivacySettings` field."""
    return {field_key(f): f.name for f in fields(PrivacySettings)}


def privacy_keys() -> tuple[str, ...]:
    """Every key of a client's privacy: what it releases (:class:`PrivacySettings`) and how it trains
    (:class:`DPTrainingSettings`). A deployed node takes them from its own node config only."""
    return tuple(field_key(f) for settings in (PrivacySettings, DPTrainingSettings) for f in fields(settings))
