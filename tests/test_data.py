import os
import pickle
import struct

import numpy as np
import pytest
import torch

from fedkd.data import SPECS, DatasetNotFoundError, PartitionError, load_dataset, partition_indices

# Small files in each torchvision on-disk format ------------------------------------


def _write_idx(path, array):
    magic = 0x0803 if array.ndim == 3 else 0x0801
    with open(path, "wb") as f:
        f.write(struct.pack(">I", magic))
        for d in array.shape:
            f.write(struct.pack(">I", d))
        f.write(array.astype(np.uint8).tobytes())


def _write_mnist_like(root, folder, n_train=12, n_test=6):
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = np.arange(n) % 10
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
        out[prefix] = (images, labels)
    return out


def _write_idx_flat(root, gz, n_train=12, n_test=6):
    """The four IDX files directly in ``root`` (Debian's dataset-fashion-mnist layout), gzipped or not."""
    import gzip
    import shutil

    rng = np.random.default_rng(3)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) * 3) % 10
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            path = root / f"{prefix}-{kind}-ubyte"
            _write_idx(path, array)
            if gz:
                with open(path, "rb") as src, gzip.open(f"{path}.gz", "wb") as dst:
                    shutil.copyfileobj(src, dst)
                path.unlink()
        out[prefix] = (images, labels)
    return out


def _write_cifar(root, folder, files, label_key, meta_name, meta_key, classes):
    base = root / folder
    base.mkdir(parents=True)
    rng = np.random.default_rng(1)
    written = {}
    for name in files:
        data = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
        labels = list(rng.integers(0, classes, 4))
        with open(base / name, "wb") as f:
            pickle.dump({"data": data, label_key: labels}, f)
        written[name] = (data, labels)
    with open(base / meta_name, "wb") as f:
        pickle.dump({meta_key: [f"c{i}" for i in range(classes)]}, f)
    return written


@pytest.fixture
def no_checksums(monkeypatch):
    """The files we write cannot match torchvision's MD5 sums of the real archives: check existence only."""
    import torchvision.datasets.cifar as cifar
    import torchvision.datasets.svhn as svhn

    for module in (cifar, svhn):
        monkeypatch.setattr(module, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_mnist_formats(tmp_path, name, folder):
    written = _write_mnist_like(tmp_path, folder)
    split = load_dataset(name, tmp_path)
    assert split.spec == SPECS[name]
    assert tuple(split.train.images.shape) == (12, 1, 28, 28) and tuple(split.test.images.shape) == (6, 1, 28, 28)
    np.testing.assert_allclose(split.train.images[:, 0].numpy() * 255, written["train"][0], atol=1e-3)
    assert split.test.labels.tolist() == written["t10k"][1].tolist()


def test_cifar10_format(tmp_path, no_checksums):
    files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    written = _write_cifar(tmp_path, "cifar-10-batches-py", files, "labels", "batches.meta", "label_names", 10)
    split = load_dataset("cifar10", tmp_path)
    assert tuple(split.train.images.shape) == (20, 3, 32, 32) and tuple(split.test.images.shape) == (4, 3, 32, 32)
    first = written["data_batch_1"][0][0].reshape(3, 32, 32)
    np.testing.assert_allclose(split.train.images[0].numpy() * 255, first, atol=1e-3)
    assert split.test.labels.tolist() == [int(v) for v in written["test_batch"][1]]
    assert float(split.train.images.max()) <= 1.0


@pytest.mark.parametrize("gz", [True, False])
def test_idx_files_directly_under_the_root(tmp_path, gz):
    written = _write_idx_flat(tmp_path, gz)
    split = load_dataset("fashion-mnist", tmp_path)
    assert tuple(split.train.images.shape) == (12, 1, 28, 28) and tuple(split.test.images.shape) == (6, 1, 28, 28)
    np.testing.assert_allclose(split.train.images[:, 0].numpy() * 255, written["train"][0], atol=1e-3)
    assert split.train.labels.tolist() == written["train"][1].tolist()
    assert split.test.labels.tolist() == written["t10k"][1].tolist()


def test_idx_files_that_do_not_add_up_are_refused_by_name(tmp_path):
    import gzip

    _write_idx_flat(tmp_path, gz=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"not t10k-labels-idx1-ubyte .*all four"):
        load_dataset("fashion-mnist", tmp_path)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.arange(5) % 10)  # 5 labels for 6 images
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte.gz' holds 6 images but .* 5 labels"):
        load_dataset("fashion-mnist", tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:-100]))  # truncated: the header promises more than the file holds
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte.gz': its header promises 12 x 28 x 28"):
        load_dataset("fashion-mnist", tmp_path)
    path.write_bytes(gzip.compress(raw[:4]))
    with pytest.raises(ValueError, match="is not an IDX file of images"):
        load_dataset("fashion-mnist", tmp_path)
    path.write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="is not a readable IDX file"):
        load_dataset("fashion-mnist", tmp_path)


def test_cifar100_format(tmp_path, no_checksums):
    written = _write_cifar(tmp_path, "cifar-100-python", ["train", "test"], "fine_labels", "meta",
                           "fine_label_names", 100)
    split = load_dataset("cifar100", tmp_path)
    assert split.spec.num_classes == 100
    assert split.train.labels.tolist() == [int(v) for v in written["train"][1]]


