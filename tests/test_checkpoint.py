import pytest
import torch

from fedkd.checkpoint import CheckpointError, save_atomic, save_teacher
from fedkd.institution.loading import load_teacher
from fedkd.models import build_model


def _save(path, name="lenet5"):
    model = build_model(name, num_classes=10, channels=1, image_size=8)
    save_teacher(path, model, model_name=name, num_classes=10, input_shape=(1, 8, 8), num_samples=5,
                 label_counts=[1] * 10, mean=(0.5,), std=(0.25,))
    return model


def test_round_trip(tmp_path):
    model = _save(tmp_path / "t.pt")
    loaded, meta = load_teacher(tmp_path / "t.pt", expected_model="lenet5", num_classes=10, input_shape=(1, 8, 8))
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(loaded(x), model.eval()(x))
    assert meta["num_samples"] == 5


def test_corrupt_file_names_the_file(tmp_path):
    path = tmp_path / "t.pt"
    _save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"t\.pt' is corrupt or not a fedkd checkpoint"):
        load_teacher(path)
    (tmp_path / "junk.pt").write_text("hello")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_teacher(tmp_path / "junk.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_teacher(tmp_path / "missing.pt")


def test_pickled_objects_are_refused(tmp_path):
    from fractions import Fraction  # any class outside torch's weights-only allow-list

    torch.save({"format": "fedkd.teacher.v1", "payload": Fraction(1, 3)}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="corrupt or not a fedkd checkpoint"):
        load_teacher(tmp_path / "evil.pt")


def test_other_architecture_or_format_is_refused(tmp_path):
    _save(tmp_path / "t.pt", "cnn")
    with pytest.raises(CheckpointError, match="holds a 'cnn' teacher, but the config asks for 'lenet5'"):
        load_teacher(tmp_path / "t.pt", expected_model="lenet5")
    with pytest.raises(CheckpointError, match="has 10 classes, the dataset has 100"):
        load_teacher(tmp_path / "t.pt", num_classes=100)
    save_atomic({"format": "something.else"}, tmp_path / "o.pt")
    with pytest.raises(CheckpointError, match="not a fedkd.teacher.v1 checkpoint"):
        load_teacher(tmp_path / "o.pt")
    ckpt = torch.load(tmp_path / "t.pt", weights_only=True)
    ckpt["model"] = "lenet5"  # claims lenet5 but holds cnn weights
    save_atomic(ckpt, tmp_path / "lie.pt")
    with pytest.raises(CheckpointError, match="does not match a 'lenet5' architecture"):
        load_teacher(tmp_path / "lie.pt")
