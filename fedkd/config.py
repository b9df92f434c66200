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

from fedkd.coordinator.settings import (
    EnsembleSettings,
    FlowerSettings,
    PoolSettings,
    QuerySettings,
    StudentSettings,
    SynthesisSettings,
)
from fedkd.institution.privacy.settings import MODES as PRIVACY_MODES
from fedkd.institution.privacy.settings import DPTrainingSettings, PrivacySettings
from fedkd.institution.settings import TeacherSettings
from fedkd.options import (
    BATCH_LIMIT,
    CliValue,
    ConfigError,
    bounded,
    choice,
    coerce,
    described,
    field_key,
    kebab,
    validate_fields,
)
from fedkd.task import Task, run_task

SECTION = {"section": True}  # a RunConfig field that holds a settings section


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
    """Every setting of a fedkd run: the run-wide keys, then one section per concern, each declared beside the code
    that reads it (the teachers' and the privacy sections at the institution, the others at the coordinator). Each
    field's metadata holds its rules, its meaning, where it applies and, in a section, its key (keys are flat:
    ``student-lr`` sets ``student.lr``); ``fedkd keys``, ``docs/configuration.md`` and the Flower app's table are
    generated from them."""

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

    # The distillation (a method's own options are its section, `METHOD.KEY`)
    method: str = field(default="cudfkd", metadata=described("the distillation method; its options are METHOD.KEY"))
    epochs: int = field(default=10, metadata=bounded(1, None, help="distillation epochs (evaluated and "
                                                               "checkpointed after each)"))
    steps_per_epoch: int = field(default=20, metadata=bounded(1, None, help="synthesis rounds per epoch"))
    student_steps: int = field(default=5, metadata=bounded(0, None, help="student steps (pool batches) per round"))
    batch_size: int = field(default=128, metadata=bounded(2, BATCH_LIMIT, help="synthetic batch and student batch"))

    # Sections, each declared beside the code that reads it; their keys are flat (`student-lr`: student.lr).
    teachers: TeacherSettings = field(default_factory=TeacherSettings, metadata=SECTION)
    privacy: PrivacySettings = field(default_factory=PrivacySettings, metadata=SECTION)
    dp_training: DPTrainingSettings = field(default_factory=DPTrainingSettings, metadata=SECTION)
    student: StudentSettings = field(default_factory=StudentSettings, metadata=SECTION)
    synthesis: SynthesisSettings = field(default_factory=SynthesisSettings, metadata=SECTION)
    ensemble: EnsembleSettings = field(default_factory=EnsembleSettings, metadata=SECTION)
    pool: PoolSettings = field(default_factory=PoolSettings, metadata=SECTION)
    queries: QuerySettings = field(default_factory=QuerySettings, metadata=SECTION)
    flower: FlowerSettings = field(default_factory=FlowerSettings, metadata=SECTION)

    # The selected method's options (a frozen dataclass registered with the method; keys `METHOD.KEY`).
    options: Any = field(default=None, compare=True)

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
        for name, kind in SECTIONS.items():
            if not isinstance(getattr(self, name), kind):
                raise ConfigError(f"{name}: {type(getattr(self, name)).__name__} is not a {kind.__name__}")
        if isinstance(self.options, UnresolvedOptions):  # an institution's config: the coordinator's keys unread
            if self.options.method != self.method:
                raise ConfigError(f"options: unread options of method {self.options.method!r}, but "
                                  f"method={self.method}")
        else:
            methods, ensembles = coordinator_registries()
            if self.ensemble.rule not in ensembles:
                raise ConfigError(f"ensemble: {self.ensemble.rule!r} is not one of {', '.join(ensembles)}")
            expected = _method_entry(self.method, methods).options
            if self.options is None:
                object.__setattr__(self, "options", expected())
            elif not isinstance(self.options, expected):
                raise ConfigError(f"options: {type(self.options).__name__} are not the options of method "
                                  f"{self.method!r} ({expected.__name__})")
        modes = self.teacher_access_modes()
        if len(modes) != self.num_clients or any(m not in ("gradient", "logits", "labels") for m in modes):
            raise ConfigError(f"teacher-access: {self.teachers.access!r}; give gradient, logits or labels, for all "
                              f"clients or one per client (num-clients={self.num_clients}), comma-separated")
        privacy = self.privacy.modes
        if len(privacy) not in (1, self.num_clients):
            raise ConfigError(f"privacy-mode: {self.privacy.mode!r}; give {', '.join(PRIVACY_MODES)}, for all "
                              f"clients or one per client (num-clients={self.num_clients}), comma-separated")
        clash = sorted({m for m in privacy if m in ("dp-sgd", "pate")})  # modes whose guarantee a recipe must keep
        if self.teachers.recipe == "open-set" and clash:
            raise ConfigError(f"teacher-recipe=open-set: clients with privacy-mode {' or '.join(clash)} cannot train "
                              "it (DP-SGD and PATE know the classes only); use privacy-mode none or output-noise, or "
                              "teacher-recipe=closed")
        if self.teachers.density and clash:
            raise ConfigError(f"teacher-density=on: clients with privacy-mode {' or '.join(clash)} cannot release it "
                              "(the density is fitted to the raw images, outside DP-SGD's and PATE's guarantee); use "
                              "privacy-mode none or output-noise, or teacher-density=off")
        withheld = sorted({m for m in privacy if m != "none"})  # modes that release no such term
        if self.teachers.class_statistics and withheld:
            raise ConfigError(f"teacher-class-statistics=on: clients with privacy-mode {' or '.join(withheld)} do "
                              "not release them (they are computed on the raw images, outside DP-SGD's and PATE's "
                              "guarantee, and output-noise releases no teacher-side term); use privacy-mode none, or "
                              "teacher-class-statistics=off")
        if self.teachers.density and self.teachers.recipe == "open-set":
            raise ConfigError("teacher-density=on and teacher-recipe=open-set both add the answers' one extra output "
                              "(a log-density, 'unknown'); choose one")
        if self.student.refit_warp > 0 and self.student.refit_mixup == 0:
            raise ConfigError(f"student-refit-warp={self.student.refit_warp:g} warps the blends of "
                              "student-refit-mixup, which is 0 here: set student-refit-mixup > 0 as well, or leave "
                              "student-refit-warp at 0")
        names = self.teacher_models()
        if len(names) not in (1, self.num_clients):
            raise ConfigError(
                f"teacher-model: got {len(names)} names ({self.teachers.model!r}) for "
                f"num-clients={self.num_clients}; give one name for all clients or one per client, "
                "comma-separated"
            )

    def _per_client(self, value: str) -> list[str]:
        """A comma-separated key that takes one value for all clients or one per client, as a list per client."""
        values = [v.strip() for v in value.split(",") if v.strip()]
        return values * self.num_clients if len(values) == 1 else values

    def teacher_access_modes(self) -> list[str]:
        """What each client grants (``teacher-access``, one value or one per client)."""
        return self._per_client(self.teachers.access)

    def privacy_modes(self) -> list[str]:
        """Each client's privacy mode (``privacy-mode``, one value or one per client)."""
        return self._per_client(self.privacy.mode)

    def teacher_models(self) -> list[str]:
        """The teacher architecture of each client (``teacher-model`` may list one per client)."""
        return self._per_client(self.teachers.model)

    def to_dict(self) -> dict[str, Any]:
        """The resolved configuration with its flat kebab-case keys (as written to summary.json); the method's
        options as ``METHOD.KEY``."""
        out = {key: getattr(self if section is None else getattr(self, section), holder.name)
               for key, (section, holder) in KEYS.items()}
        if isinstance(self.options, UnresolvedOptions):
            out.update({f"{self.method}.{key}": value for key, value in self.options.values})
        else:
            out.update({f"{self.method}.{kebab(f.name)}": getattr(self.options, f.name)
                        for f in dataclasses.fields(self.options)})
        return out

    def run_task(self) -> Task:
        """The run's task: its task card, or the built-in dataset's."""
        return run_task(self.task, self.dataset)

    @property
    def resolved(self) -> bool:
        """Whether the coordinator's keys (method, its options, ensemble) were read and checked."""
        return not isinstance(self.options, UnresolvedOptions)

    def replace(self, **changes: Any) -> RunConfig:
        """A copy with fields (run-wide values, whole sections) changed; ``config_from_mapping(values, base=...)``
        changes keys."""
        if "method" in changes and changes["method"] != self.method and "options" not in changes:
            # another method: its default options (unread ones for an institution's config)
            changes["options"] = None if self.resolved else UnresolvedOptions(changes["method"])
        return dataclasses.replace(self, **changes)


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(RunConfig)  # type: ignore[misc]
                             if f.metadata.get("section")}


