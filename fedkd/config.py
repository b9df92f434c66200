"""Run configuration: one frozen, validated dataclass for every entry point.

Keys are kebab-case in TOML and on the command line (``--set batch-size=64``)
and snake_case in Python. The same keys are what the Flower app reads from its
run config, so an experiment is the same whichever entry point runs it.
Unknown keys and out-of-range values fail at start-up with a message that
names the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration key or value is invalid; the message names it."""


def _choice(*names: str) -> dict[str, Any]:
    return {"choices": names}


def _range(low: float | None = None, high: float | None = None, *, open_low: bool = False) -> dict[str, Any]:
    return {"low": low, "high": high, "open_low": open_low}


@dataclass(frozen=True)
class RunConfig:
    """Every setting of a fedkd run. Field metadata holds the validation rules."""

    # Data and federation
    dataset: str = field(default="mnist5k", metadata=_choice(
        "mnist5k", "digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "svhn"))
    data_root: str = "data"
    num_clients: int = field(default=5, metadata=_range(1, 1000))
    partition: str = field(default="dirichlet", metadata=_choice("iid", "dirichlet", "pathological"))
    alpha: float = field(default=0.5, metadata=_range(0.0, None, open_low=True))
    classes_per_client: int = field(default=2, metadata=_range(1, None))
    min_partition_size: int = field(default=10, metadata=_range(1, None))
    seed: int = field(default=0, metadata=_range(0, None))

    # Teachers (trained by each client on its own partition only)
    teacher_model: str = "lenet5"
    teacher_epochs: int = field(default=40, metadata=_range(0, None))
    teacher_lr: float = field(default=1e-3, metadata=_range(0.0, None, open_low=True))
    teacher_batch_size: int = field(default=64, metadata=_range(1, None))
    teacher_label_smoothing: float = field(default=0.1, metadata=_range(0.0, 1.0))
    max_query_batch: int = field(default=1024, metadata=_range(1, None))

    # Student and generator. Defaults are tuned for the main job on a 2-core CPU
    # (MNIST-5k; see the README's Results): a small generator, a faster generator
    # learning rate and a stronger BN-statistics weight than the paper's CIFAR
    # scripts (generator width 64, lr 1e-3, weight-bn 1), which --set restores.
    student_model: str = "lenet5-half"
    method: str = "cudfkd"
    epochs: int = field(default=10, metadata=_range(1, None))
    steps_per_epoch: int = field(default=40, metadata=_range(1, None))
    student_steps: int = field(default=5, metadata=_range(1, None))
    batch_size: int = field(default=128, metadata=_range(2, None))
    latent_dim: int = field(default=64, metadata=_range(1, None))
    generator_width: int = field(default=16, metadata=_range(1, None))
    generator_lr: float = field(default=1e-2, metadata=_range(0.0, None, open_low=True))
    student_lr: float = field(default=0.1, metadata=_range(0.0, None, open_low=True))
    student_momentum: float = field(default=0.9, metadata=_range(0.0, 1.0))
    student_weight_decay: float = field(default=1e-4, metadata=_range(0.0, None))
    student_loss: str = field(default="kl", metadata=_choice("l1", "kl"))
    temperature: float = field(default=4.0, metadata=_range(0.0, None, open_low=True))
    ensemble: str = field(default="mean", metadata=_choice("mean", "class-weighted"))
    share_label_counts: bool = True

    # CuDFKD generator loss (methods.md section 1)
    weight_entropy: float = field(default=20.0, metadata=_range(0.0, None))
    weight_onehot: float = field(default=1.0, metadata=_range(0.0, None))
    weight_bn: float = field(default=10.0, metadata=_range(0.0, None))
    adv_start: float = field(default=0.0, metadata=_range(0.0, None))
    adv_step: float = field(default=0.5, metadata=_range(0.0, None))
    adv_temperature: float = field(default=3.0, metadata=_range(0.0, None, open_low=True))

    # CuDFKD self-paced curriculum
    self_paced: str = field(default="log", metadata=_choice("log", "soft", "hard", "none"))
    lambda_start: float | None = None
    lambda_growth: float | None = None
    lambda_end_quantile: float = field(default=0.95, metadata=_range(0.0, 1.0, open_low=True))

    # Transport of the queries (design.md, "Transports"). inprocess: teacher hosts called
    # directly; grpc: a hub on loopback and one teacher agent process per client, TLS + tokens.
    transport: str = field(default="inprocess", metadata=_choice("inprocess", "grpc"))
    quorum: int = field(default=0, metadata=_range(0, None))  # teachers that must answer; 0 = a majority
    query_timeout: float = field(default=60.0, metadata=_range(0.0, None, open_low=True))  # seconds per query
    rejoin_timeout: float = field(default=120.0, metadata=_range(0.0, None))  # seconds to wait below quorum
    max_message_mb: float = field(default=64.0, metadata=_range(0.0, None, open_low=True))  # per gRPC message

    # Differential privacy of the teachers (privacy-notes.md). dp-sgd: each client trains its teacher
    # with Opacus DP-SGD (Poisson sampling, PRV accountant) to dp-epsilon at dp-delta (0 = 1 / (10 n) of
    # the client's n records); every answer is then post-processing. Metrics a client releases about its
    # held-out data (federated evaluation) are Gaussian-noised counts accounted at dp-eval-epsilon each.
    teacher_dp: str = field(default="none", metadata=_choice("none", "dp-sgd"))
    dp_epsilon: float = field(default=8.0, metadata=_range(0.0, None, open_low=True))
    dp_delta: float = field(default=0.0, metadata=_range(0.0, 0.1))
    dp_max_grad_norm: float = field(default=1.0, metadata=_range(0.0, None, open_low=True))
    dp_eval_epsilon: float = field(default=1.0, metadata=_range(0.0, None, open_low=True))

    # The Flower app only (`flwr run .`; `fedkd run` ignores them). run-dir: where the ServerApp
    # writes run-<run id>/; evaluation: the coordinator's own test set, the clients' held-out data
    # (evaluate messages), or both; hub-host: the name teachers dial to reach the hub (and its
    # certificate's name), hub-port 0 = any free port; timeouts in seconds.
    run_dir: str = "runs/flower"
    evaluation: str = field(default="both", metadata=_choice("coordinator", "federated", "both"))
    hub_host: str = "127.0.0.1"
    hub_port: int = field(default=0, metadata=_range(0, 65535))
    nodes_timeout: float = field(default=120.0, metadata=_range(0.0, None))
    train_timeout: float = field(default=3600.0, metadata=_range(0.0, None, open_low=True))

    # References and housekeeping
    centralised: bool = False
    device: str = field(default="auto", metadata=_choice("auto", "cpu", "cuda"))
    num_threads: int = field(default=0, metadata=_range(0, None))
    sample_stages: int = field(default=4, metadata=_range(1, 20))

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _validate(f, getattr(self, f.name))
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

    def teacher_models(self) -> list[str]:
        """The teacher architecture of each client (``teacher-model`` may list one per client)."""
        names = [n.strip() for n in self.teacher_model.split(",") if n.strip()]
        if len(names) == 1:
            return names * self.num_clients
        return names

    def to_dict(self) -> dict[str, Any]:
        """The resolved configuration with kebab-case keys (as written to summary.json)."""
        return {_kebab(k): v for k, v in dataclasses.asdict(self).items()}

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)


_FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def _validate(f: dataclasses.Field[Any], value: Any) -> None:
    key = _kebab(f.name)
    meta = f.metadata
    if value is None:
        if f.default is not None:
            raise ConfigError(f"{key}: a value is required")
        return
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(meta['choices'])}")
    low, high = meta.get("low"), meta.get("high")
    if low is not None and (value < low or (meta.get("open_low") and value == low)):
        op = ">" if meta.get("open_low") else ">="
        raise ConfigError(f"{key}: {value!r} is out of range (must be {op} {low})")
    if high is not None and value > high:
        raise ConfigError(f"{key}: {value!r} is out of range (must be <= {high})")


