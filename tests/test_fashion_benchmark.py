"""The Fashion-MNIST benchmark harness on small IDX files it writes: teachers once per split, runs cached, the
table with DENSE's published rows and the targets, the --cached table of what is done."""

import gzip
import json
import platform
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "simulations"))

import fashion_mnist  # noqa: E402

TINY = ["--set", "teacher-epochs=1", "--set", "epochs=1", "--set", "steps-per-epoch=2", "--set", "student-steps=2",
        "--set", "batch-size=32", "--tag", "tiny"]


def _write_idx_gz(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">I", 0x0803 if array.ndim == 3 else 0x0801) + b"".join(
        struct.pack(">I", d) for d in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


@pytest.fixture
def idx_root(tmp_path: Path) -> Path:
    root = tmp_path / "fashion"
    root.mkdir()
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 300), ("t10k", 60)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 40, (n, 28, 28))
        for c in range(10):  # each class a bright band of its own: a teacher learns it in one epoch
            images[labels == c, 2 * c:2 * c + 6, :] = 220
        _write_idx_gz(root / f"{prefix}-images-idx3-ubyte.gz", images)
        _write_idx_gz(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


@pytest.mark.slow
def test_the_table_beside_denses_from_teachers_trained_once(tmp_path, idx_root, monkeypatch, capsys):
    results, runs = tmp_path / "results", tmp_path / "runs"
    args = ["--data-root", str(idx_root), "--alphas", "0.5", "--seeds", "0", "--results", str(results),
            "--runs", str(runs), "--students", "default,half", *TINY]
    ran = []
    real = fashion_mnist.run_one
    monkeypatch.setattr(fashion_mnist, "run_one", lambda m, r: ran.append(m.get("student-model")) or real(m, r))
    assert fashion_mnist.main(args) == 0
    assert ran == [None, "lenet5-half"]  # fedkd's default student, then the one of half its width
    assert len(list((runs / "teachers").glob("teachers-*"))) == 1  # both distil from the same five teachers
    table = (results / "fashion-mnist-tiny.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| 0.5 |")]
    assert [r.split("|")[2].strip() for r in rows] == ["default", "half", "DENSE (published)"]
    assert "| 0.5 | DENSE (published) | | | 0.8942 | | 0.8594 |" in table
    assert "Dirichlet(0.5): student" in table and ">= 0.8800" in table  # the target, printed beside the result
    assert (results / "fashion-mnist-tiny.png").stat().st_size > 0
    record = json.loads(next((results / "records").glob("*.json")).read_text())
    assert 0.0 <= record["student"] <= 1.0 and record["query_samples"] > 0
    assert record["best_teacher"] == max(record["teachers"]) and len(record["teachers"]) == 5
    # where it was measured (its wall time means nothing without it), on a machine with or without a GPU
    cuda = torch.cuda.is_available()
    assert record["machine"] == {"device": "cuda" if cuda else "cpu",
                                 "accelerator": torch.cuda.get_device_name(0) if cuda else None,
                                 "threads": torch.get_num_threads(), "platform": platform.platform(),
                                 "torch": torch.__version__, "python": platform.python_version()}

    ran.clear()
    assert fashion_mnist.main(args) == 0  # everything cached: nothing runs again
    assert ran == []
    capsys.readouterr()
    assert fashion_mnist.main([*args[:4], "--seeds", "0,1", *args[6:], "--cached"]) == 0
    assert ran == [] and "left out: alpha=0.5 seed=1 student=default" in capsys.readouterr().err

    # The same students on the real data: distilled from the ensemble on the real images, and on their labels.
    assert fashion_mnist.main([*args, "--references"]) == 0
    assert ran == []
    refs = [json.loads(p.read_text())["references"] for p in (results / "records").glob("references-*.json")]
    assert len(refs) == 2 and all(0.0 <= v <= 1.0 for r in refs for v in r.values())
    table = (results / "fashion-mnist-tiny.md").read_text()
    assert "| distilled on real images | trained on real labels |" in table

    # Where the student falls short, from its run directory: recall per class beside the teachers' mean and the
    # class-weighted ensemble, who holds each class, its BatchNorm statistics from the real images, the synthetic
    # pool against the real images.
    capsys.readouterr()
    run_dir = next(runs.glob("a0.5-s0-*"))
    assert fashion_mnist.main(["--data-root", str(idx_root), "--diagnose", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "with BatchNorm statistics from the real test images" in out
    rows = [line.split(" | ") for line in out.splitlines() if line[:4] in {f"| {c} " for c in range(10)}]
    assert len(rows) == 10
    # how often each classifies a test image as the class: every test image counted once, every pool sample once
    assert sum(int(r[5]) for r in rows) == sum(int(r[6]) for r in rows) == 60
    assert sum(int(r[7].rstrip(" |")) for r in rows) == 64
    # who holds each class: of five clients the largest holds a fifth of its records or more
    holders = [(int(r[4].split()[0]), float(r[4].split()[1].strip("()"))) for r in rows]
    assert all(1 <= n <= 5 and 0.2 <= largest <= 1.0 for n, largest in holders), holders
    assert all(0.0 <= float(r[3]) <= 1.0 for r in rows)  # the class-weighted ensemble's recall
    assert "the synthetic pool (64)" in out  # 2 rounds of 32


@pytest.mark.slow
def test_the_pathological_split_runs_beside_the_dirichlet_ones_with_teachers_of_two_classes(tmp_path, idx_root):
    import torch

    results, runs = tmp_path / "results", tmp_path / "runs"
    args = ["--data-root", str(idx_root), "--alphas", "pathological,0.5", "--seeds", "0", "--results", str(results),
            "--runs", str(runs), *TINY]
    assert fashion_mnist.main(args) == 0
    assert sorted(p.name.split("-")[1] for p in (runs / "teachers").glob("teachers-*")) == ["a0.5", "pathological"]
    teachers = next((runs / "teachers").glob("teachers-pathological-s0-*")) / "clients"
    owned = [torch.load(p, weights_only=False)["label_counts"] for p in sorted(teachers.glob("client_*/teacher.pt"))]
    assert [sum(1 for n in counts if n > 0) for counts in owned] == [2] * 5  # two classes each
    assert sorted(c for counts in owned for c, n in enumerate(counts) if n > 0) == list(range(10))  # each an owner
    assert len(list((results / "records").glob("pathological-s0-*.json"))) == 1
    table = (results / "fashion-mnist-tiny.md").read_text().splitlines()
    labels = [line.split("|")[1].strip() for line in table if line.startswith("| ") and "default" in line]
    assert labels == ["0.5", "pathological"]  # the Dirichlet split first, then the pathological one
    assert not any("pathological" in line for line in table if line.startswith("["))  # no DENSE target for it


def test_a_variant_needs_a_tag_and_a_missing_root_says_what_to_install(tmp_path, capsys):
    with pytest.raises(SystemExit):
        fashion_mnist.main(["--data-root", str(tmp_path), "--set", "epochs=2"])
    assert "--tag" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        fashion_mnist.main(["--data-root", str(tmp_path / "absent")])
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        fashion_mnist.main(["--data-root", str(tmp_path), "--alphas", "0.5,skewed"])
    assert "--alphas: 'skewed' is neither a Dirichlet alpha nor pathological" in capsys.readouterr().err


def test_the_factor_table_compares_each_variant_with_the_defaults_on_its_own_seeds(tmp_path, capsys):
    records = tmp_path / "records"
    records.mkdir()
    split = {"dataset": "fashion-mnist", "data-root": "/x", "num-clients": 5, "partition": "dirichlet",
             "alpha": 0.5}

    def record(name, student, seed, **changes):
        (records / f"a0.5-s{seed}-{name}.json").write_text(json.dumps({
            "config": {**split, "seed": seed, **changes}, "student": student, "query_samples": 1000,
            "wall_seconds": 10.0}))

    # the records made before the student's defaults changed name the old recipe: LeNet-5-half, 20 steps, no refit
    before = {"student-model": "lenet5-half", "student-steps": "20", "student-refit": "0"}
    record("d0", 0.70, 0, **before)
    record("d1", 0.60, 1, **before)
    record("v0", 0.75, 0, epochs=30, **before)  # seed 0 only: compared with the defaults' seed 0 alone
    record("w0", 0.66, 0, **{"generator-lr": 0.05}, **before)
    record("w1", 0.66, 1, **{"generator-lr": 0.05}, **before)
    record("t0", 0.99, 0, **{**before, "student-model": "lenet5"})  # a student as large as the teachers
    # one torch thread: compared with the defaults run at one thread, not with those at torch's choice
    record("d0t1", 0.80, 0, **{"num-threads": 1}, **before)
    record("r0t1", 0.82, 0, **{"num-threads": 1, **before, "student-refit": 1.0})
    # today's defaults (no key): against the recipe of before; a variant of today's defaults against today's
    record("n0t1", 0.86, 0, **{"num-threads": 1})
    record("x0t1", 0.84, 0, **{"num-threads": 1, "pool-size": 6400})
    record("a0t1", 0.50, 0, **{"num-threads": 1, "alpha": 0.1})  # another split: not in Dirichlet(0.5)'s table
    assert fashion_mnist.main(["--results", str(tmp_path), "--factors"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| `")]
    assert rows[0].startswith("| `student-model=lenet5` | 0 | lenet5, 20, 0 | 0 | 0.9900 | +0.2900 |")
    assert rows[1].startswith("| `student-model=lenet5 student-steps=5 student-refit=8` | 1 | lenet5, 5, 8 | 0 "
                              "| 0.8600 | +0.0600 |")
    assert rows[2].startswith("| `epochs=30` | 0 | lenet5-half, 20, 0 | 0 | 0.7500 | +0.0500 |")
    assert rows[3].startswith("| `student-refit=1` | 1 | lenet5-half, 20, 1 | 0 | 0.8200 | +0.0200 |")
    assert rows[4].startswith("| `generator-lr=0.05` | 0 | lenet5-half, 20, 0 | 0,1 | 0.6600 ± 0.0000 | +0.0100 |")
    assert rows[7].startswith("| `pool-size=6400` | 1 | lenet5, 5, 8 | 0 | 0.8400 | -0.0200 |")
    assert sorted(rows[5:7]) == [
        "| `(the defaults)` | 0 | lenet5-half, 20, 0 | 0,1 | 0.6500 ± 0.0500 | +0.0000 | 1,000 | 10 |",
        "| `(the defaults)` | 1 | lenet5-half, 20, 0 | 0 | 0.8000 | +0.0000 | 1,000 | 10 |"]
    assert len(rows) == 8  # today's defaults have no row of their own against themselves beyond the recipe's


def test_a_record_is_reused_when_only_keys_added_since_at_their_default_tell_it_apart():
    from fedkd.config import config_from_mapping

    now = config_from_mapping({"dataset": "fashion-mnist", "seed": 1}).to_dict()
    older = {k: v for k, v in now.items() if k not in ("teacher-class-statistics", "cudfkd.class-statistics")}
    assert fashion_mnist.same_run(now, now) and fashion_mnist.same_run(older, now)
    on = config_from_mapping({"dataset": "fashion-mnist", "seed": 1, "teacher-class-statistics": True}).to_dict()
    assert not fashion_mnist.same_run(older, on)  # a key added since, away from its default: another run
    assert not fashion_mnist.same_run({**now, "epochs": now["epochs"] + 1}, now)  # a changed value or default
    assert not fashion_mnist.same_run({**now, "a-removed-key": 1}, now)
    assert not fashion_mnist.same_run(None, now)


def test_a_record_from_before_a_default_changed_keeps_the_value_it_was_measured_at():
    from fedkd.config import config_from_mapping

    now = config_from_mapping({"dataset": "fashion-mnist", "seed": 1}).to_dict()
    older = {k: v for k, v in now.items() if k != "student-clip"}  # made before the key existed
    was = config_from_mapping({"dataset": "fashion-mnist", "seed": 1, "student-clip": 0}).to_dict()
    other = config_from_mapping({"dataset": "fashion-mnist", "seed": 1, "student-clip": 3}).to_dict()
    assert fashion_mnist.EARLIER_DEFAULTS["student-clip"] == 0
    assert fashion_mnist.same_run(older, was) and not fashion_mnist.same_run(older, other)
    assert fashion_mnist.same_run(older, now) == (now["student-clip"] == 0)


def test_a_new_default_reuses_the_variant_that_measured_it_and_keeps_the_old_default_run(tmp_path, monkeypatch):
    from fedkd.config import config_from_mapping, parse_assignments

    # as if ``epochs`` had been 7 until today's 10: the default run on record was measured at 7, and a variant
    # with ``epochs=10`` measured what is today the default run
    monkeypatch.setattr(fashion_mnist, "EARLIER_DEFAULTS", {"epochs": 7})
    records = tmp_path / "records"
    records.mkdir()
    split = {"dataset": "fashion-mnist", "data-root": "/x", "num-clients": 5, "partition": "dirichlet",
             "alpha": 0.5, "seed": 0}

    def write(mapping, student):
        resolved = config_from_mapping(mapping).to_dict()
        path = records / f"a0.5-s0-{fashion_mnist._key(mapping)}.json"
        path.write_text(json.dumps({"config": mapping, "resolved": resolved, "student": student}))
        return path

    old = write(split, 0.70)
    record = json.loads(old.read_text())
    record["resolved"]["epochs"] = 7  # what the default run was, then
    old.write_text(json.dumps(record))
    write({**split, **parse_assignments(["epochs=10"])}, 0.80)
    runs = tmp_path / "runs"
    now = fashion_mnist.cached(split, tmp_path, runs, compute=False)
    assert now is not None and now["student"] == 0.80 and now["config"] == split
    assert now["measured_as"] == {**split, "epochs": "10"}
    kept = fashion_mnist.cached({**split, **parse_assignments(["epochs=7"])}, tmp_path, runs, compute=False)
    assert kept is not None and kept["student"] == 0.70  # the old default run, under the value it was measured at
    assert json.loads(old.read_text())["student"] == 0.80  # the default's record is today's default run
    assert fashion_mnist.cached({**split, **parse_assignments(["epochs=12"])}, tmp_path, runs, compute=False) is None
    # a variant run before the change, never rerun since, is found under the earlier value too
    variant = {**split, "pool-size": 4096}
    path = write(variant, 0.66)
    record = json.loads(path.read_text())
    del record["resolved"]["epochs"]  # (as if epochs had been added with the default of then, 7)
    path.write_text(json.dumps(record))
    assert fashion_mnist.cached(variant, tmp_path, runs, compute=False) is None  # not measured at today's 10
    earlier = fashion_mnist.cached({**variant, **parse_assignments(["epochs=7"])}, tmp_path, runs, compute=False)
    assert earlier is not None and earlier["student"] == 0.66


def test_a_split_whose_teacher_went_missing_trains_it_again(tmp_path, idx_root):
    mapping = {"dataset": "fashion-mnist", "data-root": str(idx_root), "num-clients": 5, "partition": "dirichlet",
               "alpha": 0.5, "seed": 0, "teacher-epochs": 1}
    clients, scores = fashion_mnist.teachers(mapping, tmp_path)
    import torch

    lost = clients / "client_01" / "teacher.pt"
    before = torch.load(lost, weights_only=True)["state_dict"]
    lost.unlink()  # a training cut short, or a teacher removed by hand: scores.json alone must not stand for it
    again, rescored = fashion_mnist.teachers(mapping, tmp_path)
    assert again == clients and rescored == scores
    after = torch.load(lost, weights_only=True)["state_dict"]  # trained again, to the same weights
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
