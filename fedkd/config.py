"""Run configuration: one frozen, validated dataclass for every entry point.

Keys are kebab-case in TOML and on the command line (``--set batch-size=64``)
and snake_case in Python. The same keys are what the Flower app reads from its
run config, so an experiment is the same whichever entry point runs it.
Unknown keys and out-of-range values fail at start-up with a message that
names the key.

Each distillation method declares its own options as a frozen dataclass
registered with it (``fedkd.coordinator.methods``), under a namespace: ``cudfkd.weight-bn=5``
on the command line, a ``[cudfkd]`` table in TOML, dotted keys in Flower's run
config. :class:`RunConfig` keeps the run-wide keys and holds the selected
method's options in ``options``. A key of a method that is not selected, or
an unknown one, stops at start-up naming it and the valid keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedkd.institution.privacy.settings import MODES as PRIVACY_MODES
from fedkd.institution.privacy.settings import PrivacySettings
from fedkd.options import (
    BATCH_LIMIT,
    TIMEOUT_LIMIT,
    CliValue,
    ConfigError,
    bounded,
    choice,
    coerce,
    described,
    kebab,
    validate_fields,
)
from fedkd.task import Task, run_task


@dataclass(frozen=True)
class UnresolvedOptions:
    """The selected method's options as given, unread: what an institution's config holds in place of the
    method's typed options. The method, its options and the ensemble rule are the coordinator's to check; an
    institution never imports the coordinator's registries to read them (``fedkd.coordinator``)."""

    method: str
    values: tuple[tuple[str, Any], ...] = ()


def coordinator_registries() -> tuple[Mapping[str, Any], tuple[str, ...]]:
    """The method registry and the ensemble rules' names, which a coordinator's config is checked against."""
    from fedkd.coordinator.aggregation import ENSEMBLE_CHOICES
    from fedkd.coordinator.methods import METHODS

    return METHODS, ENSEMBLE_CHOICES


