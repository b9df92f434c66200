"""``fedkd simulate``: ``flwr run . --stream`` in Flower's simulation engine, set up to work offline.

What it sets, and why (docs/flower.md):

- ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1``: otherwise the SuperLink
  runs ``uv sync`` for every run (gigabytes of CUDA wheels; fails offline).
  The app runs in this environment, where fedkd is installed.
- ``FLWR_DISABLE_UPDATE_CHECK=1``, ``FLWR_TELEMETRY_ENABLED=0``: no network.
- its own ``FLWR_HOME`` and free ports for the local SuperLink, so a
  SuperLink started elsewhere with other settings is never reused; it is
  stopped when the run ends.
- ``num-supernodes`` = ``num-clients``, one logical CPU per ClientApp and as
  many Ray CPUs as the machine has (at most one per client): a simulated node
  serves its teacher from a thread of its simulation worker and gives its
  slot back at once, so the workers, not the clients, are the processes (one
  worker hosts many clients' teachers) and 50 clients fit on 2 cores.
  ``bare=True`` passes none of this: ``flwr run . --stream`` as a new user
  types it, on the federation's defaults (num-clients 0 follows them).
- the run's status from ``flwr list``: ``flwr run --stream`` exits 0 even
  when the run failed; this command exits 1 then.
- a readable log (:class:`LogFilter`): Flower's stream shows every ServerApp
  line twice (once with ANSI colours, once with a timestamp), its DEBUG lines
  and notices that do not apply to this command; the filter keeps one copy of
  each line, no escape codes, no DEBUG, and every warning and error that is
  not a known notice. ``raw=True`` passes the stream through unchanged.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedkd.config import RunConfig, config_from_mapping, split_namespaced
from fedkd.options import toml_value

ROOT = Path(__file__).resolve().parent.parent

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
LEVELLED = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL)\s*:\s?(.*)$")  # Flower's console format
TIMESTAMPED = re.compile(r"^\d\d/\d\d/\d{4} \d\d:\d\d:\d\d:(DEBUG|INFO|WARNING|ERROR|CRITICAL):(.*)$")  # its copy
RUN_DIR = re.compile(r"\[fedkd\] run directory (.+)$")
# Flower's notices that say nothing about this run (fedkd simulate sets the federation's size itself).
NOTICES = ("default simulated SuperNodes changed", "To change federation size", "flwr federation simulation-config",
           "Flower configuration not found", "Created default configuration", "Starting logstream",
           "Starting local SuperLink", "Using SuperLink:", "Successfully installed fedkd to",
           "Starting Flower Simulation", "simulated SuperNodes)")


class LogFilter:
    """Flower's stream of a simulation, one line per event: each ServerApp line once (the coloured copy's text,
    the timestamped copy dropped), no ANSI codes, no DEBUG, no notices that do not apply; warnings and errors
    kept. The run directory the ServerApp names is remembered for the results table."""

    def __init__(self) -> None:
        self.run_dir: str | None = None
        self.shown: set[str] = set()

    def __call__(self, line: str) -> str | None:
        """The line to show (without its newline), or None to drop it."""
        text = ANSI.sub("", line).rstrip()
        stamped = TIMESTAMPED.match(text)
        if stamped:  # the second copy of a line: shown only for an error the coloured copy did not carry
            level, message = stamped.group(1), stamped.group(2).strip()
            if level in ("ERROR", "CRITICAL") and message not in self.shown:
                self.shown.add(message)
                return f"{level}: {message}"
            return None
        levelled = LEVELLED.match(text)
        level, message = (levelled.group(1), levelled.group(2).strip()) if levelled else ("", text.strip())
        found = RUN_DIR.search(message)
        if found:
            self.run_dir = found.group(1).strip()
        if not message or level == "DEBUG" or any(n in message for n in NOTICES):
            return None
        self.shown.add(message)
        if message.startswith("[fedkd] "):
            return message[len("[fedkd] "):]
        return f"{level}: {message}" if level in ("WARNING", "ERROR", "CRITICAL") else message


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_config_arg(changes: Mapping[str, Any], config: RunConfig) -> str:
    """``key=value`` pairs for the changed keys, typed as the config resolved them."""
    resolved = config.to_dict()
    flat, namespaced = split_namespaced(changes)
    keys = list(flat) + [f"{ns}.{key}" for ns, values in namespaced.items() for key in values]
    return " ".join(f"{key}={toml_value(resolved[key])}" for key in keys)


def simulation_env(flwr_home: Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(base if base is not None else os.environ)
    env.update({
        "FLWR_HOME": str(flwr_home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(_free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(_free_port()),
        # Short: Ray's socket paths under it must stay within 107 bytes.
        "RAY_TMPDIR": env.get("RAY_TMPDIR") or str(Path(tempfile.gettempdir()) / f"fedkd-ray-{os.getuid()}"),
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    })
    Path(env["RAY_TMPDIR"]).mkdir(parents=True, exist_ok=True)
    bindir = str(Path(sys.executable).parent)  # flwr and flower-superlink of this environment
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    return env


def superlink_pids(flwr_home: Path) -> list[int]:
    """The local SuperLinks started with this FLWR_HOME (their log file lies under it)."""
    marker = str(flwr_home / "local-superlink")
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        text = [a.decode(errors="replace") for a in args]
        if any("flower-superlink" in a for a in text[:2]) and any(marker in a for a in text):
            pids.append(int(proc.name))
    return pids


def _descendants(roots: list[int]) -> set[int]:
    """The processes ``roots`` and everything they started, from /proc."""
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(proc.name))
    seen, todo = set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.add(pid)
            todo.extend(children.get(pid, []))
    return seen


def run_processes(flwr_home: Path) -> set[int]:
    """The local SuperLink of this FLWR_HOME and every process it started (the simulation runtime with the
    ServerApp, the Ray workers with the ClientApps)."""
    return _descendants(superlink_pids(flwr_home))


def stop_superlink(flwr_home: Path, timeout: float = 15.0) -> None:
    pids = superlink_pids(flwr_home)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
        time.sleep(0.2)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_status(run_id: str, env: Mapping[str, str]) -> dict[str, Any]:
    out = subprocess.run(["flwr", "list", "--run-id", run_id, "--format", "json"], env=dict(env),
                         capture_output=True, text=True, timeout=60)
    try:
        runs = json.loads(out.stdout).get("runs") or []
    except json.JSONDecodeError:
        runs = []
    return runs[0] if runs else {"status": "unknown", "status-details": (out.stdout + out.stderr).strip()[-500:]}


def await_outcome(run_id: str, env: Mapping[str, str], *, timeout: float) -> dict[str, Any]:
    """The run's status record once it is finished (the stream can end a moment before the SuperLink records
    the outcome), or the last one seen after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    status = run_status(run_id, env)
    while not str(status.get("status", "")).startswith("finished") and time.monotonic() < deadline:
        time.sleep(0.5)
        status = run_status(run_id, env)
    return status


