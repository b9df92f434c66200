"""What runs at the coordinator: the one flow every entry point runs (``flow.coordinate``), the teacher pools and
their ensemble, robustness, the synthesizer, the student trainer, the distillation methods, the run directory
and its summary.

It reaches teachers only through the contract (``fedkd.contract``): local hosts, gRPC agents or Flower nodes."""