@dataclass(frozen=True)
class RunConfig:
    """Every setting of a fedkd run. Each field's metadata holds its rules, its meaning and where it applies
    (``fedkd keys``, ``docs/configuration.md`` and the Flower app's table are generated from them)."""

    # Data and federation
    dataset: str = field(default="mnist5k", metadata=choice(
        "mnist5k", "digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "svhn",
        help="the task's data: built-in mnist5k and digits, the others through torchvision from data-root"))
    data_root: str = field(default="data", metadata=described(
        "folder holding the torchvision datasets, or the four IDX files of mnist or fashion-mnist"))
    task: str = field(default="", metadata=described(
        "a task card (TOML: classes, input-shape, mean, std) for teachers that are the institutions' own models; "
        "the coordinator then needs no data (fedkd distill, or the Flower app with SuperNodes that name their "
        "model); empty: the dataset's task"))
    eval_data: str = field(default="", metadata=described(
        "labelled data the coordinator evaluates on: an ImageFolder directory (class sub-folders named as the "
        "task's classes), for fedkd distill and the Flower app; empty: the dataset's test split, none with a "
        "task card"))
    num_clients: int = field(default=5, metadata=bounded(1, 1000, help="institutions, one teacher each"))
    partition: str = field(default="dirichlet", metadata=choice(
        "iid", "dirichlet", "pathological", help="how the training pool is split among the clients"))
    alpha: float = field(default=0.5, metadata=bounded(
        0.0, 1e6, open_low=True, help="partition=dirichlet: concentration (smaller: more label skew)"))
    classes_per_client: int = field(default=2, metadata=bounded(
        1, 1000, help="partition=pathological: classes each client holds (dealt out in an order the seed draws: every "
        "class has an owner when num-clients x classes-per-client covers the classes)"))
    min_partition_size: int = field(default=10, metadata=bounded(
        1, 10**9, help="partition=dirichlet: the fewest samples a client may get (redrawn until it holds)"))
    seed: int = field(default=0, metadata=bounded(0, None, help="seeds the split, the teachers and the distillation"))

    # Teachers (trained by each client on its own partition only)
    teacher_model: str = field(default="lenet5", metadata=described(
        "each client's teacher architecture: one model name, or one per client, comma-separated", scope="client"))
    teacher_epochs: int = field(default=40, metadata=bounded(0, None, help="epochs a client trains its teacher",
                                                             scope="client"))
    teacher_lr: float = field(default=1e-3, metadata=bounded(
        0.0, 10.0, open_low=True, help="teacher Adam learning rate", scope="client"))
    teacher_batch_size: int = field(default=64, metadata=bounded(1, BATCH_LIMIT, help="teacher training batch",
                                                                 scope="client"))
    teacher_label_smoothing: float = field(default=0.1, metadata=bounded(
        0.0, 1.0, help="label smoothing of teacher training", scope="client"))
    teacher_recipe: str = field(default="closed", metadata=choice(
        "closed", "open-set", help="how clients train their teachers: closed (the classes only) or open-set (one "
        "more output, 'unknown', learned from the client's own images corrupted; the ensemble weighs each answer "
        "by 1 - p(unknown)); not with dp-sgd or pate", scope="client"))
    # An institution's own `fedkd teacher --access` is authoritative.
    teacher_access: str = field(default="gradient", metadata=described(
        "what each client grants, one or one per client: gradient (Forward and Backward), logits (Forward only; "
        "its gradient term estimated by zeroth order) or labels (hard labels only)", scope="client"))
    zo_directions: int = field(default=4, metadata=bounded(
        0, 256, help="logits-only clients: random directions per sample of the zeroth-order gradient (0: none)"))
    zo_radius: float = field(default=1e-2, metadata=bounded(
        0.0, 10.0, open_low=True, help="logits-only clients: step of the zeroth-order finite difference"))
    max_query_batch: int = field(default=1024, metadata=bounded(
        1, BATCH_LIMIT, help="the largest batch a teacher host answers", scope="client"))

    # Student and generator. Defaults are tuned for the main job on a 2-core CPU (MNIST-5k; docs/results.md): a
    # small generator, a faster generator learning rate and a stronger BN-statistics weight than the paper's CIFAR
    # scripts (generator width 64, lr 1e-3, weight-bn 1), which --set restores.
    student_model: str = field(default="lenet5-half", metadata=described(
        "the student's architecture: a fedkd model name, torchvision:NAME (a torchvision classifier) or "
        "PACKAGE.MODULE:CALLABLE (your own code, called with student-args)"))
    student_args: str = field(default="", metadata=described(
        "keyword arguments of a torchvision student (num_classes is the task's unless given) or of your own "
        "callable, a JSON object"))
    method: str = field(default="cudfkd", metadata=described("the distillation method; its options are METHOD.KEY"))
    epochs: int = field(default=10, metadata=bounded(1, None, help="distillation epochs (evaluated and "
                                                               "checkpointed after each)"))
    steps_per_epoch: int = field(default=20, metadata=bounded(1, None, help="synthesis rounds per epoch"))
    student_steps: int = field(default=20, metadata=bounded(0, None, help="student steps (pool batches) per round"))
    batch_size: int = field(default=128, metadata=bounded(2, BATCH_LIMIT, help="synthetic batch and student batch"))
    student_lr: float = field(default=0.1, metadata=bounded(
        0.0, 10.0, open_low=True, help="student SGD learning rate (cosine schedule)"))
    student_warmup: float = field(default=0.0, metadata=bounded(
        0.0, 0.9, help="share of the student's steps over which its learning rate rises linearly "
        "to student-lr before the cosine schedule (0 = none)"))
    student_momentum: float = field(default=0.9, metadata=bounded(0.0, 1.0, help="student SGD momentum"))
    student_weight_decay: float = field(default=1e-4, metadata=bounded(0.0, 1.0, help="student SGD weight decay"))
    student_loss: str = field(default="kl", metadata=choice(
        "l1", "kl", help="the student's distillation loss against the ensemble's logits"))
    student_shift: int = field(default=0, metadata=bounded(0, 8, help="pixels a pool image may move in a student step"))
    temperature: float = field(default=4.0, metadata=bounded(
        0.0, 100.0, open_low=True, help="distillation temperature of student-loss=kl"))
    ensemble: str = field(default="auto", metadata=described(
        "how teachers' answers combine (an aggregator of fedkd/coordinator/aggregation.py); auto: class-weighted "
        "when a client shares label counts, else prob-mean"))
    # With DP-SGD teachers set reliability=false: they barely agree on synthetic samples and it leaves honest ones
    # out (docs/privacy.md: 0.857 against 0.833 at epsilon 8).
    reliability: bool = field(default=True, metadata=described(
        "weight each teacher by its agreement with the others (robustness to teachers that answer wrong)"))
    logit_bound: float = field(default=100.0, metadata=bounded(1.0, 1e6, help="answers' logits clipped to +-this"))
    gradient_bound: float = field(default=10.0, metadata=bounded(
        1.0, 1e6, help="a teacher's per-sample input gradient clipped to this x the median teacher's"))
    share_label_counts: bool = field(default=True, metadata=described(
        "clients share their label histogram (released with noise under a privacy mechanism)", scope="client"))

    # The shared synthesizer (fedkd/coordinator/synthesis.py)
    latent_dim: int = field(default=64, metadata=bounded(1, 4096, help="the generator's latent size"))
    generator_width: int = field(default=16, metadata=bounded(1, 1024, help="the generator's base channels"))
    generator_lr: float = field(default=1e-2, metadata=bounded(0.0, 10.0, open_low=True,
                                                               help="generator Adam learning rate"))
    conditional_generator: bool = field(default=False, metadata=described(
        "a class-conditional generator (measured no better on the main job)"))
    synthesis_steps: int = field(default=1, metadata=bounded(
        1, None, help="generator updates per synthesis round (the best iterate is kept)"))
    latent_lr: float = field(default=0.0, metadata=bounded(
        0.0, 10.0, help="learning rate of the latents optimised per round (0: latents not optimised)"))
    generator_reset: int = field(default=0, metadata=bounded(
        0, None, help="re-initialise the generator every this many rounds (0: never)"))
    synthesis_shift: int = field(default=2, metadata=bounded(
        0, 8, help="pixels images are shifted by before the teachers see them"))
    synthesis_diversity: float = field(default=20.0, metadata=bounded(
        0.0, 1e6, help="weight of the mode-seeking diversity term"))
    synthesis_forward_batches: int = field(default=0, metadata=bounded(
        0, None, help="more batches per round from the updated generator, answered by a Forward alone"))

    # The synthetic pool (fedkd/coordinator/synthetic_pool.py) and the query budget
    pool_size: int = field(default=50_000, metadata=bounded(
        1, None, help="synthetic samples kept with the ensemble's answers (the oldest dropped)"))
    query_budget: int = field(default=0, metadata=bounded(
        0, 10**15, help="query samples (every Forward and Backward sample, summed over teachers) the distillation "
        "may spend; then the student trains on the pool (0: no budget)"))

    # The selected method's options (a frozen dataclass registered with the method; keys `METHOD.KEY`).
    options: Any = field(default=None, compare=True)

    # Transport of the queries (docs/query-path.md)
    transport: str = field(default="inprocess", metadata=choice(
        "inprocess", "grpc", help="fedkd run's teachers: hosts called in-process, or agent processes over gRPC on "
        "loopback (TLS, tokens)"))
    quorum: int = field(default=0, metadata=bounded(0, 1000, help="teachers that must answer a query; 0: a majority"))
    query_timeout: float = field(default=60.0, metadata=bounded(
        0.0, TIMEOUT_LIMIT, open_low=True, help="seconds a query waits for the teachers"))
    rejoin_timeout: float = field(default=120.0, metadata=bounded(
        0.0, TIMEOUT_LIMIT, help="seconds to wait for teachers to rejoin when fewer than the quorum are live"))
    straggler_factor: float = field(default=0.0, metadata=bounded(
        0.0, 1e6, help="once the quorum has answered a query, the other teachers get this many times the median "
                       "answer time (at least 1 s) before the query goes on without them (counted as late); 0: "
                       "every teacher is waited for up to query-timeout"))
    max_message_mb: float = field(default=64.0, metadata=bounded(
        0.0, 2000.0, open_low=True, help="the largest gRPC message, MB"))

    # Privacy, per client (docs/privacy.md). In a one-machine run the experimenter is every party, so these keys
    # stand in for each client's own settings; a Flower SuperNode in a deployment takes them from its node config
    # only, never from the coordinator's run config.
    privacy_mode: str = field(default="none", metadata=described(
        "none, dp-sgd (DP-SGD teacher; answers are free), output-noise (clipped, noised answers, accounted per "
        "row) or pate (shard teachers, labels by Confident-GNMax); one, or one per client", scope="client"))
    privacy_budget: float = field(default=0.0, metadata=bounded(
        0.0, 1e6, help="a client's total epsilon (training included), enforced before every release; 0: unlimited",
        scope="client"))
    dp_epsilon: float = field(default=8.0, metadata=bounded(
        0.0, 1e4, open_low=True, help="dp-sgd: the training's epsilon", scope="client"))
    dp_delta: float = field(default=0.0, metadata=bounded(
        0.0, 0.1, help="delta of every guarantee; 0: 1 / (10 n), at most 1e-5", scope="client"))
    dp_max_grad_norm: float = field(default=1.0, metadata=bounded(
        0.0, 1e6, open_low=True, help="dp-sgd: per-sample gradient clip", scope="client"))
    # DP-SGD wants larger batches than non-private training (the noise is per batch): on the main job at epsilon 8,
    # 256 / 3e-3 gives the best student of 64 / 1e-3, 256 / 1e-2 and 256 / 3e-3 over 3 seeds (docs/privacy.md).
    dp_batch_size: int = field(default=256, metadata=bounded(
        1, BATCH_LIMIT, help="dp-sgd: expected batch (Poisson sampling at dp-batch-size / n)", scope="client"))
    dp_lr: float = field(default=3e-3, metadata=bounded(
        0.0, 10.0, open_low=True, help="dp-sgd: Adam learning rate", scope="client"))
    dp_feature_epsilon: float = field(default=0.0, metadata=bounded(
        0.0, 1e4, help="dp-sgd: epsilon of the DP-released feature statistics that let the BatchNorm-statistics "
        "term work with DP teachers; 0: not released", scope="client"))
    dp_feature_clip: float = field(default=5.0, metadata=bounded(
        0.0, 1e6, open_low=True, help="dp-sgd: each record's feature statistics clipped to this", scope="client"))
    dp_eval_epsilon: float = field(default=1.0, metadata=bounded(
        0.0, 1e4, open_low=True, help="cost of one noisy federated-evaluation release (Flower evaluate)",
        scope="client"))
    output_noise: float = field(default=1.0, metadata=bounded(
        0.0, 1e6, open_low=True, help="output-noise: Gaussian std per released row, in units of 2 x its clip",
        scope="client"))
    output_clip: float = field(default=10.0, metadata=bounded(
        0.0, 1e6, open_low=True, help="output-noise: L2 norm each logits row is clipped to", scope="client"))
    gradient_clip: float = field(default=1.0, metadata=bounded(
        0.0, 1e6, open_low=True, help="output-noise: L2 norm each input-gradient row is clipped to", scope="client"))
    label_count_noise: str = field(default="auto", metadata=choice(
        "auto", "none", "gaussian", "laplace", help="noise on the released label histogram; auto: none without a "
        "mechanism, else gaussian", scope="client"))
    label_count_epsilon: float = field(default=0.5, metadata=bounded(
        0.0, 1e4, open_low=True, help="cost of one noisy label histogram", scope="client"))
    pate_teachers: int = field(default=10, metadata=bounded(
        2, 10_000, help="pate: shard teachers trained on disjoint shards of a client's records", scope="client"))
    pate_threshold: float = field(default=7.0, metadata=bounded(
        0.0, 1e6, help="pate: answer a row only when its noisy top vote reaches this (scale with pate-teachers)",
        scope="client"))
    pate_sigma1: float = field(default=2.0, metadata=bounded(
        0.0, 1e6, open_low=True, help="pate: noise std of the threshold check", scope="client"))
    pate_sigma2: float = field(default=1.0, metadata=bounded(
        0.0, 1e6, open_low=True, help="pate: noise std on each vote count for the answer", scope="client"))

    # The Flower app only (`flwr run .`; `fedkd run` ignores them)
    run_dir: str = field(default="runs/flower", metadata=described(
        "where the ServerApp writes run-<run id>/", scope="flower"))
    resume_from: str = field(default="", metadata=described(
        "the run directory of a ServerApp run that died, continued from its last epoch; empty: a new run",
        scope="flower"))
    evaluation: str = field(default="both", metadata=choice(
        "coordinator", "federated", "both", help="the coordinator's own test set, the clients' held-out data "
        "(evaluate messages), or both", scope="flower"))
    hub_host: str = field(default="127.0.0.1", metadata=described(
        "the name teachers dial to reach the hub (and its certificate's name)", scope="flower"))
    hub_port: int = field(default=0, metadata=bounded(0, 65535, help="the hub's port; 0: any free port",
                                                     scope="flower"))
    nodes_timeout: float = field(default=120.0, metadata=bounded(
        0.0, TIMEOUT_LIMIT, help="seconds the ServerApp waits for the nodes", scope="flower"))
    train_timeout: float = field(default=3600.0, metadata=bounded(
        0.0, TIMEOUT_LIMIT, open_low=True, help="seconds a node may take to train its teacher (and the TTL of "
        "serve messages)", scope="flower"))

    # References and housekeeping
    centralised: bool = field(default=False, metadata=described(
        "also train the reference model on the pooled data (an experiment-only reference)"))
    device: str = field(default="auto", metadata=choice(
        "auto", "cpu", "cuda", help="torch device of the coordinator's models; auto: CUDA when present"))
    num_threads: int = field(default=0, metadata=bounded(0, 1024, help="torch threads; 0: torch's choice"))
    sample_stages: int = field(default=4, metadata=bounded(
        1, 20, help="stages of training shown in plots/samples.png"))
    export_onnx: str = field(default="no", metadata=choice(
        "auto", "yes", "no", help="also write the student as student.onnx (about a second per run): yes needs the "
        "onnx extra (pip install 'fedkd[onnx]') and refuses to start without it, auto writes it when the extra is "
        "installed"))
    synthetic_check: int = field(default=1000, metadata=bounded(
        0, 100_000, help="fresh synthetic samples on which, without labelled data at the coordinator, the "
        "student's agreement with its ensemble is measured at the end (their queries count); 0: none"))

    def __post_init__(self) -> None:
        validate_fields(self)
        if isinstance(self.options, UnresolvedOptions):  # an institution's config: the coordinator's keys unread
            if self.options.method != self.method:
                raise ConfigError(f"options: unread options of method {self.options.method!r}, but "
                                  f"method={self.method}")
        else:
            methods, ensembles = coordinator_registries()
            if self.ensemble not in ensembles:
                raise ConfigError(f"ensemble: {self.ensemble!r} is not one of {', '.join(ensembles)}")
            expected = _method_entry(self.method, methods).options
            if self.options is None:
                object.__setattr__(self, "options", expected())
            elif not isinstance(self.options, expected):
                raise ConfigError(f"options: {type(self.options).__name__} are not the options of method "
                                  f"{self.method!r} ({expected.__name__})")
        modes = self.teacher_access_modes()
        if len(modes) != self.num_clients or any(m not in ("gradient", "logits", "labels") for m in modes):
            raise ConfigError(f"teacher-access: {self.teacher_access!r}; give gradient, logits or labels, for all "
                              f"clients or one per client (num-clients={self.num_clients}), comma-separated")
        privacy = self.privacy_modes()
        if len(privacy) != self.num_clients or any(m not in PRIVACY_MODES for m in privacy):
            raise ConfigError(f"privacy-mode: {self.privacy_mode!r}; give {', '.join(PRIVACY_MODES)}, for all "
                              f"clients or one per client (num-clients={self.num_clients}), comma-separated")
        if self.teacher_recipe == "open-set" and (clash := sorted({m for m in privacy if m in ("dp-sgd", "pate")})):
            raise ConfigError(f"teacher-recipe=open-set: clients with privacy-mode {' or '.join(clash)} cannot train "
                              "it (DP-SGD and PATE know the classes only); use privacy-mode none or output-noise, or "
                              "teacher-recipe=closed")
        names = self.teacher_models()
        if len(names) not in (1, self.num_clients):
            raise ConfigError(
                f"teacher-model: got {len(names)} names ({self.teacher_model!r}) for "
                f"num-clients={self.num_clients}; give one name for all clients or one per client, "
                "comma-separated"
            )

    def quorum_size(self, teachers: int) -> int:
        """How many of ``teachers`` must answer each query (``quorum``, or a majority when 0)."""
        if self.quorum > teachers:
            raise ConfigError(f"quorum: {self.quorum} is more than the {teachers} teachers in the run")
        return self.quorum or teachers // 2 + 1

    def _per_client(self, value: str) -> list[str]:
        """A comma-separated key that takes one value for all clients or one per client, as a list per client."""
        values = [v.strip() for v in value.split(",") if v.strip()]
        return values * self.num_clients if len(values) == 1 else values

    def teacher_access_modes(self) -> list[str]:
        """What each client grants (``teacher-access``, one value or one per client)."""
        return self._per_client(self.teacher_access)

    def privacy_modes(self) -> list[str]:
        """Each client's privacy mode (``privacy-mode``, one value or one per client)."""
        return self._per_client(self.privacy_mode)

    def client_privacy(self, client: int) -> PrivacySettings:
        """Client ``client``'s privacy settings, as these keys state them (a one-machine run only)."""
        try:
            return PrivacySettings(
                mode=self.privacy_modes()[client], budget=self.privacy_budget, delta=self.dp_delta,
                output_noise=self.output_noise, output_clip=self.output_clip, gradient_clip=self.gradient_clip,
                share_label_counts=self.share_label_counts, label_count_noise=self.label_count_noise,
                label_count_epsilon=self.label_count_epsilon, eval_epsilon=self.dp_eval_epsilon,
                pate_threshold=self.pate_threshold, pate_sigma1=self.pate_sigma1, pate_sigma2=self.pate_sigma2)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    def teacher_models(self) -> list[str]:
        """The teacher architecture of each client (``teacher-model`` may list one per client)."""
        return self._per_client(self.teacher_model)

    def to_dict(self) -> dict[str, Any]:
        """The resolved configuration with kebab-case keys (as written to summary.json); the method's
        options as ``METHOD.KEY``."""
        out = {kebab(f.name): getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "options"}
        if isinstance(self.options, UnresolvedOptions):
            out.update({f"{self.method}.{key}": value for key, value in self.options.values})
        else:
            out.update({f"{self.method}.{kebab(f.name)}": getattr(self.options, f.name)
                        for f in dataclasses.fields(self.options)})
        return out

    def student_arguments(self) -> dict[str, Any]:
        """``student-args`` as keyword arguments; ConfigError naming the key when it is not a JSON object."""
        if not self.student_args:
            return {}
        try:
            args = json.loads(self.student_args)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"student-args: {self.student_args!r} is not JSON ({exc.msg})") from None
        if not isinstance(args, dict):
            raise ConfigError(f"student-args: give a JSON object of keyword arguments, got {self.student_args!r}")
        return args

    def run_task(self) -> Task:
        """The run's task: its task card, or the built-in dataset's."""
        return run_task(self.task, self.dataset)

    @property
    def resolved(self) -> bool:
        """Whether the coordinator's keys (method, its options, ensemble) were read and checked."""
        return not isinstance(self.options, UnresolvedOptions)

    def replace(self, **changes: Any) -> RunConfig:
        if "method" in changes and changes["method"] != self.method and "options" not in changes:
            # another method: its default options (unread ones for an institution's config)
            changes["options"] = None if self.resolved else UnresolvedOptions(changes["method"])
        return dataclasses.replace(self, **changes)


