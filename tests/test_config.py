import pytest

from fedkd.config import (
    KEYS,
    RunConfig,
    config_from_mapping,
    config_from_run_config,
    load_config_file,
    parse_assignments,
)
from fedkd.coordinator.methods import METHODS
from fedkd.coordinator.methods.cudfkd import CuDFKDOptions
from fedkd.options import ConfigError


def test_defaults_are_the_main_job():
    cfg = RunConfig()
    assert (cfg.dataset, cfg.num_clients, cfg.partition, cfg.alpha) == ("mnist5k", 5, "dirichlet", 0.5)
    assert (cfg.teachers.model, cfg.student.model, cfg.method) == ("lenet5", "lenet5", "cudfkd")
    # few student steps along the way, many on the final pool (docs/results.md, issue 26)
    assert (cfg.student_steps, cfg.student.refit) == (5, 8.0)


def test_command_line_text_is_converted_to_each_keys_type():
    values = parse_assignments(["batch-size=64", "alpha=0.1", "centralised=true", "cudfkd.lambda-start=1.5"])
    cfg = config_from_mapping(values)
    assert cfg.batch_size == 64 and cfg.alpha == 0.1 and cfg.centralised is True and cfg.options.lambda_start == 1.5
    assert config_from_mapping({"cudfkd.lambda-start": "auto"}).options.lambda_start is None


@pytest.mark.parametrize("key,value", [("epochs", "5"), ("alpha", "0.1"), ("centralised", "true")])
def test_a_typed_source_does_not_coerce_strings(key, value):
    # TOML and Flower's run config carry types: a quoted number is a mistake, named, not silently converted
    with pytest.raises(ConfigError, match=f"{key}: '{value}' is a string, the key takes .*without quotes"):
        config_from_mapping({key: value})


@pytest.mark.parametrize("key", ["num-clients", "epochs", "pool-size"])
def test_a_float_is_not_taken_as_an_integer(tmp_path, key):
    """TOML's 3.0 is a float: an integer key refuses it, naming the key (it was truncated to 3)."""
    from fedkd.config import load_config_file

    card = tmp_path / "exp.toml"
    card.write_text(f"{key} = 3.0\n")
    with pytest.raises(ConfigError, match=f"{key}: 3.0 is a float, the key takes an integer; write it without a "
                                          "decimal point"):
        config_from_mapping(load_config_file(card))
    assert config_from_mapping(parse_assignments([f"{key}=3"])).to_dict()[key] == 3  # the command line: text


def test_unknown_key_names_the_key_and_suggests():
    with pytest.raises(ConfigError, match="unknown config key 'batchsize'.*'batch-size'"):
        config_from_mapping({"batchsize": 3})


def test_snake_case_key_is_rejected_with_the_kebab_spelling():
    with pytest.raises(ConfigError, match="'batch_size'.*'batch-size'"):
        config_from_mapping({"batch_size": 3})


@pytest.mark.parametrize("key,value,message", [
    ("num-clients", 0, "num-clients: 0 is out of range"),
    ("alpha", 0.0, "alpha: 0.0 is out of range"),
    ("partition", "random", "partition: 'random' is not one of"),
    ("epochs", parse_assignments(["e=ten"])["e"], "epochs: 'ten' is not an integer"),
    ("epochs", 2.5, "epochs: 2.5 is a float, the key takes an integer"),
    ("centralised", parse_assignments(["c=maybe"])["c"], "centralised: 'maybe' is not true or false"),
    ("student-momentum", 1.5, "student-momentum: 1.5 is out of range"),
])
def test_bad_values_name_the_key(key, value, message):
    with pytest.raises(ConfigError, match=message):
        config_from_mapping({key: value})


def test_teacher_model_per_client():
    cfg = config_from_mapping({"num-clients": 3, "teacher-model": "lenet5, cnn,lenet5"})
    assert cfg.teacher_models() == ["lenet5", "cnn", "lenet5"]
    assert config_from_mapping({"num-clients": 2}).teacher_models() == ["lenet5", "lenet5"]
    with pytest.raises(ConfigError, match="teacher-model: got 2 names"):
        config_from_mapping({"num-clients": 3, "teacher-model": "lenet5,cnn"})


def test_parse_assignments():
    assert parse_assignments(["a=1", "b = x=y"]) == {"a": "1", "b": "x=y"}
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_assignments(["epochs"])


