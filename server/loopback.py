"""``transport=grpc`` for a one-machine experiment: the real hub and real agent processes on loopback.

The experiment driver has trained each client's teacher and saved its
checkpoint; here each client's checkpoint is served by its own ``fedkd teacher``
process that dials the hub on 127.0.0.1 over TLS (a development CA in
``<run>/tls``) with its own token (``<run>/tokens``), exactly as an institution
would. Agent logs go to ``<run>/clients/client_NN/agent.log``.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from fedkd.client.flags import privacy_flags

from fedkd.config import RunConfig
from fedkd.contract import access_modes
from fedkd.coordinator.experiment import ClientTeacher
from fedkd.coordinator.pool import TeacherPool
from fedkd.tls import run_pki

from .credentials import ServerTLS, issue_tokens
from .hub import Hub

logger = logging.getLogger(__name__)

AGENT_START_TIMEOUT = 120.0


def client_name(client: int) -> str:
    return f"client-{client:03d}"


def agent_command(checkpoint: Path, port: int, token_file: Path, ca: Path, *, config: RunConfig, session: str,
                  device: torch.device, threads: int, access: str = "gradient", client: int = 0) -> list[str]:
    cmd = [sys.executable, "-m", "fedkd.client", "--checkpoint", str(checkpoint), "--connect", f"localhost:{port}",
           "--token-file", str(token_file), "--ca", str(ca), "--session", session,
           "--max-batch", str(config.teachers.max_query_batch),
           "--max-message-mb", str(config.queries.max_message_mb), "--device", device.type,
           "--num-threads", str(threads), "--give-up-after", str(config.queries.rejoin_timeout),
           "--access", ",".join(access_modes(access))]
    if config.teachers.class_statistics:  # (its checkpoint holds them: fedkd.institution.training computed them)
        cmd.append("--class-statistics")
    # one machine: the run config stands in for each client's own privacy settings
    return cmd + privacy_flags(config.privacy.for_client(client))


@contextmanager
def grpc_transport(clients: list[ClientTeacher], config: RunConfig, run_dir: Path,
                   device: torch.device) -> Iterator[TeacherPool]:
    names = [client_name(c.client) for c in clients]
    pki = run_pki(run_dir / "tls", hosts=["localhost", "127.0.0.1"])
    tokens = issue_tokens(run_dir / "tokens", names)
    session = run_dir.resolve().name
    hub = Hub.for_run(tokens, config, session=session, address="127.0.0.1:0",
                      tls=ServerTLS(pki.server_cert.read_bytes(), pki.server_key.read_bytes()))
    port = hub.start()
    # Each agent answers while the coordinator waits, so one torch thread per agent keeps a small machine busy
    # without oversubscribing it.
    threads = 1
    procs: list[tuple[str, subprocess.Popen[bytes], Path]] = []
    try:
        for c, name in zip(clients, names):
            log = c.checkpoint.parent / "agent.log"
            cmd = agent_command(c.checkpoint, port, run_dir / "tokens" / f"{name}.token", pki.ca_cert,
                                config=config, session=session, device=device, threads=threads,
                                access=config.teacher_access_modes()[c.client], client=c.client)
            with log.open("wb") as out:
                procs.append((name, subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT), log))
        deadline = time.monotonic() + AGENT_START_TIMEOUT
        while True:
            try:
                hub.wait_for_teachers(timeout=1.0)
                break
            except TimeoutError:
                for name, proc, log in procs:
                    if proc.poll() is not None:
                        tail = log.read_text(errors="replace").strip().splitlines()[-5:]
                        raise RuntimeError(f"teacher agent {name} exited with status {proc.returncode} before "
                                           f"joining; its log {str(log)!r} ends:\n" + "\n".join(tail)) from None
                if time.monotonic() > deadline:
                    raise
        yield hub.pool
    finally:
        hub.end_session()
        for name, proc, _ in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                logger.warning("teacher agent %s did not exit; terminating it", name)
                proc.kill()
                proc.wait()
        hub.stop()
