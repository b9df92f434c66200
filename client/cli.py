"""``fedkd teacher``: serve a teacher (a checkpoint fedkd trained, or the institution's own model) to a hub.

    fedkd teacher --checkpoint teacher.pt --connect hub.example.org:50051 \\
                  --token-file teacher-00.token --ca ca.pem
    fedkd teacher --model torchvision:resnet18 --model-args '{"num_classes": 7}' --weights derm.pt \\
                  --task task.toml --connect hub.example.org:50051 --token-file teacher-00.token --ca ca.pem

The agent dials out (no inbound port is opened), answers queries until the
coordinator ends the session, and prints what it released.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedkd.checkpoint import CheckpointError
from fedkd.codec import MiB
from fedkd.contract import ACCESS_MODES, ALL_ACCESS_MODES
from fedkd.data import ImageData, count_image_folder
from fedkd.institution.classifier import ModelError, as_classifier, dry_forward, load_classifier, parse_model_args
from fedkd.institution.density import WithDensity, density_of
from fedkd.institution.host import TeacherHost, describe_checkpoint
from fedkd.institution.loading import load_teacher
from fedkd.institution.privacy.ledger import ledger_path
from fedkd.institution.privacy.policy import PrivacySettings, ReleasePolicy
from fedkd.institution.terms import attach_class_statistics, class_statistics_of
from fedkd.options import resolve_device
from fedkd.task import Task
from fedkd.tls import read_certificates, read_private_key

from .agent import AgentError, AgentSettings, ClientTLS, SessionAborted, TeacherAgent
from .flags import LOG_FORMAT, privacy_from_args, teacher_parser


def host_from_checkpoint(path: str | Path, *, max_batch: int = 1024, access: Sequence[str] = ACCESS_MODES,
                         share_label_counts: bool = True, client: int = 0, device: str = "cpu",
                         privacy: PrivacySettings | None = None, ledger: str | Path | None = None,
                         eval_data: str | Path | None = None, class_statistics: bool = False) -> TeacherHost:
    """A host for the teacher in a ``fedkd.teacher.v1`` checkpoint, with the client's own limits and release
    policy (``privacy``; its ledger kept at ``ledger``, default ``teacher.ledger.json`` beside ``teacher.pt``);
    with ``eval_data`` (an ImageFolder whose class folders are named 0, 1, ...) it evaluates the final student.
    With ``class_statistics`` it releases the class-feature-statistics term on the per-class statistics the
    checkpoint holds."""
    model, ckpt = load_teacher(path, class_statistics=class_statistics)
    settings = privacy or PrivacySettings(share_label_counts=share_label_counts)
    policy = ReleasePolicy(settings, num_records=int(ckpt["num_samples"]), training=ckpt.get("privacy"),
                           ledger_path=ledger or ledger_path(path))
    description = describe_checkpoint(ckpt, model, client=client, share_label_counts=settings.share_label_counts,
                                      access_modes=_granted(access), policy=policy)
    evaluation = checkpoint_task(ckpt).load_images(eval_data) if eval_data else None
    return TeacherHost(model, description, max_batch=max_batch, device=device, policy=policy, evaluation=evaluation)


def checkpoint_task(ckpt: Mapping[str, Any]) -> Task:
    """The task a fedkd checkpoint's teacher serves: its classes (named by index), input shape and normalisation."""
    return Task(tuple(str(c) for c in range(int(ckpt["num_classes"]))), tuple(ckpt["input_shape"]),
                tuple(ckpt["mean"]), tuple(ckpt["std"]), "checkpoint")


def _granted(access: Sequence[str]) -> tuple[str, ...]:
    """The access modes a client grants, checked (``--access``)."""
    unknown = set(access) - set(ALL_ACCESS_MODES)
    if unknown or not access:
        raise ValueError(f"--access: {sorted(unknown) or 'nothing'} given; choose from {', '.join(ALL_ACCESS_MODES)}")
    if "gradient" in access and "logits" not in access:
        raise ValueError("--access: gradient needs logits too (a Backward follows the Forward it differentiates)")
    return tuple(a for a in ALL_ACCESS_MODES if a in access)


def host_from_model(spec: str, task: Task, *, weights: str | Path | None = None,
                    model_args: Mapping[str, Any] | None = None, ledger: str | Path | None = None,
                    unknown_output: bool = False, **host: Any) -> TeacherHost:
    """A host for the institution's own classifier (``spec``: see :mod:`fedkd.institution.classifier`) on
    ``task``; ``host`` as :func:`host_from_module` takes it. The ledger is kept beside the weights (or the
    exported program) unless ``ledger`` says where."""
    model = load_classifier(spec, task, weights=weights, model_args=model_args, unknown_output=unknown_output)
    source = Path(weights) if weights is not None else Path(spec)
    return host_from_module(model, task, name=Path(spec).name if spec.endswith(".pt2") else spec,
                            ledger=ledger or ledger_path(source), checked=True, unknown_output=unknown_output, **host)


