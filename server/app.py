"""The coordinator's Flower ServerApp: train round, hub, distillation, evaluation, summary.

1. Wait (``nodes-timeout``) for the ``num-clients`` nodes the run needs.
2. Train round: each node trains (or loads) its teacher on its private data
   and replies with local metrics; a node that fails is reported by id with
   its error, and the run goes on while a quorum (``quorum``, 0 = majority)
   of teachers remains.
3. Open the hub (TLS with a development CA made for the run, one token per
   node) and send each node a ``query.serve`` message with the hub's address,
   its token and the CA certificate: the ClientApps connect their teachers.
4. Distil with the configured method through the hub (the queries travel on
   fedkd's gRPC stream, not as Flower messages: a Flower round trip costs
   seconds in a deployment), evaluating on the coordinator's own test set
   when ``evaluation`` includes it.
5. End the session; each node replies with what it released.
6. Federated evaluation (``evaluation`` = federated or both): the student's
   weights go to every node in an ``evaluate`` message; each evaluates on its
   own held-out data; the accuracies are averaged weighted by example count.
7. Write the run directory (``run-dir``/run-<run id>: config.json,
   metrics.jsonl, checkpoint.pt, student.pt, plots/, summary.json) as
   ``fedkd run`` does, with a ``flower`` section naming every node.

Steps 3-7 are the coordinator's one flow (:func:`fedkd.coordinator.flow.coordinate`,
shared with ``fedkd run`` and ``fedkd distill``); the nodes are its teachers.
A run that dies continues from its run directory with ``--run-config
'resume-from="runs/flower/run-<id>"'``: the nodes reload their teachers, and
only the epoch in progress is repeated.

Anything that stops the run raises :class:`FlowerRunError` with the reason, so
Flower records the run as failed.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from logging import ERROR, INFO, WARNING
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from torch import nn

from fedkd.config import FOLLOW_FEDERATION, RunConfig, config_from_run_config
from fedkd.coordinator.distillation import Distillation, RunObserver, epoch_line
from fedkd.coordinator.flow import Session, coordinate, coordinator_test_data, refuse_code_student
from fedkd.coordinator.settings import FlowerSettings
from fedkd.tls import run_pki

from .credentials import ServerTLS, issue_tokens
from .hub import Hub

app = ServerApp()

POLL = 0.5  # seconds between looks at the grid while waiting
SETTLE = 3.0  # seconds the node count must hold still before num-clients=0 takes it
SERVE_REPLY_TIMEOUT = 120.0  # seconds for the nodes to report after the session ended
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class FlowerRunError(RuntimeError):
    """The run cannot go on; the message says why (and which nodes failed)."""


@dataclass
class NodeRecord:
    node_id: int
    client: int
    status: str = "ok"  # ok | failed
    error: str | None = None
    failed_at: str | None = None  # train | serve | evaluate
    train: dict[str, Any] = field(default_factory=dict)
    served: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)

    def fail(self, stage: str, reason: str) -> None:
        self.status, self.error, self.failed_at = "failed", reason, stage
        log(ERROR, "node %d (client %d) failed in %s: %s", self.node_id, self.client, stage, reason)


class _Log:
    """Progress into Flower's log (shown by ``flwr run --stream``)."""

    def stage(self, message: str) -> None:
        log(INFO, "[fedkd] %s", message)

    def epoch_started(self, epoch: int, total_steps: int) -> None:
        pass

    def step(self) -> None:
        pass

    def __init__(self, epochs: int | None = None) -> None:
        self.epochs = epochs

    def epoch_finished(self, record: dict[str, Any]) -> None:
        log(INFO, "[fedkd] %s", epoch_line(record, self.epochs))


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_config = dict(context.run_config)
    counted = None
    if run_config.get("num-clients") == FOLLOW_FEDERATION:
        timeout = float(run_config.get("nodes-timeout", FlowerSettings().nodes_timeout))  # type: ignore[arg-type]
        counted = federation_size(grid, timeout)
        log(INFO, "[fedkd] num-clients=0: the federation has %d nodes, one client each", counted)
    config = config_from_run_config(run_config, num_clients=counted)
    refuse_code_student(config, "the Flower app")
    if config.flower.resume_from:  # a run that died: continue it in its own run directory
        run_dir = Path(config.flower.resume_from).expanduser().resolve()
        log(INFO, "[fedkd] resuming the run in %s", run_dir)
    else:
        run_dir = Path(config.flower.run_dir).expanduser().resolve() / f"run-{context.run_id}"
    FederatedDistillation(grid, config, run_dir, run_id=context.run_id, resumed=bool(config.flower.resume_from)).run()


