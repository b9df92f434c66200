"""The config keys' mirrors are generated from the settings and never stale; every key explains itself."""

from __future__ import annotations

import dataclasses

from fedkd.server import keys
from fedkd.server.cli import main

from fedkd.config import KEYS, RunConfig
from fedkd.coordinator.methods import METHODS


def test_the_generated_mirrors_are_not_stale():
    """pyproject.toml's [tool.flwr.app.config] and docs/configuration.md's key table are what the settings
    generate now (`python -m fedkd.server.keys --write` regenerates them)."""
    assert keys.stale() == []


def test_a_changed_default_makes_the_flower_table_stale(monkeypatch):
    fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    monkeypatch.setattr(fields["epochs"], "default", 11)
    assert "\nepochs = 11\n" in keys.flower_table()
    assert keys.PYPROJECT in keys.stale() and keys.CONFIGURATION in keys.stale()


def test_every_key_has_a_meaning_and_the_registries_choices():
    rows = {row.key: row for row in keys.every_key()}
    options = [f"{m.name}.{f.name.replace('_', '-')}" for m in METHODS.values() for f in dataclasses.fields(m.options)]
    assert sorted(rows) == sorted([*KEYS, *options])
    assert len(KEYS) == 99 and rows["student-lr"].default == 0.1 and rows["generator-width"].default == 16
    assert [k for k, row in rows.items() if not row.meaning] == []
    assert rows["method"].allowed == ", ".join(METHODS)
    for key, expected in (("ensemble", "class-weighted"), ("teacher-model", "lenet5"), ("student-model", "resnet18"),
                          ("privacy-mode", "output-noise"), ("teacher-access", "labels")):
        assert expected in rows[key].allowed, key
    assert rows["hub-host"].scope == "flower" and rows["privacy-mode"].scope == "client"
    assert rows["dataset"].scope == "run" and rows["cudfkd.weight-bn"].method == "cudfkd"


def test_fedkd_keys_prints_meanings_choices_and_where_a_key_applies(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")
    assert main(["keys"]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if "│ method " in line)
    assert "cudfkd, tadfkd, rdskd" in line and "the distillation method" in line
    assert any("hub-host" in line and "Flower app only" in line for line in out.splitlines())
    assert any("privacy-budget" in line and "each client's own" in line for line in out.splitlines())
