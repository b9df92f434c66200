"""A teacher rebuilt from its ``fedkd.teacher.v1`` checkpoint, as it was trained: the registry architecture, the
GroupNorm variant DP-SGD trained (with its DP-released feature statistics), or a PATE client's shard teachers."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from fedkd.checkpoint import TEACHER_FORMAT, CheckpointError, check_teacher_fields, field_error, load_safe
from fedkd.institution.density import GaussianDensity, WithDensity, classes_from_counts, classifier_of
from fedkd.institution.privacy.dpsgd import attach_statistics, make_private_model
from fedkd.institution.privacy.pate import ShardVotes
from fedkd.institution.terms import attach_class_statistics
from fedkd.models import build_classifier, build_model, is_code_spec


def load_teacher(path: str | Path, *, expected_model: str | None = None,
                 num_classes: int | None = None,
                 input_shape: tuple[int, int, int] | None = None,
                 trust_code: bool = False, class_statistics: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a teacher from its checkpoint; fail clearly on a mismatch with what the run expects.

    With ``class_statistics`` the per-class BatchNorm statistics the checkpoint holds are attached to the model, so
    that its host computes the ``class-feature-statistics`` term (the checkpoint must hold them); without, they stay
    in the file.

    A checkpoint whose model is ``PACKAGE.MODULE:CALLABLE`` (a student built by the user's own code) is built
    only with ``trust_code``: a file never makes fedkd import code it names."""
    path = Path(path)
    ckpt = load_safe(path, TEACHER_FORMAT)
    check_teacher_fields(ckpt, path)
    name, shape = ckpt["model"], tuple(ckpt["input_shape"])
    if expected_model is not None and name != expected_model:
        raise CheckpointError(f"checkpoint {str(path)!r} holds a {name!r} teacher, but the config asks for "
                              f"{expected_model!r}; set teacher-model={name} or use another checkpoint")
    if num_classes is not None and ckpt["num_classes"] != num_classes:
        raise CheckpointError(f"checkpoint {str(path)!r} has {ckpt['num_classes']} classes, the dataset "
                              f"has {num_classes}")
    if input_shape is not None and shape != tuple(input_shape):
        raise CheckpointError(f"checkpoint {str(path)!r} takes inputs {shape}, the dataset has {tuple(input_shape)}")
    if is_code_spec(name) and not trust_code:
        raise CheckpointError(f"checkpoint {str(path)!r}: its model {name!r} is built by code that the file names, "
                              "and fedkd imports no code a file names; for your own run pass trust_code=True "
                              "(fedkd.load_student), or load student.pt2 with torch.export.load(path).module()")
    outputs = ckpt["num_classes"] + int(ckpt.get("unknown_output", False))  # "unknown" last (teacher-recipe)
    try:
        model = build_classifier(name, num_classes=outputs, channels=shape[0], image_size=shape[1:],
                                 args=ckpt.get("model_args") or None)
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {str(path)!r}: a {name!r} teacher cannot be built for inputs {shape}: "
                              f"{exc.args[0] if exc.args else exc}") from None
    mechanism = (ckpt.get("privacy") or {}).get("mechanism")
    if mechanism == "dp-sgd":
        model = make_private_model(model)  # the architecture DP-SGD trained (GroupNorm for BatchNorm)
        if ckpt["privacy"].get("feature_statistics"):
            attach_statistics(model)  # the DP-released statistics' places, filled by load_state_dict
    elif mechanism == "pate":
        if outputs != ckpt["num_classes"]:
            raise field_error(path, "unknown_output", "is true, but PATE shard teachers vote over the classes only")
        teachers = ckpt["privacy"].get("teachers")
        if not isinstance(teachers, int) or not 2 <= teachers <= 10_000:
            raise field_error(path, "privacy", f"records {teachers!r} PATE shard teachers, not an integer >= 2")
        members = [model] + [build_model(name, num_classes=ckpt["num_classes"], channels=shape[0],
                                         image_size=shape[1:]) for _ in range(teachers - 1)]
        model = ShardVotes(members, ckpt["num_classes"])
    try:
        model.load_state_dict(ckpt["state_dict"])
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"checkpoint {str(path)!r} does not match a {name!r} architecture: "
                              f"{str(exc).splitlines()[0][:300]}") from None
    if "density" in ckpt:  # teacher-density=on: the log-density of the client's own images as one output more
        if outputs != ckpt["num_classes"] or mechanism in ("dp-sgd", "pate"):
            raise field_error(path, "density", "is given, but the teacher already has an unknown output or is a "
                              f"{mechanism} teacher; a density goes with a closed teacher without DP-SGD or PATE")
        try:
            fields = dict(ckpt["density"])
            if fields.get("classes") is None and isinstance(fields.get("means"), Tensor):
                fields["classes"] = classes_from_counts(ckpt.get("label_counts"), len(fields["means"]))
            density = GaussianDensity(**fields)
        except (TypeError, ValueError) as exc:
            raise field_error(path, "density", str(exc)) from None
        if density.dims != math.prod(shape):
            raise field_error(path, "density", f"was fitted to inputs of {density.dims} values, the teacher takes "
                              f"{math.prod(shape)}")
        model = WithDensity(model, density)
    if class_statistics:
        if "class_statistics" not in ckpt:
            raise field_error(path, "class_statistics", "is missing: this teacher's institution computed no per-class "
                              "statistics (train it with teacher-class-statistics=on, or serve it without them)")
        try:
            attach_class_statistics(classifier_of(model), ckpt["class_statistics"], int(ckpt["num_classes"]))
        except ValueError as exc:
            raise field_error(path, "class_statistics", str(exc)) from None
    return model.eval(), ckpt