def federation_size(grid: Grid, timeout: float, settle: float = SETTLE) -> int:
    """How many nodes the federation has: the count once at least one node is connected and the count has not
    changed for ``settle`` seconds (a simulation registers its nodes at start-up); FlowerRunError when no node
    connects within ``timeout``."""
    deadline = time.monotonic() + timeout
    count, since = 0, time.monotonic()
    while True:
        now = len(list(grid.get_node_ids()))
        if now != count:
            count, since = now, time.monotonic()
        if count and time.monotonic() - since >= settle:
            return count
        if time.monotonic() >= deadline:
            if count:
                return count
            raise FlowerRunError(f"no node connected within nodes-timeout={timeout:.0f} s; in a simulation pass "
                                 "--federation-config 'num-supernodes=N', in a deployment start the SuperNodes")
        time.sleep(POLL)


def wait_for_nodes(grid: Grid, count: int, timeout: float) -> list[int]:
    """The first ``count`` node ids (sorted) once that many are connected; FlowerRunError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= count:
            return nodes[:count]
        if time.monotonic() >= deadline:
            raise FlowerRunError(f"{len(nodes)} of the {count} nodes the run needs (num-clients) connected within "
                                 f"nodes-timeout={timeout:.0f} s; in a simulation pass --federation-config "
                                 f"'num-supernodes={count}', in a deployment start {count} SuperNodes")
        time.sleep(POLL)


def _replies(messages: list[Message]) -> dict[int, Message]:
    return {m.metadata.src_node_id: m for m in messages}


class FederatedDistillation:
    """The ServerApp's run: the Flower nodes are the teachers of the coordinator's one flow."""

    def __init__(self, grid: Grid, config: RunConfig, run_dir: Path, *, run_id: int, resumed: bool = False) -> None:
        self.grid, self.config, self.run_dir, self.run_id, self.resumed = grid, config, run_dir, run_id, resumed
        self.observer = _Log(config.epochs)
        self.nodes: dict[int, NodeRecord] = {}

    # Helpers ---------------------------------------------------------------------------------

    def _live(self) -> list[NodeRecord]:
        return [n for n in self.nodes.values() if n.status == "ok"]

    def _check_quorum(self, stage: str) -> None:
        need = self.config.queries.quorum_size(self.config.num_clients)
        if len(self._live()) < need:
            failed = "; ".join(f"node {n.node_id}: {n.error}" for n in self.nodes.values() if n.status != "ok")
            raise FlowerRunError(f"after {stage}, {len(self._live())} of {self.config.num_clients} nodes are left "
                                 f"and the run needs {need} (quorum). Failed: {failed}")

    def _message(self, node: NodeRecord, content: RecordDict, message_type: str, ttl: float) -> Message:
        return Message(content, dst_node_id=node.node_id, message_type=message_type, ttl=ttl)

    def _round(self, stage: str, contents: dict[int, RecordDict], message_type: str,
               timeout: float) -> dict[int, Message]:
        """Send one message to each listed node and wait; failures are recorded on the node."""
        messages = [self._message(self.nodes[nid], content, message_type, timeout) for nid, content in contents.items()]
        replies = _replies(list(self.grid.send_and_receive(messages, timeout=timeout)))
        ok = {}
        for nid in contents:
            reply = replies.get(nid)
            if reply is None:
                self.nodes[nid].fail(stage, f"no reply within {timeout:.0f} s")
            elif reply.has_error():
                self.nodes[nid].fail(stage, reply.error.reason or f"error code {reply.error.code}")
            else:
                ok[nid] = reply
        return ok

    # The run ------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """The coordinator's flow with these nodes as the teachers; a ``resumed`` run continues the one in
        ``run_dir`` from its last checkpoint (the nodes reload their teachers, and the epoch in progress is
        repeated)."""
        return coordinate(self.config, self.run_dir, self, resume=self.resumed, observer=self.observer)

    @contextmanager
    def session(self, run_dir: Path, device: torch.device, observer: RunObserver) -> Iterator[Session]:
        config = self.config
        observer.stage(f"run directory {run_dir}")
        observer.stage(f"waiting up to {config.flower.nodes_timeout:.0f} s for {config.num_clients} nodes")
        node_ids = wait_for_nodes(self.grid, config.num_clients, config.flower.nodes_timeout)
        self.nodes = {nid: NodeRecord(nid, k) for k, nid in enumerate(node_ids)}
        self._train_round()
        names = {n.node_id: f"node-{n.node_id}" for n in self._live()}  # in client order: the pool's order
        tokens = issue_tokens(run_dir / "tokens", list(names.values()))
        host = config.flower.hub_host
        pki = run_pki(run_dir / "tls", hosts=sorted({host, "localhost", "127.0.0.1"}))
        bind = "127.0.0.1" if host in LOOPBACK else "0.0.0.0"
        hub = Hub.for_run(dict(tokens), config, session=run_dir.name, address=f"{bind}:{config.flower.hub_port}",
                          tls=ServerTLS(pki.server_cert.read_bytes(), pki.server_key.read_bytes()))
        with hub:
            address = f"{host}:{hub.port}"
            observer.stage(f"hub on {address} (TLS, one token per node); asking the nodes to serve")
            ca = pki.ca_cert.read_bytes()
            serving = {}
            for nid, name in names.items():
                node = self.nodes[nid]
                content = RecordDict({"hub": ConfigRecord({
                    "address": address, "token": tokens[name], "ca": ca, "session": run_dir.name, "name": name,
                    "client": node.client, "num-clients": config.num_clients})})
                serving[nid] = self._message(node, content, "query.serve", config.flower.train_timeout)
            ids = dict(zip(serving, self.grid.push_messages(list(serving.values()))))
            early = self._await_teachers(hub, names, ids)
            node_of = {name: nid for nid, name in names.items()}
            for name in hub.never_connected():
                if self.nodes[node_of[name]].status == "ok":
                    self.nodes[node_of[name]].fail("serve", f"its teacher did not connect to the hub within "
                                                            f"nodes-timeout={config.flower.nodes_timeout:.0f} s")
            self._check_quorum("connecting the teachers")  # names every failed node, before the hub would
            hub.drop_absent()
            test = None
            if config.flower.evaluation in ("coordinator", "both"):
                if config.eval_data or not config.task:
                    observer.stage(f"loading {config.eval_data or config.dataset} (the coordinator's own labelled "
                                   "data)")
                test = coordinator_test_data(config)
            yield Session(hub.pool, "flower", test=test)
            hub.end_session()
            by_name = {s.name: s.report for s in hub.slots}
        for nid, reply in early.items():  # background servers: what they released, from their session report
            report = by_name.get(names[nid])
            if not reply.has_error() and "serving" in reply.content and report:
                self.nodes[nid].served = {k: v for k, v in report.items()
                                          if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self._collect_serve_replies(ids, early)

    def finish(self, result: Distillation, session: Session, observer: RunObserver) -> None:
        if self.config.flower.evaluation in ("federated", "both"):
            session.sections["federated_evaluation"] = self._federated_evaluation(result.student)
        nodes = sorted(self.nodes.values(), key=lambda n: n.client)
        session.sections["flower"] = {"run_id": self.run_id, "resumed": self.resumed,
                                      "nodes": [vars(n) for n in nodes],
                                      "failed": [n.node_id for n in nodes if n.status != "ok"]}

    def _train_round(self) -> None:
        """Each node trains (or loads) its teacher. A simulated node trains its partition's teacher, so it
        replies with the client it is (its partition) and the nodes are ordered by client, as `fedkd run`
        orders its clients."""
        config = self.config
        self.observer.stage(f"train round: {len(self.nodes)} nodes train or load their teachers")
        replies = self._round("train", {n.node_id: RecordDict({"train": ConfigRecord({
            "client": n.client, "num-clients": config.num_clients})}) for n in self._live()}, "train",
            config.flower.train_timeout)
        for nid, reply in replies.items():
            metrics = dict(reply.content["metrics"])
            self.nodes[nid].client = int(metrics.pop("client", self.nodes[nid].client))  # type: ignore[arg-type]
            self.nodes[nid].train = {**metrics, **dict(reply.content["teacher"])}
        clients = [n.client for n in self._live()]
        if len(set(clients)) != len(clients):
            raise FlowerRunError("two nodes are the same client: " + ", ".join(
                f"node {n.node_id}: client {n.client}" for n in self._live()))
        self.nodes = dict(sorted(self.nodes.items(), key=lambda item: item[1].client))
        self._check_quorum("the train round")

    def _await_teachers(self, hub: Hub, names: dict[int, str], ids: dict[int, str]) -> dict[int, Message]:
        """Wait until every serving node's teacher joined, or replied (a failure), or nodes-timeout passed."""
        deadline = time.monotonic() + self.config.flower.nodes_timeout
        early: dict[int, Message] = {}
        while time.monotonic() < deadline:
            for reply in self.grid.pull_messages([i for nid, i in ids.items() if nid not in early]):
                nid = reply.metadata.src_node_id
                early[nid] = reply
                if not reply.has_error() and "serving" in reply.content:
                    continue  # a simulated node serving from a background thread: its report comes via the hub
                reason = reply.error.reason if reply.has_error() else "it replied before the session started"
                self.nodes[nid].fail("serve", reason or "error")
            joined = {s.name for s in hub.live()}
            if all(names[nid] in joined or nid in early for nid in names):
                break
            time.sleep(POLL)
        return early

    def _collect_serve_replies(self, ids: dict[int, str], early: dict[int, Message]) -> None:
        pending = {i: nid for nid, i in ids.items() if nid not in early}
        deadline = time.monotonic() + SERVE_REPLY_TIMEOUT
        while pending and time.monotonic() < deadline:
            for reply in self.grid.pull_messages(list(pending)):
                nid = reply.metadata.src_node_id
                pending = {i: n for i, n in pending.items() if n != nid}
                if reply.has_error():
                    self.nodes[nid].fail("serve", reply.error.reason or "error")
                else:
                    self.nodes[nid].served = dict(reply.content["spent"])
            if pending:
                time.sleep(POLL)
        for nid in pending.values():
            log(WARNING, "node %d did not report what it released within %.0f s", nid, SERVE_REPLY_TIMEOUT)

    def _federated_evaluation(self, student: nn.Module) -> dict[str, Any]:
        arrays = ArrayRecord({k: v.detach().cpu() for k, v in student.state_dict().items()})
        targets = [n for n in self._live()]
        self.observer.stage(f"federated evaluation: the student goes to {len(targets)} nodes")
        replies = self._round("evaluate", {n.node_id: RecordDict({"student": arrays, "config": ConfigRecord({
                                                                      "client": n.client,
                                                                      "num-clients": self.config.num_clients})})
                                           for n in targets},
                              "evaluate", self.config.flower.train_timeout)
        rows: list[dict[str, Any]] = []
        for nid, reply in replies.items():
            metrics = dict(reply.content["metrics"])
            self.nodes[nid].evaluation = metrics
            rows.append({"node_id": nid, **metrics})
        examples = [float(r["num-examples"]) for r in rows]  # 0: a node with nothing to evaluate on
        total = sum(examples)
        accuracy = (sum(float(r.get("accuracy", 0.0)) * n for r, n in zip(rows, examples)) / total) if total else None
        if accuracy is not None:
            self.observer.stage(f"federated evaluation: student accuracy {accuracy:.4f} on {total:.0f} examples "
                                f"held by {len(rows)} nodes")
        return {"student_accuracy": accuracy, "num_examples": total, "nodes": rows,
                "noised": any("epsilon" in r for r in rows)}