def _key_table() -> dict[str, tuple[str | None, dataclasses.Field[Any]]]:
    """Every run key -> (its section, None for a run-wide key; the field that holds it), in RunConfig's order."""
    entries: list[tuple[str, str | None, dataclasses.Field[Any]]] = []
    for f in dataclasses.fields(RunConfig):
        if f.name in SECTIONS:
            entries += [(field_key(g), f.name, g) for g in dataclasses.fields(SECTIONS[f.name])]
        elif f.name != "options":
            entries.append((kebab(f.name), None, f))
    table = {key: (section, holder) for key, section, holder in entries}
    if len(table) != len(entries):
        raise AssertionError("a config key is declared twice")
    return table


KEYS = _key_table()


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
    base = base if base is not None and base.resolved else RunConfig(**_fields(base))
    selected = str(flat.get("method", base.method))
    # the selected method's options first, so a bare option key is pointed to the method that runs
    order = sorted(methods.values(), key=lambda m: m.name != selected)
    known = list(KEYS) + [k for m in order for k in option_keys(m.options, m.name)]

    def unknown(key: str) -> ConfigError:
        own = f"{selected}.{key.replace('_', '-')}"
        if own in known:
            return UnknownKeyError(f"unknown config key {key!r}; did you mean {own!r}? (a method's options take "
                               "its name as prefix)")
        return _unknown_key(key, known)

    changes = _with_keys(base, flat, unknown)
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


