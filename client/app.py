"""The institution's Flower ClientApp: train (or load) the teacher, serve it to the hub, evaluate the student.

Messages (the ServerApp in ``server/app.py`` sends them):

- ``train``: config ``client`` (this node's index in the run; a simulated node is its partition). Trains the
  teacher on the node's private data only (DP-SGD when the node's
  ``privacy-mode`` is dp-sgd; in a deployment from its node config only), or
  loads it from the node's ``teacher-ckpt``; the checkpoint stays on the node.
  Replies with the client it is, and local metrics (without DP) or the privacy spent (with DP).
- ``query.serve``: config ``address``, ``token``, ``ca`` (the hub's CA
  certificate, PEM), ``session``, ``name``, ``client``. Connects the teacher
  to the coordinator's hub and answers queries until the coordinator ends
  the session; replies with what it released.
- ``evaluate``: arrays ``student`` (the distilled student's weights), config
  ``client``. Evaluates it on the node's held-out data; replies with accuracy
  and the example count (under a privacy mode: Gaussian-noised and accounted
  in the node's ledger, refused past its budget).

Failures the node can name (bad node config, missing data, a refused
connection) come back as an error reply whose reason says what is wrong; the
ServerApp reports it with the node id.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedkd.checkpoint import CheckpointError
from fedkd.codec import MiB
from fedkd.config import RunConfig, config_from_run_config
from fedkd.contract import access_modes
from fedkd.data import DatasetNotFoundError
from fedkd.institution.host import load_error
from fedkd.institution.loading import load_teacher
from fedkd.institution.privacy.ledger import ledger_path
from fedkd.institution.privacy.policy import ReleasePolicy
from fedkd.models import build_classifier, is_code_spec
from fedkd.options import ConfigError

from .agent import AgentError, AgentSettings, ClientTLS, TeacherAgent
from .cli import host_from_checkpoint
from .node import (
    NodeConfigError,
    count_correct,
    ensure_teacher,
    node_data,
    node_privacy,
    own_model,
    own_model_host,
    teacher_path,
)

logger = logging.getLogger(__name__)

app = ClientApp()

# An error reply's code: the node could not do what was asked, for the reason given.
NODE_ERROR = 1000
# Errors a node reports as such (the reason is meant for the operator); anything else is a bug
# and propagates, so Flower reports it with its traceback.
EXPECTED = (ConfigError, NodeConfigError, CheckpointError, DatasetNotFoundError, AgentError, FileNotFoundError,
            ValueError, KeyError)


def _run_config(context: Context, settings: Any = None) -> RunConfig:
    """The run's config; ``num-clients`` 0 (follow the federation) is the number the ServerApp counted and sent
    in the message's ``settings`` record."""
    counted = settings.get("num-clients") if settings is not None else None
    # an institution reads the run-wide keys; the method, its options and the ensemble rule are the coordinator's
    return config_from_run_config(dict(context.run_config), num_clients=int(counted) if counted else None,
                                  resolve=False)


def _threads(context: Context) -> None:
    """One torch thread per ClientApp in a simulation (all clients share the machine), else the node's say."""
    threads = int(context.node_config.get("num-threads", 1 if "partition-id" in context.node_config else 0))
    if threads:
        torch.set_num_threads(threads)


def _handle(name: str, body: Callable[[Message, Context], RecordDict]) -> Callable[[Message, Context], Message]:
    def handler(msg: Message, context: Context) -> Message:
        try:
            _threads(context)
            return Message(body(msg, context), reply_to=msg)
        except EXPECTED as exc:
            reason = f"{name} failed on node {context.node_id}: {type(exc).__name__}: {exc}"
            logger.error(reason)
            return Message(Error(code=NODE_ERROR, reason=reason), reply_to=msg)

    handler.__name__ = name
    return handler


def _client(asked: Any, context: Context) -> int:
    """The client this node is: in a simulation its partition (the data it holds, and the client `fedkd run`
    trains on that partition), in a deployment the index the coordinator gave it."""
    if "partition-id" in context.node_config:
        return int(context.node_config["partition-id"])
    return int(asked)


