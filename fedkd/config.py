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
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedkd.institution.privacy.policy import MODES as PRIVACY_MODES
from fedkd.institution.privacy.policy import PrivacySettings
from fedkd.options import (
    BATCH_LIMIT,
    TIMEOUT_LIMIT,
    CliValue,
    ConfigError,
    bounded,
    choice,
    coerce,
    kebab,
    validate_fields,
)


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
    """Every setting of a fedkd run. Field metadata holds the validation rules."""

    # Data and federation
    dataset: str = field(default="mnist5k", metadata=choice(
        "mnist5k", "digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "svhn"))
    data_root: str = "data"
    num_clients: int = field(default=5, metadata=bounded(1, 1000))
    partition: str = field(default="dirichlet", metadata=choice("iid", "dirichlet", "pathological"))
    alpha: float = field(default=0.5, metadata=bounded(0.0, 1e6, open_low=True))
    classes_per_client: int = field(default=2, metadata=bounded(1, 1000))
    min_partition_size: int = field(default=10, metadata=bounded(1, 10**9))
    seed: int = field(default=0, metadata=bounded(0, None))

    # Teachers (trained by each client on its own partition only)
    teacher_model: str = "lenet5"
    teacher_epochs: int = field(default=40, metadata=bounded(0, None))
    teacher_lr: float = field(default=1e-3, metadata=bounded(0.0, 10.0, open_low=True))
    teacher_batch_size: int = field(default=64, metadata=bounded(1, BATCH_LIMIT))
    teacher_label_smoothing: float = field(default=0.1, metadata=bounded(0.0, 1.0))
    # What each simulated client grants (one mode for all, or one per client, comma-separated): gradient
    # (Forward and Backward), logits (Forward only: its gradient term is estimated by zeroth order with
    # zo-directions random directions per sample, each an extra Forward of the batch, or left out when 0) or
    # labels (hard labels only: aggregated as smoothed votes, no gradient term).
    # An institution's own `fedkd teacher --access` is authoritative.
    teacher_access: str = "gradient"
    zo_directions: int = field(default=4, metadata=bounded(0, 256))
    zo_radius: float = field(default=1e-2, metadata=bounded(0.0, 10.0, open_low=True))
    max_query_batch: int = field(default=1024, metadata=bounded(1, BATCH_LIMIT))

    # Student and generator. Defaults are tuned for the main job on a 2-core CPU
    # (MNIST-5k; see the README's Results): a small generator, a faster generator
    # learning rate and a stronger BN-statistics weight than the paper's CIFAR
    # scripts (generator width 64, lr 1e-3, weight-bn 1), which --set restores.
    student_model: str = "lenet5-half"
    method: str = "cudfkd"
    epochs: int = field(default=10, metadata=bounded(1, None))
    steps_per_epoch: int = field(default=20, metadata=bounded(1, None))  # synthesis rounds per epoch
    student_steps: int = field(default=20, metadata=bounded(0, None))  # student steps (pool batches) per round
    batch_size: int = field(default=128, metadata=bounded(2, BATCH_LIMIT))
    student_lr: float = field(default=0.1, metadata=bounded(0.0, 10.0, open_low=True))
    student_momentum: float = field(default=0.9, metadata=bounded(0.0, 1.0))
    student_weight_decay: float = field(default=1e-4, metadata=bounded(0.0, 1.0))
    student_loss: str = field(default="kl", metadata=choice("l1", "kl"))
    student_shift: int = field(default=0, metadata=bounded(0, 8))  # pixels a pool image may move in a student step
    temperature: float = field(default=4.0, metadata=bounded(0.0, 100.0, open_low=True))
    ensemble: str = "auto"  # an aggregator of the coordinator's (fedkd.coordinator.aggregation), or auto
    # Robustness to a teacher that answers wrong on purpose (fedkd/coordinator/robustness.py): per-teacher reliability
    # from agreement with the others (multiplies the aggregator's weights), logits clipped to +-logit-bound, a
    # teacher's per-sample input gradient clipped to gradient-bound x the median teacher's. With DP-SGD teachers
    # set reliability=false: they barely agree on synthetic samples and it leaves honest ones out
    # (docs/privacy.md: 0.857 against 0.833 at epsilon 8).
    reliability: bool = True
    logit_bound: float = field(default=100.0, metadata=bounded(1.0, 1e6))
    gradient_bound: float = field(default=10.0, metadata=bounded(1.0, 1e6))
    share_label_counts: bool = True

    # The shared synthesizer (fedkd/coordinator/synthesis.py): the generator (class-conditional with
    # `conditional-generator`, measured no better on the main job), `synthesis-steps`
    # generator updates per round (best iterate kept), latents optimised per round when latent-lr > 0,
    # re-initialised every `generator-reset` rounds (0 = never), images shifted by up to
    # `synthesis-shift` pixels before the teachers see them, a mode-seeking diversity term weighted by
    # `synthesis-diversity`; `synthesis-forward-batches` more batches per round drawn from the updated
    # generator and answered by a Forward alone (half a round batch's query cost).
    latent_dim: int = field(default=64, metadata=bounded(1, 4096))
    generator_width: int = field(default=16, metadata=bounded(1, 1024))
    generator_lr: float = field(default=1e-2, metadata=bounded(0.0, 10.0, open_low=True))
    conditional_generator: bool = False
    synthesis_steps: int = field(default=1, metadata=bounded(1, None))
    latent_lr: float = field(default=0.0, metadata=bounded(0.0, 10.0))
    generator_reset: int = field(default=0, metadata=bounded(0, None))
    synthesis_shift: int = field(default=2, metadata=bounded(0, 8))
    synthesis_diversity: float = field(default=20.0, metadata=bounded(0.0, 1e6))
    synthesis_forward_batches: int = field(default=0, metadata=bounded(0, None))

    # The synthetic pool (fedkd/coordinator/synthetic_pool.py) and the query budget, in query samples as the
    # coordinator counts them (every sample of every Forward and Backward, summed over teachers);
    # 0 = no budget. When spent, synthesis stops and the student keeps training on the pool.
    pool_size: int = field(default=50_000, metadata=bounded(1, None))
    query_budget: int = field(default=0, metadata=bounded(0, 10**15))

    # The selected method's options (a frozen dataclass registered with the method; keys `METHOD.KEY`).
    options: Any = field(default=None, compare=True)

    # Transport of the queries (docs/query-path.md). inprocess: teacher hosts called
    # directly; grpc: a hub on loopback and one teacher agent process per client, TLS + tokens.
    transport: str = field(default="inprocess", metadata=choice("inprocess", "grpc"))
    quorum: int = field(default=0, metadata=bounded(0, 1000))  # teachers that must answer; 0 = a majority
    query_timeout: float = field(default=60.0, metadata=bounded(0.0, TIMEOUT_LIMIT, open_low=True))  # seconds per query
    rejoin_timeout: float = field(default=120.0, metadata=bounded(0.0, TIMEOUT_LIMIT))  # seconds to wait below quorum
    max_message_mb: float = field(default=64.0, metadata=bounded(0.0, 2000.0, open_low=True))  # per gRPC message

    # Privacy, per client (docs/privacy.md). In a one-machine run the experimenter is
    # every party, so these keys stand in for each client's own settings; a Flower SuperNode in a deployment
    # takes them from its node config only, never from the coordinator's run config.
    # privacy-mode (one value, or one per client): none; dp-sgd (the teacher is trained with Opacus DP-SGD to
    # dp-epsilon at dp-delta, 0 = 1 / (10 n), batch dp-batch-size, lr dp-lr; every answer is post-processing);
    # output-noise (every released logits / input-gradient row clipped to output-clip / gradient-clip with
    # Gaussian noise of std output-noise x 2 x clip: a teacher-level guarantee, accounted per query sample).
    # privacy-budget: the
    # client's total epsilon (training included), enforced before every release; 0 = unlimited (reported).
    # Label counts are released exactly without a mechanism, else with label-count-noise (gaussian or
    # laplace) at label-count-epsilon; evaluation counts (Flower evaluate) at dp-eval-epsilon each.
    privacy_mode: str = "none"
    privacy_budget: float = field(default=0.0, metadata=bounded(0.0, 1e6))
    dp_epsilon: float = field(default=8.0, metadata=bounded(0.0, 1e4, open_low=True))
    dp_delta: float = field(default=0.0, metadata=bounded(0.0, 0.1))
    dp_max_grad_norm: float = field(default=1.0, metadata=bounded(0.0, 1e6, open_low=True))
    # DP-SGD's own batch size (expected: Poisson sampling at dp-batch-size / n) and Adam learning rate; larger
    # batches than non-private training need (the noise is per batch): on the main job at epsilon 8, 256 / 3e-3
    # gives the best student of 64 / 1e-3, 256 / 1e-2 and 256 / 3e-3 over 3 seeds (docs/privacy.md).
    dp_batch_size: int = field(default=256, metadata=bounded(1, BATCH_LIMIT))
    dp_lr: float = field(default=3e-3, metadata=bounded(0.0, 10.0, open_low=True))
    # After DP-SGD, release the per-channel feature statistics at the teacher's normalisation layers (Gaussian
    # mechanism, each record's statistics clipped to dp-feature-clip, costing dp-feature-epsilon, accounted with
    # the training) so the BatchNorm-statistics term (cudfkd.weight-bn, DeepInversion) works with DP teachers;
    # 0 = not released (the term is then unavailable from DP teachers).
    dp_feature_epsilon: float = field(default=0.0, metadata=bounded(0.0, 1e4))
    dp_feature_clip: float = field(default=5.0, metadata=bounded(0.0, 1e6, open_low=True))
    dp_eval_epsilon: float = field(default=1.0, metadata=bounded(0.0, 1e4, open_low=True))
    output_noise: float = field(default=1.0, metadata=bounded(0.0, 1e6, open_low=True))
    output_clip: float = field(default=10.0, metadata=bounded(0.0, 1e6, open_low=True))
    gradient_clip: float = field(default=1.0, metadata=bounded(0.0, 1e6, open_low=True))
    label_count_noise: str = field(default="auto", metadata=choice("auto", "none", "gaussian", "laplace"))
    label_count_epsilon: float = field(default=0.5, metadata=bounded(0.0, 1e4, open_low=True))
    # privacy-mode=pate: the client trains pate-teachers shard teachers on disjoint shards of its records and
    # answers labels only, by Confident-GNMax (answer when the top vote + N(0, pate-sigma1^2) >= pate-threshold,
    # the argmax of the votes + N(0, pate-sigma2^2)); scale the threshold with pate-teachers.
    pate_teachers: int = field(default=10, metadata=bounded(2, 10_000))
    pate_threshold: float = field(default=7.0, metadata=bounded(0.0, 1e6))
    pate_sigma1: float = field(default=2.0, metadata=bounded(0.0, 1e6, open_low=True))
    pate_sigma2: float = field(default=1.0, metadata=bounded(0.0, 1e6, open_low=True))

    # The Flower app only (`flwr run .`; `fedkd run` ignores them). run-dir: where the ServerApp
    # writes run-<run id>/; evaluation: the coordinator's own test set, the clients' held-out data
    # (evaluate messages), or both; hub-host: the name teachers dial to reach the hub (and its
    # certificate's name), hub-port 0 = any free port; timeouts in seconds. resume-from: the run directory
    # (run-dir/run-<run id>) of a ServerApp run that died, continued from its last epoch; empty = a new run.
    run_dir: str = "runs/flower"
    resume_from: str = ""
    evaluation: str = field(default="both", metadata=choice("coordinator", "federated", "both"))
    hub_host: str = "127.0.0.1"
    hub_port: int = field(default=0, metadata=bounded(0, 65535))
    nodes_timeout: float = field(default=120.0, metadata=bounded(0.0, TIMEOUT_LIMIT))
    train_timeout: float = field(default=3600.0, metadata=bounded(0.0, TIMEOUT_LIMIT, open_low=True))

    # References and housekeeping
    centralised: bool = False
    device: str = field(default="auto", metadata=choice("auto", "cpu", "cuda"))
    num_threads: int = field(default=0, metadata=bounded(0, 1024))
    sample_stages: int = field(default=4, metadata=bounded(1, 20))

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


def _unknown_key(key: str, known: list[str], what: str = "config key") -> ConfigError:
    close = difflib.get_close_matches(key.replace("_", "-"), known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(known)}"
    return ConfigError(f"unknown {what} {key!r}{hint}")


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
            return ConfigError(f"unknown config key {key!r}; did you mean {own!r}? (a method's options take "
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
            raise ConfigError(f"unknown config key {first!r}: {namespace!r} is not a method; method options are "
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
