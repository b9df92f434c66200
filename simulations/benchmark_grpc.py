"""Benchmark of the gRPC query path: printed figures, not asserted in tests.

    python simulations/benchmark_grpc.py                 # everything below
    python simulations/benchmark_grpc.py --only queries  # one part: queries, fanout, straggler or run

Parts:
- ``queries``: one teacher agent process (LeNet-5 on MNIST-5k shapes) behind the
  hub over TLS on loopback; latency of a Forward and of a stateless Backward (the
  inputs sent again, the forward recomputed) at the default batch (128 x 1 x 28 x
  28), payload throughput in MB/s, and a generator step's queries as the ensemble
  makes them (a Forward that keeps its graph, a Backward naming it), next to the
  same calls on the in-process host.
- ``fanout``: teachers that answer with 50 ms of latency (a sleep before every
  answer; each agent its own process, ``simulations/slow_agent.py``); time of one
  generator step's queries (a Forward fan-out then a Backward fan-out of 128 x 1
  x 28 x 28 inputs) with 1 and with 8 teachers. In a deployment every teacher computes on its own machine; here
  one 2-core machine hosts all eight, so these teachers compute almost nothing
  (a pooled linear layer) and the figure measures the hub's fan-out: messages
  encoded, sent and answered in parallel. Target: 8 teachers <= 1.15 x 1 teacher.
- ``straggler``: five such teachers, one of them answering after 1 s instead of 50 ms; time of a generator
  step's queries with every teacher waited for (``straggler-factor=0``, the default) and with the straggler
  policy (``straggler-factor=3``: once the quorum has answered, the others get 3 x the median answer time, at
  least 1 s), and how often the slow teacher's answers were used.
- ``run``: the main job (``fedkd run``) in-process and with ``transport=grpc``
  (five agent processes), from the same trained teachers.
  Target: gRPC wall time <= 1.05 x in-process.

Prints a Markdown table and writes ``simulations/results/benchmark_grpc.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from fedkd.client.cli import host_from_checkpoint
from fedkd.server.credentials import ServerTLS, issue_tokens
from fedkd.server.hub import Hub
from fedkd.server.loopback import agent_command, grpc_transport

from fedkd.config import config_from_mapping
from fedkd.contract import QueryContext
from fedkd.coordinator.ensemble import Ensemble
from fedkd.coordinator.experiment import prepare_clients, run_experiment
from fedkd.data import load_dataset
from fedkd.tls import make_dev_pki

ROOT = Path(__file__).resolve().parent.parent
STATE = QueryContext()


class _Quiet:
    def stage(self, message: str) -> None:
        print(f"  {message}", flush=True)

    def epoch_started(self, epoch: int, total_steps: int) -> None:
        pass

    def step(self) -> None:
        pass

    def epoch_finished(self, record: dict[str, Any]) -> None:
        print(f"  epoch {record['epoch'] + 1}: student {record['student_accuracy']:.4f}", flush=True)


def _teachers(cache: Path) -> Path:
    """Train (once) the main job's client teachers into ``cache``/clients."""
    config = config_from_mapping({})
    if not (cache / "clients").exists():
        split = load_dataset(config.dataset, config.data_root, seed=config.seed)
        prepare_clients(config, split, cache, torch.device("cpu"), _Quiet())
    return cache


def _copy_teachers(cache: Path, out: Path) -> None:
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(cache / "clients", out / "clients")