def _train(msg: Message, context: Context) -> RecordDict:
    client = _client(msg.content["train"]["client"], context)
    settings, config = node_privacy(_run_config(context, msg.content["train"]), context.node_config, client)
    own = own_model(context.node_config)
    if own is not None:  # the institution's own classifier: nothing to train, checked now so errors come early
        started = time.perf_counter()
        host = own_model_host(own, config, settings, client)
        logger.info("serving the institution's own model %s on task %r", own.spec, own.task.name)
        return RecordDict({"metrics": MetricRecord({"client": client, "trained": 0,
                                                    "seconds": time.perf_counter() - started}),
                           "teacher": ConfigRecord({"model": host.description.model, "data": "own model"})})
    if config.task:
        raise NodeConfigError(f"the run has a task card ({config.task}): each institution serves its own model; "
                              "start this SuperNode with --node-config 'model=\"SPEC\" weights=\"FILE\" "
                              "task=\"CARD\"'")
    data = node_data(config, context.node_config)
    teacher = ensure_teacher(config, context.node_config, data, client)
    spec = data.spec
    metrics: dict[str, Any] = {"client": client, "trained": int(teacher.trained), "seconds": teacher.seconds}
    info: dict[str, Any] = {"model": str(teacher.checkpoint["model"]), "data": data.source}
    correct, total = count_correct(teacher.model, data.train, spec)
    held = count_correct(teacher.model, data.holdout, spec) if data.holdout is not None else (0, 0)
    logger.info("teacher %s: train accuracy %.4f on %d, held-out %.4f on %d (kept on this node)",
                teacher.path, correct / max(1, total), total, held[0] / max(1, held[1]), held[1])
    privacy = teacher.privacy
    if privacy is None:
        metrics.update({"num-examples": total, "train-accuracy": correct / max(1, total),
                        "holdout-examples": held[1], "holdout-accuracy": held[0] / max(1, held[1])})
    else:  # only what the guarantee covers leaves the node: the guarantee itself
        if privacy.get("mechanism") == "dp-sgd":
            metrics.update({"epsilon-spent": float(privacy["epsilon_spent"]), "delta": float(privacy["delta"]),
                            "noise-multiplier": float(privacy["noise_multiplier"]), "steps": int(privacy["steps"])})
        elif privacy.get("mechanism") == "pate":  # PATE's cost comes with its answers, not its training
            metrics["shard-teachers"] = int(privacy["teachers"])
        info["mechanism"] = str(privacy["mechanism"])
    return RecordDict({"metrics": MetricRecord(metrics), "teacher": ConfigRecord(info)})


def _serve(msg: Message, context: Context) -> RecordDict:
    hub = msg.content["hub"]
    client = _client(hub["client"], context)
    privacy, config = node_privacy(_run_config(context, hub), context.node_config, client)
    own = own_model(context.node_config)
    if own is not None:
        host = own_model_host(own, config, privacy, client)
        path = own.source
    else:
        path = teacher_path(config, context.node_config, client)
        if not path.exists():
            raise CheckpointError(f"no teacher at {str(path)!r}: the train round has not run on this node")
        host = host_from_checkpoint(path, max_batch=config.teachers.max_query_batch, client=client, privacy=privacy,
                                    access=access_modes(config.teacher_access_modes()[client]),
                                    class_statistics=config.teachers.class_statistics)
    ca = hub.get("ca")
    settings = AgentSettings(target=str(hub["address"]), token=str(hub["token"]),
                             tls=ClientTLS(bytes(ca)) if ca else None,  # type: ignore[arg-type]
                             session=str(hub["session"]), name=str(hub["name"]),
                             max_message_bytes=int(config.queries.max_message_mb * MiB),
                             give_up_after=max(config.queries.rejoin_timeout, 30.0),
                             server_name=str(hub["server-name"]) if hub.get("server-name") else None)
    logger.info("serving %s to the hub at %s", path, settings.target)
    agent = TeacherAgent(host, settings)
    if "partition-id" in context.node_config:
        # A simulation: serve from a thread of this (long-lived) simulation worker and reply at once, so the
        # node does not hold a simulation slot for the whole distillation and one worker process hosts many
        # clients' teachers, each with its own token, agent and ledger. What it released reaches the
        # coordinator in the session's end-of-session report. (A SuperNode runs each message in a process of
        # its own that ends with the reply: there the node serves in the foreground, as below.)
        name = str(hub["name"])
        threading.Thread(target=_serve_in_background, args=(agent, name), name=f"fedkd-serve-{name}",
                         daemon=True).start()
        return RecordDict({"serving": ConfigRecord({"background": 1, "name": name})})
    spent = agent.serve()
    metrics: dict[str, Any] = dict(spent)
    status = host.describe().privacy
    if status:  # the ledger's total: training, label counts, noisy answers, evaluations
        metrics["epsilon-spent"] = float(status["epsilon_spent"])
    return RecordDict({"spent": MetricRecord(metrics)})


