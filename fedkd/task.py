"""A task: what the teachers and the student share, declared once (a task card) or derived from a built-in dataset.

The classes (a count or their names, in the order every model's outputs follow), the input shape and the
normalisation the models take their inputs with::

    # task.toml
    name = "derm7"
    classes = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    input-shape = [3, 64, 64]
    mean = [0.76, 0.55, 0.57]
    std = [0.14, 0.15, 0.17]

A run on a task card (``task = "task.toml"``) needs no data at the coordinator: the method is data-free. A teacher
whose description disagrees with the run's task is refused at Hello, naming the field.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # fedkd.data (torch) loads where a task's data or spec is used: reading a card stays light
    from fedkd.data import DatasetSpec, ImageData
from fedkd.options import ConfigError, toml_value

MAX_CLASSES = 100_000
MAX_SIDE = 1024
KEYS = ("name", "classes", "input-shape", "mean", "std")


class TaskError(ConfigError):
    """A task card that cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class Task:
    """The classes, the input shape (C, H, W) and the per-channel normalisation of a task."""

    classes: tuple[str, ...]
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str = "task"

    def __post_init__(self) -> None:
        classes: Any = self.classes
        if isinstance(classes, int) and not isinstance(classes, bool):
            classes = [str(c) for c in range(classes)]
        object.__setattr__(self, "classes", tuple(str(c) for c in classes))
        object.__setattr__(self, "input_shape", tuple(int(d) for d in self.input_shape))
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if len(self.input_shape) != 3:
            raise TaskError(f"task: input_shape must be (channels, height, width), got {self.input_shape}")
        check(self, "task")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def spec(self) -> DatasetSpec:
        """The task as the models and the synthesizer take it."""
        from fedkd.data import DatasetSpec

        channels, height, width = self.input_shape
        return DatasetSpec(self.name, self.num_classes, channels, height, self.mean, self.std,
                           image_width=0 if width == height else width)

    @classmethod
    def from_spec(cls, spec: DatasetSpec) -> Task:
        """A built-in dataset's task (its classes named by their index)."""
        return cls(tuple(str(c) for c in range(spec.num_classes)), spec.input_shape, spec.mean, spec.std, spec.name)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], where: str = "task") -> Task:
        """A task from a card's keys; TaskError naming ``where`` and the field otherwise."""
        unknown = [k for k in values if k not in KEYS]
        if unknown:
            raise TaskError(f"{where}: unknown field {unknown[0]!r}; a task card has {', '.join(KEYS)}")
        for key in KEYS[1:]:
            if key not in values:
                raise TaskError(f"{where}: field {key!r} is missing")
        classes = values["classes"]
        if isinstance(classes, int) and not isinstance(classes, bool):
            if not 2 <= classes <= MAX_CLASSES:
                raise TaskError(f"{where}: field 'classes' is {classes}; a task has 2 to {MAX_CLASSES} classes")
            names: tuple[str, ...] = tuple(str(c) for c in range(classes))
        elif isinstance(classes, list) and all(isinstance(c, str) and c for c in classes):
            names = tuple(classes)
        else:
            raise TaskError(f"{where}: field 'classes' must be a count or a list of class names, got {classes!r}")
        shape = _numbers(values["input-shape"], where, "input-shape", int)
        mean = _numbers(values["mean"], where, "mean", float)
        std = _numbers(values["std"], where, "std", float)
        name = values.get("name", Path(where).stem)
        if not isinstance(name, str) or not name or len(name) > 100:
            raise TaskError(f"{where}: field 'name' must be a non-empty string of at most 100 characters")
        if len(shape) != 3:
            raise TaskError(f"{where}: field 'input-shape' must be [channels, height, width], got {list(shape)}")
        task = cls.__new__(cls)
        object.__setattr__(task, "classes", names)
        object.__setattr__(task, "input_shape", (int(shape[0]), int(shape[1]), int(shape[2])))
        object.__setattr__(task, "mean", tuple(float(m) for m in mean))
        object.__setattr__(task, "std", tuple(float(s) for s in std))
        object.__setattr__(task, "name", name)
        check(task, where)
        return task

    @classmethod
    def from_toml(cls, path: str | Path) -> Task:
        path = Path(path)
        try:
            values = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise TaskError(f"task card {str(path)!r} does not exist") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise TaskError(f"task card {str(path)!r} is not valid TOML: {exc}") from None
        return cls.from_mapping(values, where=f"task card {str(path)!r}")

    def load_images(self, root: str | Path) -> ImageData:
        """Labelled images of this task from an ImageFolder directory (class sub-folders named as its classes)."""
        from fedkd.data import load_image_folder

        return load_image_folder(root, self.classes, self.input_shape)

    def to_dict(self) -> dict[str, Any]:
        """The task card's keys (as a run's summary and the student's model card record them)."""
        return {"name": self.name, "classes": list(self.classes), "input-shape": list(self.input_shape),
                "mean": list(self.mean), "std": list(self.std)}

    def to_toml(self) -> str:
        """The task card's text (what :meth:`from_toml` reads back)."""
        return "".join(f"{key} = {toml_value(value)}\n" for key, value in self.to_dict().items())


def _numbers(value: Any, where: str, key: str, kind: type) -> Sequence[float]:
    if not isinstance(value, list) or not value or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise TaskError(f"{where}: field {key!r} must be a list of numbers, got {value!r}")
    if kind is int and not all(float(v).is_integer() for v in value):
        raise TaskError(f"{where}: field {key!r} must hold integers, got {value!r}")
    if not all(math.isfinite(v) for v in value):
        raise TaskError(f"{where}: field {key!r} holds a value that is not finite")
    return value


def check(task: Task, where: str) -> None:
    """The rules every task keeps, each error naming ``where`` and the field."""
    channels, height, width = task.input_shape
    if not 1 <= channels <= 16:
        raise TaskError(f"{where}: field 'input-shape' has {channels} channels; give 1 to 16")
    for side in (height, width):  # the generator upsamples twice from a quarter of each side
        if not (4 <= side <= MAX_SIDE and side % 4 == 0):
            raise TaskError(f"{where}: field 'input-shape' has side {side}; give multiples of 4 from 4 to "
                            f"{MAX_SIDE}")
    if len(task.classes) < 2 or len(set(task.classes)) != len(task.classes):
        raise TaskError(f"{where}: field 'classes' must name at least 2 classes, each once")
    for key, values in (("mean", task.mean), ("std", task.std)):
        if len(values) != channels:
            raise TaskError(f"{where}: field {key!r} has {len(values)} values for {channels} channels")
    if any(s <= 0 for s in task.std):
        raise TaskError(f"{where}: field 'std' must be positive")


def run_task(task_card: str, dataset: str) -> Task:
    """The task of a run: its task card when it names one, else the built-in dataset's."""
    from fedkd.data import SPECS

    return Task.from_toml(task_card) if task_card else Task.from_spec(SPECS[dataset])