def simulate(changes: Mapping[str, Any], *, app: Path = ROOT, flwr_home: Path | None = None,
             timeout: float | None = None, stream: Any = None, bare: bool = False,
             raw: bool = False) -> tuple[int, dict[str, Any]]:
    """Run the app in simulation; returns (exit code, the run's status record from ``flwr list``, with the run
    directory the ServerApp wrote as ``run-dir`` when it said). ``raw``: Flower's stream unfiltered."""
    config = config_from_mapping({**changes, "num-clients": changes.get("num-clients") or 1} if bare else changes)
    n = config.num_clients  # (checked above, naming the key, before anything starts)
    home = (flwr_home or Path(os.environ.get("FEDKD_FLWR_HOME", "") or Path.home() / ".cache/fedkd/flwr-home"))
    home = home.expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    env = simulation_env(home)
    cmd = ["flwr", "run", str(app), "--stream"]
    if not bare:
        workers = max(1, min(n, os.cpu_count() or 1))
        cmd += ["--federation-config", f"num-supernodes={n} client-resources-num-cpus=1 init-args-num-cpus={workers}"]
    if changes:
        cmd += ["--run-config", run_config_arg(changes, config)]
    out = stream or sys.stdout
    shown = LogFilter()
    run_id = None
    try:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        started = time.monotonic()
        for line in proc.stdout:
            kept = line.rstrip("\n") if raw else shown(line)
            if kept is not None:
                out.write(kept + "\n")
                out.flush()
            match = re.search(r"Successfully started run (\d+)", line)
            if match:
                run_id = match.group(1)
            if timeout is not None and time.monotonic() - started > timeout:
                proc.kill()
                break
        code = proc.wait()
        if run_id is None:
            return (code or 1), {"status": "not started", "status-details": f"flwr run exited with {code}"}
        status = await_outcome(run_id, env, timeout=10.0)
        if shown.run_dir is not None:
            status["run-dir"] = shown.run_dir
        ok = status.get("status") == "finished:completed"
        return (0 if ok else 1), status
    finally:
        stop_superlink(home)