def _timed(fn: Any, repeats: int) -> list[float]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def bench_queries(cache: Path, repeats: int) -> dict[str, Any]:
    checkpoint = cache / "clients" / "client_00" / "teacher.pt"
    x = torch.randn(128, 1, 28, 28)
    grad = torch.randn(128, 10)
    local = host_from_checkpoint(checkpoint)
    with tempfile.TemporaryDirectory() as tmp:
        pki = make_dev_pki(Path(tmp) / "tls")
        tokens = issue_tokens(Path(tmp) / "tokens", ["client-000"])
        hub = Hub(tokens, session="bench", tls=ServerTLS(pki.server_cert.read_bytes(), pki.server_key.read_bytes()))
        port = hub.start()
        config = config_from_mapping({})
        proc = subprocess.Popen(agent_command(checkpoint, port, Path(tmp) / "tokens" / "client-000.token",
                                              pki.ca_cert, config=config, session="bench",
                                              device=torch.device("cpu"), threads=1))
        try:
            hub.wait_for_teachers(timeout=60)
            pool = hub.pool
            torch.set_num_threads(1)  # the same compute as the agent's single thread
            figures = {}

            def local_step() -> None:  # a generator step's queries: Forward (graph kept), Backward naming it
                local.forward(x, STATE, keep="step")
                local.backward(None, grad, STATE, forward_id="step")

            def remote_step() -> None:
                ref = pool.forward(x, STATE, min_answers=1, keep=True)[0].ref
                pool.backward(x, {0: (grad, {})}, STATE, refs={0: ref})

            for name, forward, backward, step in [
                ("in-process", lambda: local.forward(x, STATE),
                 lambda: local.backward(x, grad, STATE), local_step),
                ("grpc", lambda: pool.forward(x, STATE, min_answers=1),
                 lambda: pool.backward(x, {0: (grad, {})}, STATE), remote_step),
            ]:
                f = _timed(forward, repeats)
                b = _timed(backward, repeats)
                st = _timed(step, repeats)
                payload_f = x.nbytes + 128 * 10 * 4
                payload_b = 2 * x.nbytes + grad.nbytes
                figures[name] = {
                    "forward_ms_median": 1e3 * statistics.median(f),
                    "forward_ms_p90": 1e3 * sorted(f)[int(0.9 * len(f))],
                    "backward_ms_median": 1e3 * statistics.median(b),
                    "backward_ms_p90": 1e3 * sorted(b)[int(0.9 * len(b))],
                    "forward_MB_per_s": payload_f / statistics.median(f) / 1e6,
                    "backward_MB_per_s": payload_b / statistics.median(b) / 1e6,
                    "step_ms_median": 1e3 * statistics.median(st),
                }
            torch.set_num_threads(2)
        finally:
            hub.end_session()
            proc.wait(15)
            hub.stop()
    return figures


def bench_fanout(repeats: int) -> dict[str, Any]:
    figures = {}
    for count in (1, 8):
        with tempfile.TemporaryDirectory() as tmp:
            pki = make_dev_pki(Path(tmp))
            names = [f"client-{k:03d}" for k in range(count)]
            tokens = {n: f"token-{n}" for n in names}
            hub = Hub(tokens, session="fanout", tls=ServerTLS(pki.server_cert.read_bytes(),
                                                             pki.server_key.read_bytes()))
            port = hub.start()
            # each teacher its own process, as in a deployment (simulations/slow_agent.py)
            agents = [subprocess.Popen([sys.executable, "-m", "simulations.slow_agent", "--connect",
                                        f"localhost:{port}", "--token", tokens[name], "--ca", str(pki.ca_cert),
                                        "--client", str(k)], cwd=ROOT) for k, name in enumerate(names)]
            try:
                hub.wait_for_teachers(timeout=120)
                ensemble = Ensemble(hub.pool)

                def step(ensemble: Ensemble = ensemble) -> None:
                    x = torch.randn(128, 1, 28, 28, requires_grad=True)
                    out = ensemble(x, STATE)
                    out.logits[:, 0].sum().backward()

                times = _timed(step, repeats)
                figures[f"{count}_teachers_step_ms"] = 1e3 * statistics.median(times)
            finally:
                hub.end_session()
                for agent in agents:
                    agent.wait(30)
                hub.stop()
    figures["ratio"] = figures["8_teachers_step_ms"] / figures["1_teachers_step_ms"]
    return figures


def bench_straggler(repeats: int) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    latencies = [0.05, 0.05, 0.05, 0.05, 1.0]
    for factor in (0.0, 3.0):
        with tempfile.TemporaryDirectory() as tmp:
            pki = make_dev_pki(Path(tmp))
            names = [f"client-{k:03d}" for k in range(len(latencies))]
            tokens = {n: f"token-{n}" for n in names}
            hub = Hub(tokens, session="straggler", straggler_factor=factor,
                      tls=ServerTLS(pki.server_cert.read_bytes(), pki.server_key.read_bytes()))
            port = hub.start()
            agents = [subprocess.Popen([sys.executable, "-m", "simulations.slow_agent", "--connect",
                                        f"localhost:{port}", "--token", tokens[name], "--ca", str(pki.ca_cert),
                                        "--client", str(k), "--latency", str(latency)], cwd=ROOT)
                      for k, (name, latency) in enumerate(zip(names, latencies))]
            try:
                hub.wait_for_teachers(timeout=120)
                ensemble = Ensemble(hub.pool, reliability=False)
                used = []

                def step(ensemble: Ensemble = ensemble, used: list[bool] = used) -> None:
                    x = torch.randn(128, 1, 28, 28, requires_grad=True)
                    out = ensemble(x, STATE)
                    out.logits[:, 0].sum().backward()
                    used.append(len(latencies) - 1 in out.members)

                times = _timed(step, repeats)
                figures[f"factor_{factor:g}"] = {"step_ms": 1e3 * statistics.median(times),
                                                 "slow_teacher_used": sum(used) / len(used),
                                                 "late": hub.pool.stats()[-1].late}
            finally:
                hub.end_session(timeout=2)
                for agent in agents:
                    agent.kill()
                    agent.wait(30)
                hub.stop()
    return figures


