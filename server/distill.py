"""``fedkd distill``: the coordinator alone, distilling from teachers that live elsewhere.

Opens the hub on ``--listen``, issues one token per teacher (``<run>/tokens``),
waits for the teachers to dial in, then runs the configured method with the
coordinator's own held-out data for evaluation, and writes the same run
directory and summary.json as ``fedkd run``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedkd.config import RunConfig
from fedkd.data import load_dataset
from fedkd.experiment import RunObserver, claim_run_dir, distill, finish_summary, setup
from server.hub import Hub, ServerTLS, issue_tokens


def teacher_names(count: int) -> list[str]:
    return [f"teacher-{k:03d}" for k in range(count)]


def run_distillation(config: RunConfig, run_dir: Path, *, listen: str, teachers: int, tls: ServerTLS | None,
                     token_dir: Path | None, wait: float, resume: bool, observer: RunObserver) -> dict[str, Any]:
    device = setup(config)
    token_dir = token_dir or run_dir / "tokens"
    names = teacher_names(teachers)
    mtls = tls is not None and tls.client_ca is not None
    with claim_run_dir(config, run_dir, resume=resume) as saved_state:
        tokens: dict[str, str | None] = dict(issue_tokens(token_dir, names)) if not mtls else dict.fromkeys(names)
        session = run_dir.resolve().name
        hub = Hub.for_run(tokens, config, session=session, address=listen, tls=tls)
        with hub:
            how = "client certificates" if mtls else f"the tokens in {token_dir}"
            observer.stage(f"hub listening on {listen.rsplit(':', 1)[0]}:{hub.port} ({'TLS' if tls else 'PLAINTEXT'}), "
                           f"session {session!r}; waiting up to {wait:.0f} s for {teachers} teachers with {how}")
            hub.wait_for_teachers(timeout=wait)
            refused = hub.refusals()
            hub.drop_absent()
            observer.stage(f"{len(hub.slots)} teachers connected"
                           + (f" ({len(refused)} refused: {'; '.join(f'{n}: {r}' for n, r in refused.items())})"
                              if refused else "") + f"; loading {config.dataset} for evaluation")
            split = load_dataset(config.dataset, config.data_root, seed=config.seed)
            summary = distill(config, hub.pool, split.spec, split.test, run_dir, device=device,
                              saved_state=saved_state, observer=observer)
            summary["transport"] = "grpc"
            reports = hub.end_session()
    return finish_summary(summary, reports, run_dir)
