"""fedkd from Python: a researcher's teachers in a notebook, an institution that prefers Python to the CLI.

    import fedkd
    task = fedkd.Task.from_toml("task.toml")   # or fedkd.Task(classes=..., input_shape=..., mean=..., std=...)
    result = fedkd.distill(teachers=[model_a, model_b, model_c], task=task, out="runs/derm",
                           label_counts=[counts_a, None, counts_c], epochs=10)
    result.student      # the trained nn.Module, in eval mode
    result.summary      # the summary.json dict
    result.export("student.pt2")
    student = fedkd.load_student("runs/derm")   # a finished run's student, as an nn.Module

    fedkd.serve(model, task, connect="hub.example.org:50051", token_file="teacher-000.token", ca="ca.pem")

A thin layer on the same config and the same coordinator flow as the commands: every config key is a keyword
argument (dashes as underscores), checked with the same named errors, and the teachers given to
:func:`distill` go through the same host, release policy and robustness as remote ones.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fedkd.config import config_from_mapping
from fedkd.coordinator.distillation import Distillation, RunObserver
from fedkd.coordinator.export import export_program
from fedkd.coordinator.flow import Session, check_names, coordinate
from fedkd.coordinator.pool import LocalPool
from fedkd.data import ImageData
from fedkd.options import ConfigError, resolve_device
from fedkd.task import Task


@dataclass
class Distilled:
    """What :func:`distill` returns: the student (eval mode), the run's summary and its directory."""

    student: nn.Module
    summary: dict[str, Any]
    run_dir: Path
    task: Task

    def export(self, path: str | Path) -> Path:
        """The student as a ``torch.export`` program at ``path`` (``torch.export.load(path).module()``)."""
        path = Path(path)
        why = export_program(self.student, self.task.input_shape, path)
        if why is not None:
            raise RuntimeError(f"the student could not be exported: {why}")
        return path


class _ModulesAsTeachers:
    """Teachers given as nn.Modules in this process, each behind its own host (the same contract, release policy
    and robustness as a remote teacher)."""

    def __init__(self, hosts: list[Any], test: ImageData | None) -> None:
        self.hosts, self.test = hosts, test
        self.student: nn.Module | None = None

    @contextmanager
    def session(self, run_dir: Path, device: torch.device, observer: RunObserver) -> Iterator[Session]:
        observer.stage(f"{len(self.hosts)} teachers in this process"
                       + ("" if self.test is not None else "; no labelled data: the student's accuracy is not "
                                                            "measured here"))
        yield Session(LocalPool(self.hosts), "inprocess", test=self.test)

    def finish(self, result: Distillation, session: Session, observer: RunObserver) -> None:
        self.student = result.student  # the trained student, in memory


def _eval_data(eval_data: Any, task: Task) -> ImageData | None:
    if eval_data is None:
        return None
    if isinstance(eval_data, (str, Path)):
        return task.load_images(eval_data)
    if isinstance(eval_data, ImageData):
        data = eval_data
    elif isinstance(eval_data, (tuple, list)) and len(eval_data) == 2:
        data = ImageData(torch.as_tensor(eval_data[0], dtype=torch.float32), torch.as_tensor(eval_data[1]).long())
    else:
        raise ConfigError("eval_data: give (images, labels): images in [0, 1] of shape (N, C, H, W) and integer "
                          "labels (N,) in the task's class order")
    if tuple(data.images.shape[1:]) != task.input_shape:
        raise ConfigError(f"eval_data: images of shape {tuple(data.images.shape[1:])}, the task takes "
                          f"{task.input_shape}")
    if len(data) and (int(data.labels.min()) < 0 or int(data.labels.max()) >= task.num_classes):
        raise ConfigError(f"eval_data: labels outside 0..{task.num_classes - 1}")
    return data