def test_config_file_top_level_and_flower_table(tmp_path):
    flat = tmp_path / "a.toml"
    flat.write_text('dataset = "digits"\nepochs = 3\n')
    assert config_from_mapping(load_config_file(flat)).epochs == 3
    flwr = tmp_path / "pyproject.toml"
    flwr.write_text('[tool.flwr.app.config]\nnum-clients = 4\n')
    assert config_from_mapping(load_config_file(flwr)).num_clients == 4
    bad = tmp_path / "b.toml"
    bad.write_text("epochs = [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config_file(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config_file(tmp_path / "missing.toml")


def test_round_trip_through_dict():
    cfg = config_from_mapping({"epochs": 7, "teacher-model": "cnn"})
    assert config_from_mapping(cfg.to_dict()) == cfg


def test_method_options_are_namespaced_and_validated():
    cfg = config_from_mapping({"cudfkd.weight-bn": 5, "cudfkd.self-paced": "hard", "epochs": 3})
    assert isinstance(cfg.options, CuDFKDOptions)
    assert cfg.options.weight_bn == 5.0 and cfg.options.self_paced == "hard" and cfg.epochs == 3
    assert cfg.to_dict()["cudfkd.weight-bn"] == 5.0 and "weight-bn" not in cfg.to_dict()
    # on top of a base, the base's options are kept
    again = config_from_mapping({"cudfkd.adv-step": 1.0}, base=cfg)
    assert (again.options.weight_bn, again.options.adv_step) == (5.0, 1.0)


@pytest.mark.parametrize("values,message", [
    ({"cudfkd.wieght-bn": 1}, r"unknown option of method 'cudfkd' 'cudfkd.wieght-bn'; did you mean 'cudfkd.weight-bn'"),
    ({"cudfkd.weight-bn": -1}, r"cudfkd.weight-bn: -1.0 is out of range"),
    ({"cudfkd.self-paced": "linear"}, r"cudfkd.self-paced: 'linear' is not one of log, soft, hard, none"),
    ({"cudfkd.admit-start": "lots"}, r"cudfkd.admit-start: 'lots' is a string, the key takes a number"),
    ({"dafl.weight-bn": 1}, r"unknown option of method 'dafl' 'dafl.weight-bn'; did you mean 'dafl.weight-onehot'"),
    ({"dafi.weight-bn": 1}, r"unknown config key 'dafi.weight-bn': 'dafi' is not a method.*cudfkd, tadfkd"),
    ({"weight-bn": 1}, r"unknown config key 'weight-bn'; did you mean 'cudfkd.weight-bn'"),
    ({"method": "tadfkd", "weight-bn": 1}, r"unknown config key 'weight-bn'; did you mean 'tadfkd.weight-bn'"),
    ({"method": "dafi"}, r"method: 'dafi' is not one of cudfkd, tadfkd, rdskd, hidfd, dafl, dfad, deepinversion"),
])
def test_bad_method_options_name_the_key(values, message):
    with pytest.raises(ConfigError, match=message):
        config_from_mapping(values)


def test_options_of_a_method_that_is_not_selected_are_refused(monkeypatch):
    from dataclasses import dataclass

    from fedkd.coordinator.methods import MethodEntry

    @dataclass(frozen=True)
    class OtherOptions:
        weight: float = 1.0

    monkeypatch.setitem(METHODS, "other", MethodEntry("other", lambda ctx: None, OtherOptions, "a second method"))
    with pytest.raises(ConfigError, match=r"cudfkd.weight-bn: option of method 'cudfkd', but method=other.*"
                                          r"valid keys of other: other.weight"):
        config_from_mapping({"method": "other", "cudfkd.weight-bn": 2})
    cfg = config_from_mapping({"method": "other", "other.weight": 3})
    assert isinstance(cfg.options, OtherOptions) and cfg.to_dict()["other.weight"] == 3.0
    # Flower's run config carries every method's defaults from pyproject.toml: those pass, changes do not
    run_config = {**RunConfig().to_dict(), "method": "other", "cudfkd.lambda-start": "auto",
                  "cudfkd.lambda-growth": "auto"}
    assert config_from_run_config(run_config).method == "other"
    with pytest.raises(ConfigError, match="cudfkd.*option of method 'cudfkd', but method=other"):
        config_from_run_config({**run_config, "cudfkd.weight-bn": 1.0})
    # replace() to another method gives that method's defaults
    assert isinstance(RunConfig().replace(method="other").options, OtherOptions)


def test_namespaced_config_round_trips_toml_set_and_flower(tmp_path):
    from fedkd.config import parse_assignments as parse

    toml = tmp_path / "exp.toml"
    toml.write_text('epochs = 3\n[cudfkd]\nweight-bn = 5.0\nadv-mask = "none"\n')
    from_toml = config_from_mapping(load_config_file(toml))
    from_set = config_from_mapping(parse(["epochs=3", "cudfkd.weight-bn=5", "cudfkd.adv-mask=none"]))
    flwr = tmp_path / "pyproject.toml"
    flwr.write_text('[tool.flwr.app.config]\nepochs = 3\n[tool.flwr.app.config.cudfkd]\nweight-bn = 5.0\n'
                    'adv-mask = "none"\n')
    from_flower_table = config_from_mapping(load_config_file(flwr))
    # Flower flattens nested run-config tables to dotted keys
    from_flower = config_from_run_config({"epochs": 3, "cudfkd.weight-bn": 5.0, "cudfkd.adv-mask": "none"})
    assert from_toml == from_set == from_flower_table == from_flower
    assert from_toml.options.weight_bn == 5.0 and from_toml.options.adv_mask == "none"
    assert config_from_mapping(from_toml.to_dict()) == from_toml
    bad = tmp_path / "bad.toml"
    bad.write_text("[data]\nx = 1\n")
    with pytest.raises(ConfigError, match=r"unexpected table \[data\].*named after it "
                                          r"\(cudfkd, tadfkd, rdskd, hidfd, dafl, dfad, deepinversion\)"):
        load_config_file(bad)


def _every_key():
    """(key, field) for every run-wide key and every method option."""
    import dataclasses

    keys = [(key, holder) for key, (_, holder) in KEYS.items()]
    for entry in METHODS.values():
        keys += [(f"{entry.name}.{f.name.replace('_', '-')}", f) for f in dataclasses.fields(entry.options)]
    return keys


def _bad_values(field):
    """Typed values (as TOML would carry them) that the key must refuse: NaN, +-inf, a huge integer, a wrong
    type, and a value just outside its range or choices."""
    kind = field.type if isinstance(field.type, str) else field.type.__name__
    meta = field.metadata
    values = [float("nan"), float("inf"), float("-inf"), 10**20, [1]]
    if kind.startswith("str"):
        values = [v for v in values if not isinstance(v, float)] + [1.5, True]
    elif kind.startswith("bool"):
        values += [1, "true"]  # a TOML string is not a boolean
    elif kind.startswith("int"):
        values += [2.5, "5", True]
    else:
        values += ["0.5", True]
    if "choices" in meta:
        values.append("no-such-choice")
    if meta.get("low") is not None:
        values.append(meta["low"] - 1 if not meta.get("open_low") else meta["low"])
    if meta.get("high") is not None:
        values.append(meta["high"] + 1 if kind.startswith("int") else meta["high"] * 2 + 1)
    return values


@pytest.mark.parametrize("key,field", _every_key(), ids=[k for k, _ in _every_key()])
def test_every_key_refuses_non_finite_huge_mistyped_and_out_of_range_values(key, field):
    values = {"method": key.split(".")[0]} if "." in key else {}
    for value in _bad_values(field):
        with pytest.raises(ConfigError) as caught:
            config_from_mapping({**values, key: value})
        assert str(caught.value).startswith(f"{key}:") or f"'{key}'" in str(caught.value), (value, caught.value)


@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "1e400", "99999999999999999999"])
def test_non_finite_or_huge_text_on_the_command_line_is_refused_for_every_number_key(text):
    for key, field in _every_key():
        kind = field.type if isinstance(field.type, str) else field.type.__name__
        if not kind.startswith(("int", "float")):
            continue
        with pytest.raises(ConfigError, match=f"^{key}: "):
            config_from_mapping(parse_assignments([f"{key}={text}"]))


def test_student_refit_warp_without_blends_is_refused_naming_both_keys():
    with pytest.raises(ConfigError, match=r"student-refit-warp=15 warps the blends of student-refit-mixup, which is 0"):
        config_from_mapping({"student-refit-warp": 15})
    config = config_from_mapping({"student-refit-warp": 15, "student-refit-mixup": 0.5})
    assert config.student.refit_warp == 15.0 and config.student.refit_mixup == 0.5