def parse_label_counts(text: str | None, task: Task, what: str = "--label-counts") -> list[int] | None:
    """Label counts as an institution gives them: comma-separated counts, or the training data's ImageFolder
    directory (counted); None when not given (not shared)."""
    if not text:
        return None
    if Path(text).is_dir():
        return count_image_folder(text, task.classes)
    try:
        return [int(c) for c in text.split(",")]
    except ValueError:
        raise ValueError(f"{what}: {text!r} is neither a comma-separated list of counts nor an ImageFolder "
                         "directory") from None


def host_from_module(given: nn.Module | torch.export.ExportedProgram, task: Task, *, name: str,
                     label_counts: Sequence[int] | None = None,
                     max_batch: int = 1024, access: Sequence[str] = ACCESS_MODES, client: int = 0,
                     device: str = "cpu", privacy: PrivacySettings | None = None,
                     ledger: str | Path | None = None, checked: bool = False,
                     eval_data: str | Path | ImageData | None = None, unknown_output: bool = False,
                     density_data: str | Path | ImageData | None = None,
                     class_statistics_data: str | Path | ImageData | None = None) -> TeacherHost:
    """A host for a classifier the institution holds as an ``nn.Module`` (checked against the task with a dry
    forward unless ``checked``), with its own limits and release policy. Label counts are shared only when given
    (and as the policy releases them); a DP-SGD or PATE guarantee is claimed only for teachers fedkd trained
    (``--checkpoint``). With ``eval_data`` (the task's ImageFolder, or images already loaded) the institution
    evaluates the final student on it and releases the counts through its policy. With ``unknown_output`` the
    model answers one logit more than the task has classes, last "unknown" (an open-set model). With
    ``density_data`` (the institution's own images, an ImageFolder of the task, or images already loaded) the host
    fits their density and answers each input's log-density as one output more (``teacher-density``,
    :mod:`fedkd.institution.density`): the coordinator weighs its answers by the posterior of who knows the
    input. With ``class_statistics_data`` (the institution's own labelled images) the host computes the per-class
    statistics of the model's BatchNorm layers on them and releases the class-feature-statistics term."""
    model = as_classifier(given)  # eval mode (an exported program's module keeps its own)
    if not checked:
        dry_forward(model, task, f"the model {name!r}", unknown_output=unknown_output)
    if class_statistics_data is not None:
        own = (task.load_images(class_statistics_data) if isinstance(class_statistics_data, (str, Path))
               else class_statistics_data)
        try:
            attach_class_statistics(model, class_statistics_of(model, own, task.spec), task.num_classes)
        except ValueError as exc:
            raise ModelError(f"--class-statistics-data: {exc}") from None
    density = None
    if density_data is not None:
        if unknown_output:
            raise ModelError("--density-data and --unknown-output both add the answers' one extra output (a "
                             "log-density, 'unknown'); choose one")
        own = task.load_images(density_data) if isinstance(density_data, (str, Path)) else density_data
        try:
            density = density_of(own, task.spec)
        except ValueError as exc:
            raise ModelError(f"--density-data: {exc}") from None
        model = WithDensity(model, density).eval()
    settings = privacy or PrivacySettings(share_label_counts=label_counts is not None)
    if settings.mode in ("dp-sgd", "pate"):
        raise ModelError(f"--privacy-mode {settings.mode}: fedkd claims that guarantee only for a teacher it trained "
                         "(fedkd train-teacher, then --checkpoint); serve your own model with output-noise or none")
    counts = [int(c) for c in label_counts] if label_counts is not None else None
    if counts is not None and (len(counts) != task.num_classes or any(c < 0 for c in counts)):
        raise ModelError(f"--label-counts: {len(counts)} counts for {task.num_classes} classes; give one count per "
                         "class of the task, in its order, each >= 0")
    records = sum(counts) if counts else 0
    if settings.mode != "none" and not settings.delta and not records:
        raise ModelError("--delta: give the delta of the guarantee (its default, 1 / (10 n), needs the number of "
                         "records n: give --label-counts)")
    policy = ReleasePolicy(settings, num_records=max(records, 1), ledger_path=ledger)
    card = {"model": name, "num_classes": task.num_classes, "input_shape": list(task.input_shape),
            "mean": list(task.mean), "std": list(task.std), "label_counts": counts or [0] * task.num_classes,
            "num_samples": records, "privacy": None, "unknown_output": unknown_output}
    if density is not None:
        card["density"] = density.to_state()
    description = describe_checkpoint(card, model, client=client,
                                      share_label_counts=settings.share_label_counts and counts is not None,
                                      access_modes=_granted(access), policy=policy)
    if counts is None:
        description = dataclasses.replace(description, num_samples=None)
    evaluation = task.load_images(eval_data) if isinstance(eval_data, (str, Path)) else eval_data
    return TeacherHost(model, description, max_batch=max_batch, device=device, policy=policy, evaluation=evaluation)