def bench_run(cache: Path, out_root: Path) -> dict[str, Any]:
    figures = {}
    for name, overrides, transport in [("in-process", {}, None), ("grpc", {"transport": "grpc"}, grpc_transport)]:
        out = out_root / f"benchmark-grpc-run-{name}"
        _copy_teachers(cache, out)
        print(f"- main job, {name}", flush=True)
        summary = run_experiment(config_from_mapping(overrides), out, observer=_Quiet(), transport=transport)
        figures[name] = {"wall_seconds": summary["wall_seconds"],
                         "student_accuracy": summary["student"]["test_accuracy"],
                         "query_MB": summary["queries"]["bytes"] / 1e6,
                         "wire_MB": sum(c["wire_bytes"] for c in summary["queries"]["per_client"]) / 1e6}
    figures["ratio"] = figures["grpc"]["wall_seconds"] / figures["in-process"]["wall_seconds"]
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["queries", "fanout", "straggler", "run"], action="append")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out-root", default=str(ROOT / "runs"))
    args = parser.parse_args()
    parts = args.only or ["queries", "fanout", "straggler", "run"]
    torch.set_num_threads(2)
    cache = _teachers(Path(args.out_root) / "benchmark-grpc-teachers")
    results: dict[str, Any] = {"machine": {"cpus": torch.get_num_threads(), "platform": platform.platform(),
                                           "python": platform.python_version(), "torch": torch.__version__}}
    if "queries" in parts:
        print("- per-query latency", flush=True)
        results["queries"] = bench_queries(cache, args.repeats)
    if "fanout" in parts:
        print("- fan-out with 50 ms teachers", flush=True)
        results["fanout"] = bench_fanout(max(10, args.repeats // 5))
    if "straggler" in parts:
        print("- one teacher of five at 1 s, the others at 50 ms", flush=True)
        results["straggler"] = bench_straggler(max(5, args.repeats // 10))
    if "run" in parts:
        results["run"] = bench_run(cache, Path(args.out_root))

    print("\n| figure | value |\n|---|---|")
    if "queries" in results:
        for where, q in results["queries"].items():
            print(f"| {where}: Forward, batch 128 (median / p90) | {q['forward_ms_median']:.2f} / "
                  f"{q['forward_ms_p90']:.2f} ms, {q['forward_MB_per_s']:.0f} MB/s |")
            print(f"| {where}: stateless Backward, batch 128 (median / p90) | {q['backward_ms_median']:.2f} / "
                  f"{q['backward_ms_p90']:.2f} ms, {q['backward_MB_per_s']:.0f} MB/s |")
            print(f"| {where}: generator step (Forward keeping its graph + Backward naming it), median | "
                  f"{q['step_ms_median']:.2f} ms |")
    if "fanout" in results:
        f = results["fanout"]
        print(f"| generator-step queries, 1 teacher at 50 ms | {f['1_teachers_step_ms']:.0f} ms |")
        print(f"| generator-step queries, 8 teachers at 50 ms | {f['8_teachers_step_ms']:.0f} ms "
              f"({f['ratio']:.2f}x; target <= 1.15x: {'met' if f['ratio'] <= 1.15 else 'MISSED'}) |")
    if "straggler" in results:
        for factor, f in results["straggler"].items():
            print(f"| generator-step queries, one of five teachers at 1 s, straggler-{factor.replace('_', '=')} | "
                  f"{f['step_ms']:.0f} ms; the slow teacher's answers used in {100 * f['slow_teacher_used']:.0f} % "
                  f"of the steps |")
    if "run" in results:
        r = results["run"]
        for where in ("in-process", "grpc"):
            print(f"| main job, {where} | {r[where]['wall_seconds']:.0f} s, student "
                  f"{r[where]['student_accuracy']:.4f}, {r[where]['query_MB']:,.0f} MB of tensors, "
                  f"{r[where]['wire_MB']:,.0f} MB on the wire |")
        print(f"| gRPC / in-process wall time | {r['ratio']:.3f}x (target <= 1.05x: "
              f"{'met' if r['ratio'] <= 1.05 else 'MISSED'}) |")
    path = ROOT / "simulations" / "results" / "benchmark_grpc.json"
    existing = json.loads(path.read_text()) if path.exists() else {}
    existing.update(results)
    path.write_text(json.dumps(existing, indent=2) + "\n")
    print(f"\nwritten to {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