def test_svhn_format(tmp_path, no_checksums):
    from scipy.io import savemat

    rng = np.random.default_rng(2)
    for split_name, n in (("train", 5), ("test", 3)):
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = np.array([[10], [1], [2], [3], [4]][:n], dtype=np.uint8)
        savemat(tmp_path / f"{split_name}_32x32.mat", {"X": x, "y": y})
    split = load_dataset("svhn", tmp_path)
    assert tuple(split.train.images.shape) == (5, 3, 32, 32)
    assert split.train.labels.tolist() == [0, 1, 2, 3, 4]  # SVHN's label 10 is the digit 0


def test_missing_dataset_names_the_root_and_what_to_do(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"'cifar10' not found under data-root .*torchvision"):
        load_dataset("cifar10", tmp_path)
    with pytest.raises(KeyError, match="valid names: mnist5k, digits"):
        load_dataset("imagenet", tmp_path)


@pytest.mark.parametrize("name,n,shape", [("mnist5k", 5000, (1, 28, 28)), ("digits", 1797, (1, 8, 8))])
def test_builtin_datasets_split_without_overlap(name, n, shape):
    split = load_dataset(name, seed=3)
    assert len(split.train) + len(split.test) == n
    assert tuple(split.train.images.shape[1:]) == shape
    assert 0.0 <= float(split.train.images.min()) and float(split.train.images.max()) <= 1.0
    assert 0.19 < len(split.test) / n < 0.21
    # every class is in the held-out split (stratified)
    assert set(split.test.labels.tolist()) == set(range(10))


# Partitions -----------------------------------------------------------------------

LABELS = np.repeat(np.arange(10), 60)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "pathological"])
def test_partitions_are_disjoint_and_seeded(scheme):
    parts = partition_indices(LABELS, 5, scheme, alpha=0.5, classes_per_client=2, seed=1)
    flat = np.concatenate(parts)
    assert len(flat) == len(set(flat.tolist()))
    assert all(len(p) > 0 for p in parts)
    again = partition_indices(LABELS, 5, scheme, alpha=0.5, classes_per_client=2, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))


def test_iid_covers_everything_evenly():
    parts = partition_indices(LABELS, 4, "iid", seed=0)
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(LABELS)))
    assert {len(p) for p in parts} == {150}


def test_pathological_gives_k_classes_per_client():
    parts = partition_indices(LABELS, 5, "pathological", classes_per_client=2, seed=0)
    assert all(len(set(LABELS[p].tolist())) == 2 for p in parts)


@pytest.mark.parametrize("seed", range(20))
def test_pathological_leaves_no_class_without_an_owner(seed):
    # Flower's first-deterministic assignment left classes 8 and 9 to nobody with seed 11 (5 x 2 = 10 classes).
    parts = partition_indices(LABELS, 5, "pathological", classes_per_client=2, seed=seed)
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(LABELS)))  # every sample, once
    held = [frozenset(LABELS[p].tolist()) for p in parts]
    assert all(len(h) == 2 for h in held)


def test_pathological_pairings_are_drawn_by_the_seed_and_shared_classes_split_evenly():
    pairings = {tuple(sorted(tuple(sorted(set(LABELS[p].tolist()))) for p in
                             partition_indices(LABELS, 5, "pathological", classes_per_client=2, seed=s)))
                for s in range(10)}
    assert len(pairings) > 1
    parts = partition_indices(LABELS, 4, "pathological", classes_per_client=3, seed=3)  # 12 slots, 10 classes
    owners = np.zeros(10, dtype=int)
    for p in parts:
        for c in set(LABELS[p].tolist()):
            owners[c] += 1
            assert np.sum(LABELS[p] == c) in (60, 30)  # whole, or half of a class two clients share
    assert owners.min() >= 1 and owners.sum() == 12


def test_dirichlet_small_alpha_is_skewed_and_respects_min_size():
    parts = partition_indices(LABELS, 5, "dirichlet", alpha=0.1, min_partition_size=20, seed=0)
    assert all(len(p) >= 20 for p in parts)
    shares = [np.bincount(LABELS[p], minlength=10).max() / len(p) for p in parts]
    assert max(shares) > 0.3  # far from the 0.1 an IID split would give
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(LABELS)))


def test_partition_errors():
    with pytest.raises(ValueError, match="exceeds the 600 training samples"):
        partition_indices(LABELS, 601, "iid")
    with pytest.raises(ValueError, match="classes-per-client=11 exceeds the 10 classes"):
        partition_indices(LABELS, 2, "pathological", classes_per_client=11)
    with pytest.raises(ValueError, match="unknown partition scheme"):
        partition_indices(LABELS, 2, "shards")
    # every draw leaves some client under the floor (10, or an even share): the keys to change are named
    with pytest.raises(PartitionError, match=r"alpha=0.01 gave some client fewer than 10 of the 600 .*"
                                             r"num-clients=50"):
        partition_indices(LABELS, 50, "dirichlet", alpha=0.01, seed=0)


def test_label_counts():
    split = load_dataset("digits")
    counts = split.train.label_counts(10)
    assert sum(counts) == len(split.train) and len(counts) == 10
    assert torch.equal(split.train.subset([0, 1]).labels, split.train.labels[:2])