def distill(*, teachers: Sequence[nn.Module | torch.export.ExportedProgram], task: Task | str | Path, out: str | Path,
            student: str | None = None, label_counts: Sequence[Sequence[int] | None] | None = None,
            eval_data: str | Path | ImageData | tuple[Tensor, Tensor] | None = None, resume: bool = False,
            observer: RunObserver | None = None, **keys: Any) -> Distilled:
    """Distil one student from ``teachers`` (in-process ``nn.Module`` classifiers of ``task``) into ``out``.

    ``student``: the student's architecture (``student-model``; None: its default). ``label_counts``: per teacher,
    its training records per class (None: not shared). ``eval_data``: labelled
    data to measure accuracy on, an ImageFolder directory or (images in [0, 1], labels); without it only what
    needs no labels is reported. Any config key is a keyword (``epochs=10``, ``method="tadfkd"``,
    ``cudfkd_weight_bn=30`` for ``cudfkd.weight-bn``).
    """
    from fedkd.client.cli import host_from_module  # the institution's side: how a teacher is served

    out = Path(out)
    task = task if isinstance(task, Task) else Task.from_toml(task)
    if not teachers:
        raise ConfigError("teachers: give at least one nn.Module")
    counts = list(label_counts) if label_counts is not None else [None] * len(teachers)
    if len(counts) != len(teachers):
        raise ConfigError(f"label_counts: {len(counts)} entries for {len(teachers)} teachers (None where a teacher "
                          "shares none)")
    values = {_key(k): v for k, v in keys.items()}
    values["num-clients"] = len(teachers)
    if student is not None:  # else the config's student-model
        values["student-model"] = student
    with tempfile.TemporaryDirectory() as scratch:  # everything is checked before anything is written to out
        card = Path(scratch) / "task.toml"
        card.write_text(task.to_toml())
        config = config_from_mapping({**values, "task": str(card)})
        check_names(config, task.spec)
    device = str(resolve_device(config.device))  # the teachers in process go where the student goes
    hosts = [host_from_module(model, task, name=type(model).__name__, label_counts=c, client=k, device=device)
             for k, (model, c) in enumerate(zip(teachers, counts))]
    source = _ModulesAsTeachers(hosts, _eval_data(eval_data, task))
    out.mkdir(parents=True, exist_ok=True)
    card = out / "task.toml"
    card.write_text(task.to_toml())
    config = replace(config, task=str(card))
    summary = coordinate(config, out, source, resume=resume, observer=observer)
    assert source.student is not None  # coordinate calls finish() with the result
    return Distilled(source.student.eval(), summary, out, task)


def serve(model: nn.Module | torch.export.ExportedProgram, task: Task | str | Path, *, connect: str,
          token_file: str | Path | None = None,
          ca: str | Path | None = None, label_counts: Sequence[int] | None = None, session: str = "",
          insecure: bool = False, **host: Any) -> dict[str, int]:
    """Serve ``model`` to the coordinator's hub at ``connect`` until the session ends (as ``fedkd teacher``);
    returns what was released. ``host``: the host's limits and release policy (``access``, ``privacy`` a
    :class:`~fedkd.institution.privacy.policy.PrivacySettings`, ``ledger``, ``max_batch``, ``device``) and
    ``eval_data`` (held-out labelled images of the institution's own, an ImageFolder of the task: the final
    student is evaluated on them and only the counts are released, through the policy)."""
    from fedkd.client.agent import AgentSettings, ClientTLS, TeacherAgent
    from fedkd.client.cli import host_from_module
    from fedkd.tls import read_certificates

    task = task if isinstance(task, Task) else Task.from_toml(task)
    token = Path(token_file).read_text().strip() if token_file else None
    tls = None if insecure else ClientTLS(read_certificates(str(ca), "CA certificate (ca)") if ca else None, None,
                                          None)
    teacher = host_from_module(model, task, name=type(model).__name__, label_counts=label_counts, **host)
    return TeacherAgent(teacher, AgentSettings(target=connect, token=token, tls=tls, session=session)).serve()


def _key(name: str) -> str:
    """A keyword as a config key: ``student_lr`` -> ``student-lr``; a method's option ``cudfkd_weight_bn`` ->
    ``cudfkd.weight-bn``."""
    from fedkd.config import coordinator_registries

    methods, _ = coordinator_registries()
    for method in methods:
        if name.startswith(method + "_"):
            return f"{method}.{name[len(method) + 1:].replace('_', '-')}"
    return name.replace("_", "-")


def load_student(run: str | Path, *, trust_code: bool = False) -> nn.Module:
    """The distilled student of a run directory (or its ``student.pt``) as an ``nn.Module`` of its architecture,
    in eval mode: to fine-tune or inspect it in Python. To deploy it without fedkd, load ``student.pt2`` with
    ``torch.export.load(path).module()`` instead; ``student.json`` says what it takes and returns.

    A student of your own code (``student-model=PACKAGE.MODULE:CALLABLE``) is rebuilt by importing that code,
    which a file must not make fedkd do on its own: pass ``trust_code=True`` for a run of yours."""
    from fedkd.institution.loading import load_teacher  # the student is kept in the teacher checkpoint format

    path = Path(run)
    file = path / "student.pt" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{str(file)!r} does not exist; give a run directory fedkd wrote (it holds "
                                "student.pt once the run has finished) or the student.pt itself")
    student, _ = load_teacher(file, trust_code=trust_code)
    return student