def _with_keys(base: RunConfig | None, values: Mapping[str, Any],
               unknown: Callable[[str], ConfigError]) -> dict[str, Any]:
    """The fields of RunConfig that ``values`` (flat kebab-case keys) change, each value coerced to its key's type:
    run-wide values, and whole sections rebuilt from ``base``'s (defaults for None) with their keys changed, so each
    section checks its own values."""
    changes: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {}
    for key, value in values.items():
        if key not in KEYS or "_" in key:
            raise unknown(key)
        section, holder = KEYS[key]
        coerced = coerce(key, holder, value)
        if section is None:
            changes[holder.name] = coerced
        else:
            sections.setdefault(section, {})[holder.name] = coerced
    for section, fields in sections.items():
        current = getattr(base, section) if base is not None else SECTIONS[section]()
        changes[section] = dataclasses.replace(current, **fields)
    return changes


def default_values() -> dict[str, Any]:
    """Every run key's default, kebab-case (no config is built: nothing of either side is imported)."""
    return {key: holder.default for key, (_, holder) in KEYS.items()}


def _fields(config: RunConfig | None) -> dict[str, Any]:
    """The fields of ``config`` (none for None): its run-wide values and sections, without its method options."""
    return {} if config is None else {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
                                      if f.name != "options"}


def _unresolved_config(flat: Mapping[str, Any], namespaced: Mapping[str, Mapping[str, Any]],
                       base: RunConfig | None) -> RunConfig:
    """An institution's config: run-wide keys and sections checked, the selected method's options kept as given."""
    known = list(KEYS)
    changes = _with_keys(base, flat, lambda key: _unknown_key(key, known))
    fields = {**_fields(base), **changes}
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