_FIELDS = {f.name: f for f in dataclasses.fields(RunConfig) if f.name != "options"}


class UnknownKeyError(ConfigError):
    """A key no setting has: without the coordinator's registries it may still be a method's option."""


def _unknown_key(key: str, known: list[str], what: str = "config key") -> ConfigError:
    close = difflib.get_close_matches(key.replace("_", "-"), known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(known)}"
    return UnknownKeyError(f"unknown {what} {key!r}{hint}")


def option_keys(options_type: type, namespace: str) -> list[str]:
    """The namespaced keys of a method's options dataclass (``cudfkd.weight-bn``, ...)."""
    return [f"{namespace}.{kebab(f.name)}" for f in dataclasses.fields(options_type)]


def _method_entry(method: str, methods: Mapping[str, Any]) -> Any:
    """The registry entry of ``method``; ConfigError with the valid names otherwise."""
    if method not in methods:
        raise ConfigError(f"method: {method!r} is not one of {', '.join(methods)}")
    return methods[method]


def _coerced(values: Mapping[str, Any], fields: Mapping[str, dataclasses.Field[Any]], prefix: str,
             unknown: Callable[[str], ConfigError]) -> dict[str, Any]:
    """snake_case field name -> value for kebab-case ``values``, each coerced to its field's type."""
    changes: dict[str, Any] = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in fields or "_" in key:
            raise unknown(prefix + key)
        changes[name] = coerce(prefix + key, fields[name], value)
    return changes


