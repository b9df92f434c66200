"""The coordinator's settings sections: what the synthesizer, the student trainer, the ensemble, the synthetic
pool, the query transport and the Flower ServerApp each read, one frozen dataclass per concern.

Each field carries its default, its rule and a one-line meaning, and names the key that sets it (keys stay flat:
``student-lr`` sets ``StudentSettings.lr``); :class:`fedkd.config.RunConfig` holds one of each, ``fedkd keys``,
``docs/configuration.md`` and the Flower app's table are generated from them. Declarations only: this module
imports neither torch nor any coordinator code, so an institution's config (which carries these keys unused)
loads nothing that runs at the coordinator.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from fedkd.options import TIMEOUT_LIMIT, ConfigError, Section, bounded, choice, described


@dataclass(frozen=True)
class SynthesisSettings(Section):
    """The shared synthesizer (:mod:`fedkd.coordinator.synthesis`). Defaults are tuned for the main job on a 2-core
    CPU (MNIST-5k; docs/results.md): a smaller generator and a faster learning rate than the paper's CIFAR scripts
    (generator width 64, lr 1e-3), which the keys restore."""

    latent_dim: int = field(default=64, metadata=bounded(1, 4096, help="the generator's latent size",
                                                         key="latent-dim"))
    width: int = field(default=16, metadata=bounded(1, 1024, help="the generator's base channels",
                                                    key="generator-width"))
    lr: float = field(default=1e-2, metadata=bounded(0.0, 10.0, open_low=True, help="generator Adam learning rate",
                                                     key="generator-lr"))
    conditional: bool = field(default=False, metadata=described(
        "a class-conditional generator (measured no better on the main job)", key="conditional-generator"))
    steps: int = field(default=1, metadata=bounded(
        1, None, help="generator updates per synthesis round (the best iterate is kept)", key="synthesis-steps"))
    latent_lr: float = field(default=0.0, metadata=bounded(
        0.0, 10.0, help="learning rate of the latents optimised per round (0: latents not optimised)",
        key="latent-lr"))
    reset_every: int = field(default=0, metadata=bounded(
        0, None, help="re-initialise the generator every this many rounds (0: never)", key="generator-reset"))
    shift: int = field(default=2, metadata=bounded(
        0, 8, help="pixels images are shifted by before the teachers see them", key="synthesis-shift"))
    diversity: float = field(default=20.0, metadata=bounded(
        0.0, 1e6, help="weight of the mode-seeking diversity term", key="synthesis-diversity"))
    forward_batches: int = field(default=0, metadata=bounded(
        0, None, help="more batches per round from the updated generator, answered by a Forward alone",
        key="synthesis-forward-batches"))


@dataclass(frozen=True)
class StudentSettings(Section):
    """The student and how it learns (:mod:`fedkd.coordinator.student`). A method may train it otherwise (its
    own loss, temperature or optimiser: ``dataclasses.replace`` of these)."""

    model: str = field(default="lenet5", metadata=described(
        "the student's architecture: a fedkd model name, torchvision:NAME (a torchvision classifier) or "
        "PACKAGE.MODULE:CALLABLE (your own code, called with student-args)", key="student-model"))
    args: str = field(default="", metadata=described(
        "keyword arguments of a torchvision student (num_classes is the task's unless given) or of your own "
        "callable, a JSON object", key="student-args"))
    lr: float = field(default=0.1, metadata=bounded(
        0.0, 10.0, open_low=True, help="student SGD learning rate (cosine schedule)", key="student-lr"))
    warmup: float = field(default=0.0, metadata=bounded(
        0.0, 0.9, help="share of the student's steps over which its learning rate rises linearly "
        "to student-lr before the cosine schedule (0 = none)", key="student-warmup"))
    momentum: float = field(default=0.9, metadata=bounded(0.0, 1.0, help="student SGD momentum",
                                                          key="student-momentum"))
    weight_decay: float = field(default=1e-4, metadata=bounded(0.0, 1.0, help="student SGD weight decay",
                                                               key="student-weight-decay"))
    # Measured (docs/results.md, stops 57 and 58): teachers trained without label smoothing answer synthetic images
    # near one-hot; the student's first-epoch loss was 2.4 and 44 against 0.3-0.5 with the default teachers, and it
    # lost 7.6 points on Fashion-MNIST Dirichlet(0.5), 6.5 of which a clip at 5 gave back. With fedkd's own
    # (smoothed) teachers the clip seldom binds: the main job's students and most Fashion-MNIST students are the
    # same to the digit with and without it.
    clip: float = field(default=5.0, metadata=bounded(
        0.0, 1e6, help="the student's gradient clipped to this L2 norm at every step (0 = not clipped)",
        key="student-clip"))
    loss: str = field(default="kl", metadata=choice(
        "l1", "kl", help="the student's distillation loss against the ensemble's logits", key="student-loss"))
    shift: int = field(default=0, metadata=bounded(0, 8, help="pixels a pool image may move in a student step",
                                                   key="student-shift"))
    temperature: float = field(default=4.0, metadata=bounded(
        0.0, 100.0, open_low=True, help="distillation temperature of student-loss=kl", key="temperature"))
    refit: float = field(default=8.0, metadata=bounded(
        0.0, 32.0, help="after the last epoch, train the student afresh on the whole final pool for this share of "
        "its steps, grown in proportion with the samples answered after the epochs (student-refit-mixup's blends, "
        "student-refit-climb's climbed samples: twice the steps beside as many again); plain distillation, no "
        "curriculum, no queries (0 = keep the student trained along the way)",
        key="student-refit"))
    refit_mixup: float = field(default=0.0, metadata=bounded(
        0.0, 4.0, help="before student-refit, blend random pairs of pool samples (a uniform weight each) into this "
        "share of the pool's size, answered again by the teachers (counted query samples within query-budget), and "
        "refit on the pool and the blends (0 = none); the refit's steps grow with them", key="student-refit-mixup"))
    refit_warp: float = field(default=0.0, metadata=bounded(
        0.0, 45.0, help="warp both images of each student-refit-mixup blend by a random affine map before blending: "
        "rotated by up to this many degrees, scaled by up to this many percent, moved by up to half this many "
        "percent of the image's size (0 = plain blends)", key="student-refit-warp"))
    # Measured on the pathological splits (docs/robustness.md, "Samples that climb a client's density"): the
    # synthetic pool sits far below every client's density, where the density gate routes it wrong. The default
    # since stop 75 (one class at a time); since stop 76 also where the gate does not weigh by the densities
    # (Fashion-MNIST Dirichlet(0.1) and (0.5): the climbed samples, answered by the class-weighted ensemble, teach
    # the shirts the pool does not). It acts only where teachers answer densities (teacher-density=on).
    refit_climb: int = field(default=2, metadata=bounded(
        0, 20, help="before student-refit, a copy of each pool sample climbs the density of one class one teacher "
        "holds (the teachers that answer a log-density in turn, teacher-density=on, and each one's classes in "
        "turn), by this many steps along the gradient that teacher returns (each a Forward and a Backward of it), "
        "and the teachers answer it as they answer the pool; the refit trains on them beside the pool, for twice "
        "the steps (0 = none; nothing where no teacher answers a density or student-refit is 0)",
        key="student-refit-climb"))
    # Measured with simulations/refit_probe.py's drawn variant (docs/results.md, stop 79): on Fashion-MNIST's
    # pathological split, Dirichlet(0.1) and (0.5), images drawn from the densities teach the refit more than the
    # pool's copies climbed up them, at fewer queries (one Draw a sample against two Forwards and Backwards).
    refit_draw: bool = field(default=True, metadata=described(
        "where a teacher that answers a density also draws from it (privacy-mode none), its share of "
        "student-refit-climb's samples are images drawn from its density's component of each class instead of "
        "pool copies climbed up it (off = every climber climbs)", key="student-refit-draw"))

    def arguments(self) -> dict[str, Any]:
        """``student-args`` as keyword arguments; ConfigError naming the key when it is not a JSON object."""
        if not self.args:
            return {}
        try:
            args = json.loads(self.args)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"student-args: {self.args!r} is not JSON ({exc.msg})") from None
        if not isinstance(args, dict):
            raise ConfigError(f"student-args: give a JSON object of keyword arguments, got {self.args!r}")
        return args


@dataclass(frozen=True)
class EnsembleSettings(Section):
    """How the teachers' answers combine and what guards them (:mod:`fedkd.coordinator.ensemble`,
    :mod:`fedkd.coordinator.robustness`)."""

    rule: str = field(default="auto", metadata=described(
        "how teachers' answers combine (an aggregator of fedkd/coordinator/aggregation.py); auto: class-weighted "
        "when a client shares label counts, else prob-mean", key="ensemble"))
    # DP-SGD teachers keep it on: a teacher no surer than the median one is not left out, so honest noisy teachers
    # keep their say (docs/privacy.md: 0.873 at epsilon 8, 0.922 of the non-private student).
    reliability: bool = field(default=True, metadata=described(
        "weight each teacher by its agreement with the others (robustness to teachers that answer wrong)",
        key="reliability"))
    logit_bound: float = field(default=100.0, metadata=bounded(1.0, 1e6, help="answers' logits clipped to +-this",
                                                               key="logit-bound"))
    density_sharpness: float = field(default=4.0, metadata=bounded(
        0.0, 1e4, open_low=True, help="teachers answering a log-density (teacher-density=on): each answer weighed "
        "per input by the softmax over the teachers of this x their log-densities per input value (larger: sharper)",
        key="density-sharpness"))
    # Measured (docs/robustness.md): the gate lifts the student by 24-35 points where each teacher holds 2 of 10
    # classes and costs 2-4 points with 3 of 10 and at Dirichlet(0.5) and (0.1).
    density_gate: str = field(default="auto", metadata=choice(
        "auto", "on", "off", help="teachers answering a log-density: weigh by it (on), never (off: no teacher "
        "releases one), or only where the label counts say at least three quarters of the teachers never saw a "
        "class (auto; on when a teacher with a density shares no counts)", key="density-gate"))
    gradient_bound: float = field(default=10.0, metadata=bounded(
        1.0, 1e6, help="a teacher's per-sample input gradient clipped to this x the median teacher's",
        key="gradient-bound"))
    zo_directions: int = field(default=4, metadata=bounded(
        0, 256, help="logits-only clients: random directions per sample of the zeroth-order gradient (0: none)",
        key="zo-directions"))
    zo_radius: float = field(default=1e-2, metadata=bounded(
        0.0, 10.0, open_low=True, help="logits-only clients: step of the zeroth-order finite difference",
        key="zo-radius"))


@dataclass(frozen=True)
class PoolSettings(Section):
    """The synthetic pool (:mod:`fedkd.coordinator.synthetic_pool`) and the query budget that fills it."""

    size: int = field(default=50_000, metadata=bounded(
        1, None, help="synthetic samples kept with the ensemble's answers (the oldest dropped)", key="pool-size"))
    query_budget: int = field(default=0, metadata=bounded(
        0, 10**15, help="query samples (every Forward and Backward sample, summed over teachers) the distillation "
        "may spend; then the student trains on the pool (0: no budget)", key="query-budget"))


@dataclass(frozen=True)
class QuerySettings(Section):
    """How queries reach the teachers (docs/query-path.md; :mod:`fedkd.server.hub`): the transport, the quorum
    and the deadlines."""

    transport: str = field(default="inprocess", metadata=choice(
        "inprocess", "grpc", help="fedkd run's teachers: hosts called in-process, or agent processes over gRPC on "
        "loopback (TLS, tokens)", key="transport"))
    quorum: int = field(default=0, metadata=bounded(0, 1000, help="teachers that must answer a query; 0: a majority",
                                                    key="quorum"))
    timeout: float = field(default=60.0, metadata=bounded(
        0.0, TIMEOUT_LIMIT, open_low=True, help="seconds a query waits for the teachers", key="query-timeout"))
    rejoin_timeout: float = field(default=120.0, metadata=bounded(
        0.0, TIMEOUT_LIMIT, help="seconds to wait for teachers to rejoin when fewer than the quorum are live",
        key="rejoin-timeout"))
    straggler_factor: float = field(default=0.0, metadata=bounded(
        0.0, 1e6, help="once the quorum has answered a query, the other teachers get this many times the median "
                       "answer time (at least 1 s) before the query goes on without them (counted as late); 0: "
                       "every teacher is waited for up to query-timeout", key="straggler-factor"))
    max_message_mb: float = field(default=64.0, metadata=bounded(
        0.0, 2000.0, open_low=True, help="the largest gRPC message, MB", key="max-message-mb"))

    def quorum_size(self, teachers: int) -> int:
        """How many of ``teachers`` must answer each query (``quorum``, or a majority when 0)."""
        if self.quorum > teachers:
            raise ConfigError(f"quorum: {self.quorum} is more than the {teachers} teachers in the run")
        return self.quorum or teachers // 2 + 1


@dataclass(frozen=True)
class FlowerSettings(Section):
    """The Flower ServerApp's own keys (``flwr run .``; ``fedkd run`` ignores them; :mod:`fedkd.server.app`)."""

    run_dir: str = field(default="runs/flower", metadata=described(
        "where the ServerApp writes run-<run id>/", scope="flower", key="run-dir"))
    resume_from: str = field(default="", metadata=described(
        "the run directory of a ServerApp run that died, continued from its last epoch; empty: a new run",
        scope="flower", key="resume-from"))
    evaluation: str = field(default="both", metadata=choice(
        "coordinator", "federated", "both", help="the coordinator's own test set, the clients' held-out data "
        "(evaluate messages), or both", scope="flower", key="evaluation"))
    hub_host: str = field(default="127.0.0.1", metadata=described(
        "the name teachers dial to reach the hub (and its certificate's name)", scope="flower", key="hub-host"))
    hub_port: int = field(default=0, metadata=bounded(0, 65535, help="the hub's port; 0: any free port",
                                                      scope="flower", key="hub-port"))
    nodes_timeout: float = field(default=120.0, metadata=bounded(
        0.0, TIMEOUT_LIMIT, help="seconds the ServerApp waits for the nodes", scope="flower", key="nodes-timeout"))
    train_timeout: float = field(default=3600.0, metadata=bounded(
        0.0, TIMEOUT_LIMIT, open_low=True, help="seconds a node may take to train its teacher (and the TTL of "
        "serve messages)", scope="flower", key="train-timeout"))