def _read(path: str | None, what: str) -> bytes | None:
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} {str(p)!r} does not exist")
    return p.read_bytes()


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Serve until the hub ends the session; returns what was released."""
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    if args.insecure and (args.ca or args.cert):
        raise ValueError("--insecure cannot be combined with --ca or --cert")
    if bool(args.cert) != bool(args.key):
        raise ValueError("--cert and --key go together")
    token = None
    if args.token_file:
        raw = _read(args.token_file, "token file") or b""
        try:
            token = raw.decode("ascii").strip()
        except UnicodeDecodeError:
            raise ValueError(f"token file {args.token_file!r} is not a token (not ASCII text); use the file the "
                             "coordinator issued") from None
        if not token:
            raise ValueError(f"token file {args.token_file!r} is empty")
    if token is None and not args.cert:
        raise ValueError("give --token-file (or --cert/--key for mutual TLS)")
    tls = None if args.insecure else ClientTLS(
        read_certificates(args.ca, "CA certificate (--ca)") if args.ca else None,
        read_certificates(args.cert, "certificate (--cert)") if args.cert else None,
        read_private_key(args.key, "key (--key)") if args.key else None)
    privacy = privacy_from_args(args)
    host = _host(args, privacy)
    settings = AgentSettings(target=args.connect, token=token, tls=tls, session=args.session, name=args.name,
                             max_message_bytes=int(args.max_message_mb * MiB), give_up_after=args.give_up_after,
                             server_name=args.server_name)
    agent = TeacherAgent(host, settings)
    signal.signal(signal.SIGTERM, lambda *_: agent.stop())
    return agent.serve()


def _host(args: argparse.Namespace, privacy: PrivacySettings) -> TeacherHost:
    """The host of ``--checkpoint``, or of ``--model`` on ``--task``."""
    if bool(args.checkpoint) == bool(args.model):
        raise ValueError("give --checkpoint (a teacher fedkd trained) or --model with --task and --weights (your own)")
    access = args.access.split(",")
    if (args.class_statistics or args.class_statistics_data) and privacy is not None and privacy.mode != "none":
        flag = "--class-statistics" if args.class_statistics else "--class-statistics-data"
        raise ValueError(f"{flag}: privacy-mode {privacy.mode} releases no teacher-side term (the class statistics "
                         "are computed on the raw images, outside its guarantee); serve them with privacy-mode none, "
                         "or leave the flag out")
    if args.class_statistics and not args.checkpoint:
        raise ValueError("--class-statistics goes with --checkpoint (the statistics it holds); for your own --model "
                         "give --class-statistics-data DIR")
    if args.checkpoint:
        for flag in ("task", "weights", "model_args", "label_counts", "unknown_output", "density_data",
                     "class_statistics_data"):
            if getattr(args, flag):
                raise ValueError(f"--{flag.replace('_', '-')} goes with --model; a checkpoint carries its own")
        return host_from_checkpoint(args.checkpoint, max_batch=args.max_batch, access=access,
                                    device=str(resolve_device(args.device)),
                                    privacy=privacy, ledger=args.ledger, eval_data=args.eval_data,
                                    class_statistics=args.class_statistics)
    if not args.task:
        raise ValueError("--model needs --task: the task card of the run (classes, input-shape, mean, std)")
    task = Task.from_toml(args.task)
    return host_from_model(args.model, task, weights=args.weights,
                           model_args=parse_model_args(args.model_args),
                           label_counts=parse_label_counts(args.label_counts, task),
                           max_batch=args.max_batch, access=access, device=str(resolve_device(args.device)),
                           privacy=privacy, ledger=args.ledger, eval_data=args.eval_data,
                           unknown_output=args.unknown_output, density_data=args.density_data,
                           class_statistics_data=args.class_statistics_data)


def main(argv: Sequence[str] | None = None) -> int:
    return command(teacher_parser().parse_args(argv))


def command(args: argparse.Namespace) -> int:
    level = logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(level=level, format=LOG_FORMAT)
    # Opacus configures the root logger when it is imported (at WARNING), which would silence the agent's status
    # lines: the level is the command's whoever configured it first (fedkd's entry point does so before importing)
    logging.getLogger().setLevel(level)
    try:
        spent = run(args)
    except SessionAborted as exc:
        print(f"fedkd teacher: {exc}", file=sys.stderr)
        print(json.dumps({"released": exc.released, "aborted": exc.reason}), flush=True)
        return 1
    except (AgentError, CheckpointError, ValueError, FileNotFoundError) as exc:
        print(f"fedkd teacher: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    print(json.dumps({"released": spent}), flush=True)
    return 0