def _options_from_mapping(namespace: str, options_type: type, values: Mapping[str, Any], base: Any) -> Any:
    fields = {f.name: f for f in dataclasses.fields(options_type)}
    changes = _coerced(values, fields, f"{namespace}.", lambda key: _unknown_key(
        key, option_keys(options_type, namespace), f"option of method {namespace!r}"))
    try:
        return dataclasses.replace(base, **changes)
    except ConfigError as exc:
        raise ConfigError(f"{namespace}.{exc}") from None


def split_namespaced(values: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Run-wide keys, and ``METHOD.KEY`` keys grouped by method (nested tables are flattened first)."""
    flat: dict[str, Any] = {}
    namespaced: dict[str, dict[str, Any]] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            namespaced.setdefault(key, {}).update(value)
        elif "." in key:
            namespace, _, sub = key.partition(".")
            namespaced.setdefault(namespace, {})[sub] = value
        else:
            flat[key] = value
    return flat, namespaced


def config_from_mapping(values: Mapping[str, Any], base: RunConfig | None = None, *,
                        ignore_unselected_defaults: bool = False, resolve: bool | None = None) -> RunConfig:
    """Build a config from kebab-case keys (and ``METHOD.KEY`` keys), on top of ``base`` (defaults if None).

    ``ignore_unselected_defaults`` lets options of a method that is not selected through when they
    equal that method's defaults (Flower's run config always carries every default of pyproject.toml).
    ``resolve=False`` builds an institution's config: the run-wide keys are checked, the method's options are
    kept unread (:class:`UnresolvedOptions`) and no coordinator module is imported. None: as ``base`` was built
    (resolved when there is no base).
    """
    if resolve is None:
        resolve = base is None or base.resolved
    flat, namespaced = split_namespaced(values)
    if not resolve:
        return _unresolved_config(flat, namespaced, base)
    methods, _ = coordinator_registries()
    base = base if base is not None and base.resolved else RunConfig(**_run_wide(base))
    selected = str(flat.get("method", base.method))
    # the selected method's options first, so a bare option key is pointed to the method that runs
    order = sorted(methods.values(), key=lambda m: m.name != selected)
    known = [kebab(n) for n in _FIELDS] + [k for m in order for k in option_keys(m.options, m.name)]

    def unknown(key: str) -> ConfigError:
        own = f"{selected}.{key.replace('_', '-')}"
        if own in known:
            return UnknownKeyError(f"unknown config key {key!r}; did you mean {own!r}? (a method's options take "
                               "its name as prefix)")
        return _unknown_key(key, known)

    changes = _coerced(flat, _FIELDS, "", unknown)
    method = changes.get("method", base.method)
    entry = _method_entry(method, methods)
    for namespace, options in namespaced.items():
        if namespace == method:
            continue
        if namespace not in methods:
            first = f"{namespace}.{next(iter(options), '')}"
            raise UnknownKeyError(f"unknown config key {first!r}: {namespace!r} is not a method; method options are "
                              f"namespaced by method ({', '.join(methods)})")
        unselected = methods[namespace].options()
        given = _options_from_mapping(namespace, type(unselected), options, unselected)
        if ignore_unselected_defaults and given == unselected:
            continue
        keys = ", ".join(f"{namespace}.{k}" for k in options)
        raise ConfigError(f"{keys}: option of method {namespace!r}, but method={method}; drop it or set "
                          f"method={namespace} (valid keys of {method}: "
                          f"{', '.join(option_keys(entry.options, method))})")
    base_options = base.options if base.method == method else entry.options()
    changes["options"] = _options_from_mapping(method, entry.options, namespaced.get(method, {}), base_options)
    changes["method"] = method
    return dataclasses.replace(base, **changes)


def default_values() -> dict[str, Any]:
    """Every run-wide key's default, kebab-case (no config is built: nothing of either side is imported)."""
    return {kebab(name): f.default for name, f in _FIELDS.items()}


