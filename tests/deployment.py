"""A real Flower deployment on loopback: one SuperLink, one SuperNode per institution, ``flwr run``.

Used by the deployment test; every process it starts is stopped by :meth:`Deployment.stop`.
The commands are the ones docs/flower.md ("Deployment") gives an operator.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from fedkd.server.simulate import await_outcome

from fedkd.tls import make_dev_pki, make_supernode_key

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Deployment:
    def __init__(self, work: Path, node_configs: list[str], *, tls: bool, auth: bool) -> None:
        self.work, self.node_configs, self.tls, self.auth = work, node_configs, tls, auth
        self.home = work / "flwr-home"
        self.home.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "FLWR_HOME": str(self.home), "FLWR_DISABLE_UPDATE_CHECK": "1",
                    "FLWR_TELEMETRY_ENABLED": "0", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        self.port = free_port()
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.pki = make_dev_pki(work / "pki", hosts=["localhost", "127.0.0.1"]) if tls else None

    def _start(self, name: str, cmd: list[str]) -> subprocess.Popen[bytes]:
        log = (self.work / f"{name}.log").open("wb")
        proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=self.work)
        self.procs.append((name, proc))
        return proc

    def log(self, name: str) -> str:
        return (self.work / f"{name}.log").read_text(errors="replace")

    def _security(self) -> list[str]:
        if self.pki is None:
            return ["--insecure"]
        return ["--ssl-ca-certfile", str(self.pki.ca_cert), "--ssl-certfile", str(self.pki.server_cert),
                "--ssl-keyfile", str(self.pki.server_key)]

    def start(self, timeout: float = 60.0) -> None:
        cmd = [str(BIN / "flower-superlink"), *self._security(), "--host", "127.0.0.1", "--port", str(self.port),
               "--database", str(self.work / "state.db"), "--disable-runtime-dependency-installation"]
        if self.auth:
            cmd.append("--enable-supernode-auth")
        self._start("superlink", cmd)
        self._write_connection()
        self._wait_superlink(timeout)
        for i, node_config in enumerate(self.node_configs):
            cmd = [str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{self.port}",
                   "--port", str(free_port()), "--node-config", node_config]
            cmd += ["--root-certificates", str(self.pki.ca_cert)] if self.pki else ["--insecure"]
            if self.auth:
                private, public = make_supernode_key(self.work / "keys", f"node-{i}")
                self._register(public)
                cmd += ["--auth-supernode-private-key", str(private)]
            self._start(f"supernode-{i}", cmd)

    def _register(self, public: Path, attempts: int = 5) -> None:
        """``flwr supernode register``; a SuperLink under load can answer ``flwr list`` and still refuse the
        next connection for a moment ("unavailable"), so that one answer is retried, a bounded number of times."""
        for attempt in range(attempts):
            out = self.flwr("supernode", "register", str(public), "deploy")
            if out.returncode == 0:
                return
            if "unavailable" not in (out.stdout + out.stderr).lower() or attempt == attempts - 1:
                raise RuntimeError(f"flwr supernode register failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
            time.sleep(1.0)

    def _write_connection(self) -> None:
        lines = ["[superlink]", 'default = "deploy"', "", "[superlink.deploy]",
                 f'address = "127.0.0.1:{self.port}"']
        lines += [f'root-certificates = "{self.pki.ca_cert}"'] if self.pki else ["insecure = true"]
        (self.home / "config.toml").write_text("\n".join(lines) + "\n")

    def _wait_superlink(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.procs[0][1].poll() is not None:
                raise RuntimeError("flower-superlink exited:\n" + self.log("superlink")[-2000:])
            if self.flwr("list", "--format", "json").returncode == 0:
                return
            time.sleep(0.5)
        raise TimeoutError("the SuperLink did not answer in time:\n" + self.log("superlink")[-2000:])

    def flwr(self, *args: str, check: bool = False, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        out = subprocess.run([str(BIN / "flwr"), *args], env=self.env, capture_output=True, text=True,
                             timeout=timeout, cwd=self.work)
        if check and out.returncode != 0:
            raise RuntimeError(f"flwr {' '.join(args)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
        return out

    def run(self, run_config: str, timeout: float = 600.0) -> tuple[str, dict[str, Any], str]:
        """``flwr run <app> deploy --stream``; returns the run id, its status from ``flwr list`` and the output."""
        out = self.flwr("run", str(ROOT), "deploy", "--stream", "--run-config", run_config, timeout=timeout)
        text = out.stdout + out.stderr
        match = re.search(r"Successfully started run (\d+)", text)
        if not match:
            raise RuntimeError(f"flwr run did not start a run ({out.returncode}):\n{text[-3000:]}")
        run_id = match.group(1)
        return run_id, await_outcome(run_id, self.env, timeout=20.0), text

    def stop(self) -> None:
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        for _, proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
