"""``fedkd distill``: the coordinator alone, distilling from teachers that live elsewhere.

Opens the hub on ``--listen``, issues one token per teacher (``<run>/tokens``),
waits for the teachers to dial in, then runs the coordinator's flow
(:func:`fedkd.coordinator.flow.coordinate`) with the coordinator's own held-out data
for evaluation, and writes the same run directory and summary.json as ``fedkd run``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from fedkd.config import RunConfig
from fedkd.coordinator.distillation import Distillation, RunObserver
from fedkd.coordinator.flow import Session, coordinate, coordinator_test_data

from .credentials import ServerTLS, issue_tokens
from .hub import Hub


def teacher_names(count: int) -> list[str]:
    return [f"teacher-{k:03d}" for k in range(count)]


class DialingTeachers:
    """Teachers that dial in to the coordinator's hub, each with its token (or its client certificate)."""

    def __init__(self, config: RunConfig, *, listen: str, teachers: int, tls: ServerTLS | None,
                 token_dir: Path | None, wait: float) -> None:
        self.config, self.listen, self.count, self.tls = config, listen, teachers, tls
        self.token_dir, self.wait = token_dir, wait

    @contextmanager
    def session(self, run_dir: Path, device: torch.device, observer: RunObserver) -> Iterator[Session]:
        config, tls = self.config, self.tls
        token_dir = self.token_dir or run_dir / "tokens"
        names = teacher_names(self.count)
        mtls = tls is not None and tls.client_ca is not None
        tokens: dict[str, str | None] = dict(issue_tokens(token_dir, names)) if not mtls else dict.fromkeys(names)
        session = run_dir.resolve().name
        with Hub.for_run(tokens, config, session=session, address=self.listen, tls=tls) as hub:
            how = "client certificates" if mtls else f"the tokens in {token_dir}"
            observer.stage(f"hub listening on {self.listen.rsplit(':', 1)[0]}:{hub.port} "
                           f"({'TLS' if tls else 'PLAINTEXT'}), session {session!r}; waiting up to {self.wait:.0f} s "
                           f"for {self.count} teachers with {how}")
            hub.wait_for_teachers(timeout=self.wait)
            refused = hub.refusals()
            hub.drop_absent()
            observer.stage(f"{len(hub.slots)} teachers connected"
                           + (f" ({len(refused)} refused: {'; '.join(f'{n}: {r}' for n, r in refused.items())})"
                              if refused else "")
                           + (f"; evaluating on {config.eval_data}" if config.eval_data else
                              f"; loading {config.dataset} for evaluation" if not config.task else
                              "; no labelled data at the coordinator (task card): the student's accuracy is not "
                              "measured here"))
            test = coordinator_test_data(config)
            yield Session(hub.pool, "grpc", test=test)
            hub.end_session()

    def finish(self, result: Distillation, session: Session, observer: RunObserver) -> None:
        pass


def run_distillation(config: RunConfig, run_dir: Path, *, listen: str, teachers: int, tls: ServerTLS | None,
                     token_dir: Path | None, wait: float, resume: bool, observer: RunObserver) -> dict[str, Any]:
    source = DialingTeachers(config, listen=listen, teachers=teachers, tls=tls, token_dir=token_dir, wait=wait)
    return coordinate(config, run_dir, source, resume=resume, observer=observer)