def _run_wide(config: RunConfig | None) -> dict[str, Any]:
    """The run-wide fields of ``config`` (none for None), without its method options."""
    return {} if config is None else {name: getattr(config, name) for name in _FIELDS}


def _unresolved_config(flat: Mapping[str, Any], namespaced: Mapping[str, Mapping[str, Any]],
                       base: RunConfig | None) -> RunConfig:
    """An institution's config: run-wide keys checked, the selected method's options kept as given."""
    known = [kebab(n) for n in _FIELDS]
    changes = _coerced(flat, _FIELDS, "", lambda key: _unknown_key(key, known))
    fields = {**_run_wide(base), **changes}
    method = fields.get("method", RunConfig.method)
    given: dict[str, Any] = {}
    if base is not None and isinstance(base.options, UnresolvedOptions) and base.method == method:
        given.update(base.options.values)
    given.update(namespaced.get(method, {}))
    return RunConfig(**fields, options=UnresolvedOptions(method, tuple(sorted(given.items()))))


FOLLOW_FEDERATION = 0  # num-clients in the Flower app: as many clients as the federation has nodes


def config_from_run_config(run_config: Mapping[str, Any], *, num_clients: int | None = None,
                           resolve: bool = True) -> RunConfig:
    """A config from Flower's run config: every default of pyproject.toml plus the run's overrides,
    with ``auto`` for unset optional values; the defaults of methods that are not selected are ignored.
    ``resolve=False`` for an institution (the ClientApp): the coordinator's keys are left unread.

    ``num-clients`` = 0 (the app's default) follows the federation: the ServerApp counts the nodes and passes
    ``num_clients`` (and tells each node the number in its messages)."""
    values = dict(run_config)
    if values.get("num-clients") == FOLLOW_FEDERATION:
        if num_clients is None:
            raise ConfigError("num-clients: 0 follows the federation, and nothing has counted its nodes here; "
                              "the ServerApp resolves it (or set num-clients to the number of clients)")
        values["num-clients"] = num_clients
    return config_from_mapping(values, ignore_unselected_defaults=True, resolve=resolve)


def parse_assignments(assignments: list[str]) -> dict[str, str]:
    """Parse ``KEY=VALUE`` strings from the command line."""
    out: dict[str, str] = {}
    for item in assignments:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, for example --set epochs=5")
        out[key.strip()] = CliValue(value.strip())
    return out


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML file of kebab-case keys (top level, or a ``[tool.flwr.app.config]`` table)."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from None
    methods, _ = coordinator_registries()
    table = data.get("tool", {}).get("flwr", {}).get("app", {}).get("config")
    if isinstance(table, dict):
        data = dict(table)
    for key, value in data.items():
        if isinstance(value, dict) and key not in methods:
            raise ConfigError(f"config file {str(path)!r}: unexpected table [{key}]; run-wide keys belong at the "
                              f"top level, a method's options in a table named after it ({', '.join(methods)})")
    return data
