"""An in-process Flower Grid: the real ServerApp and ClientApp objects, no SuperLink and no Ray.

Flower ships no testing helpers. A ClientApp is callable as ``app(message,
context)``; this Grid delivers each pushed message to the app in a worker
thread with that node's persistent Context (as a SuperNode would), so a
``query.serve`` message can block while the ServerApp goes on, exactly as in
a run. Errors raised by the app come back as error replies, as Flower's
runtime sends them.
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import traceback
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from fedkd.config import RunConfig

SERVER_NODE_ID = 0
CLIENT_APP_EXCEPTION = 1  # the code Flower's runtime uses for an exception in a ClientApp


class InProcessGrid(Grid):
    def __init__(self, client_app: ClientApp, node_configs: list[Mapping[str, Any]],
                 run_config: Mapping[str, Any], *, run_id: int = 1, first_node_id: int = 101,
                 hidden: Iterable[int] = ()) -> None:
        # Recent flwr refuses to build a Message outside a runtime unless a task identity is set.
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, SERVER_NODE_ID, 1
        self.app = client_app
        self.run_id = run_id
        self.contexts = {first_node_id + i: Context(run_id=run_id, node_id=first_node_id + i,
                                                    node_config=dict(cfg), state=RecordDict(),
                                                    run_config=dict(run_config))
                         for i, cfg in enumerate(node_configs)}
        self.hidden = set(hidden)  # node ids that are registered but never answer (a vanished node)
        self._pool = cf.ThreadPoolExecutor(max_workers=max(4, 2 * len(node_configs)))
        self._futures: dict[str, cf.Future[Message]] = {}
        self.sent: list[Message] = []
        self._ids = itertools.count()

    # Grid API ----------------------------------------------------------------------------------

    def set_run(self, run_id: int) -> None:
        self.run_id = run_id

    @property
    def run(self) -> Any:
        raise NotImplementedError("the in-process grid has no Run object")

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            mid = f"{next(self._ids)}-{uuid.uuid4().hex[:8]}"
            msg.metadata.__dict__["_message_id"] = mid  # the SuperLink sets it in a real run
            self.sent.append(msg)
            if msg.metadata.dst_node_id not in self.hidden:
                self._futures[mid] = self._pool.submit(self._deliver, msg)
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        out = []
        for mid in list(message_ids):
            future = self._futures.get(mid)
            if future is not None and future.done():
                out.append(future.result())
                del self._futures[mid]
        return out

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        ids = list(self.push_messages(messages))
        futures = [self._futures[i] for i in ids if i in self._futures]
        cf.wait(futures, timeout=timeout)
        return self.pull_messages(ids)

    # Delivery ----------------------------------------------------------------------------------

    def _deliver(self, msg: Message) -> Message:
        context = self.contexts[msg.metadata.dst_node_id]
        try:
            return self.app(msg, context)
        except Exception as exc:  # what Flower's runtime turns into an error reply
            reason = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
            return Message(Error(code=CLIENT_APP_EXCEPTION, reason=reason), reply_to=msg)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def app_run_config(run_dir: Path, base: Mapping[str, Any], **changes: object) -> dict[str, object]:
    """The run config as Flower hands it to the apps: every key at its default, then ``base``, ``run-dir`` and
    ``changes`` (``snake_case`` names become keys)."""
    cfg: dict[str, object] = {k: ("auto" if v is None else v) for k, v in RunConfig().to_dict().items()}
    cfg.update(base)
    cfg["run-dir"] = str(run_dir)
    cfg.update({k.replace("_", "-"): v for k, v in changes.items()})
    return cfg
