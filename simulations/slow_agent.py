"""A teacher agent that answers with added latency, as its own process: the fan-out benchmark's teachers.

    python -m simulations.slow_agent --connect localhost:PORT --token TOKEN --ca ca.pem --client 3

In a deployment every teacher computes on its own machine; on the one 2-core benchmark machine these teachers
compute almost nothing (a pooled linear layer on 1 x 28 x 28 inputs) and wait ``--latency`` seconds before every
answer, so the figure measures the hub's fan-out: messages encoded, sent, answered in parallel and decoded.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from fedkd.client.agent import AgentSettings, ClientTLS, TeacherAgent

from fedkd.contract import TeacherDescription
from fedkd.institution.host import TeacherHost


class SlowHost(TeacherHost):
    """A teacher ``latency`` seconds away: every answer waits that long first."""

    latency = 0.05

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        time.sleep(self.latency)
        return super().forward(*args, **kwargs)

    def backward(self, *args: Any, **kwargs: Any) -> Any:
        time.sleep(self.latency)
        return super().backward(*args, **kwargs)


def pooled_linear_host(client: int, latency: float) -> SlowHost:
    torch.manual_seed(client)
    desc = TeacherDescription(client=client, model="pooled-linear", num_classes=10, input_shape=(1, 28, 28),
                              mean=(0.1307,), std=(0.3081,))
    model = torch.nn.Sequential(torch.nn.AvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(49, 10))
    host = SlowHost(model, desc)
    host.latency = latency
    return host


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connect", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--ca", required=True)
    parser.add_argument("--client", type=int, default=0)
    parser.add_argument("--latency", type=float, default=0.05)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with open(args.ca, "rb") as f:
        ca = f.read()
    agent = TeacherAgent(pooled_linear_host(args.client, args.latency),
                         AgentSettings(target=args.connect, token=args.token, tls=ClientTLS(ca), give_up_after=60))
    agent.serve()


if __name__ == "__main__":
    main()