def _coerce(key: str, f: dataclasses.Field[Any], value: Any) -> Any:
    """Convert a TOML or command-line value to the field's type, or fail naming the key."""
    kind = str(f.type)
    optional = "None" in kind
    if optional and (value is None or (isinstance(value, str) and value.strip().lower() in ("", "auto", "none"))):
        return None
    try:
        if kind.startswith("bool"):
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "on"):
                return True
            if isinstance(value, str) and value.strip().lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if kind.startswith("int"):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind.startswith("float"):
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if kind.startswith("str"):
            if not isinstance(value, str):
                raise ValueError
            return value
    except (TypeError, ValueError):
        pass
    else:
        raise AssertionError(f"unhandled field type {kind}")
    expected = kind.split(" ")[0].replace("|", "")
    raise ConfigError(f"{key}: {value!r} is not a valid {expected}")


def config_from_mapping(values: Mapping[str, Any], base: RunConfig | None = None) -> RunConfig:
    """Build a config from kebab-case keys, on top of ``base`` (defaults if None)."""
    changes: dict[str, Any] = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in _FIELDS or "_" in key:
            known = [_kebab(n) for n in _FIELDS]
            close = difflib.get_close_matches(key.replace("_", "-"), known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(known)}"
            raise ConfigError(f"unknown config key {key!r}{hint}")
        changes[name] = _coerce(key, _FIELDS[name], value)
    return dataclasses.replace(base or RunConfig(), **changes)


def parse_assignments(assignments: list[str]) -> dict[str, str]:
    """Parse ``KEY=VALUE`` strings from the command line."""
    out: dict[str, str] = {}
    for item in assignments:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, for example --set epochs=5")
        out[key.strip()] = value.strip()
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
    table = data.get("tool", {}).get("flwr", {}).get("app", {}).get("config")
    if isinstance(table, dict):
        return dict(table)
    for key, value in data.items():
        if isinstance(value, dict):
            raise ConfigError(f"config file {str(path)!r}: unexpected table [{key}]; keys belong at the top level")
    return data