def _serve_in_background(agent: TeacherAgent, name: str) -> None:
    try:
        spent = agent.serve()
        logger.info("%s: session ended; released %s", name, spent)
    except Exception:  # the coordinator sees the teacher leave (or never join) and names it
        logger.exception("%s: serving failed", name)


def _evaluate(msg: Message, context: Context) -> RecordDict:
    client = _client(msg.content["config"]["client"] if "config" in msg.content else 0, context)
    settings = msg.content["config"] if "config" in msg.content else None
    privacy, config = node_privacy(_run_config(context, settings), context.node_config, client)
    own = own_model(context.node_config)
    if own is not None:
        if own.eval_data is None:  # nothing to evaluate on: no examples, which the ServerApp weighs as none
            return RecordDict({"metrics": MetricRecord({"num-examples": 0})})
        spec, holdout = own.task.spec, own.task.load_images(own.eval_data)
    else:
        data = node_data(config, context.node_config)
        if data.holdout is None or len(data.holdout) == 0:
            raise NodeConfigError("this node has no held-out data for evaluation (add x_test, y_test to its "
                                  "data-path)")
        spec, holdout = data.spec, data.holdout
    if is_code_spec(config.student.model):  # the run config would name code for this node to import
        raise NodeConfigError(f"student-model {config.student.model!r} names code; this node imports none that a run "
                              "config names, so it evaluates only fedkd's own and torchvision students")
    student = build_classifier(config.student.model, num_classes=spec.num_classes, channels=spec.channels,
                               image_size=spec.side, args=config.student.arguments())
    arrays = msg.content["student"]
    try:
        student.load_state_dict(arrays.to_torch_state_dict())  # type: ignore[union-attr]
    except RuntimeError as exc:
        raise ValueError(f"the student's weights do not fit a {config.student.model!r}: {load_error(exc)}") from None
    correct, total = count_correct(student, holdout, spec)
    metrics: dict[str, Any]
    if privacy.mode == "none":
        metrics = {"accuracy": correct / total, "num-examples": total}
    else:  # a release on private data: through this node's policy and ledger (refused past its budget)
        if own is not None:
            path, ckpt_privacy = own.source, None
        else:
            path = teacher_path(config, context.node_config, client)
            ckpt_privacy = load_teacher(path)[1].get("privacy") if path.exists() else None
        policy = ReleasePolicy(privacy, num_records=total, training=ckpt_privacy, ledger_path=ledger_path(path))
        before = policy.ledger.spent
        noisy_correct, noisy_total = policy.evaluation_counts(correct, total)
        metrics = {"accuracy": noisy_correct / noisy_total, "num-examples": max(1, round(noisy_total)),
                   "epsilon": policy.ledger.spent - before, "delta": policy.ledger.delta,
                   "epsilon-total": policy.ledger.spent}
    return RecordDict({"metrics": MetricRecord(metrics)})


app.train()(_handle("train", _train))
app.query("serve")(_handle("serve", _serve))
app.evaluate()(_handle("evaluate", _evaluate))
