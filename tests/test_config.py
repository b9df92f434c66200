import pytest

from fedkd.config import ConfigError, RunConfig, config_from_mapping, load_config_file, parse_assignments


def test_defaults_are_the_main_job():
    cfg = RunConfig()
    assert (cfg.dataset, cfg.num_clients, cfg.partition, cfg.alpha) == ("mnist5k", 5, "dirichlet", 0.5)
    assert (cfg.teacher_model, cfg.student_model, cfg.method) == ("lenet5", "lenet5-half", "cudfkd")


def test_kebab_keys_and_string_values_are_coerced():
    cfg = config_from_mapping({"batch-size": "64", "alpha": "0.1", "centralised": "true", "lambda-start": "1.5"})
    assert cfg.batch_size == 64 and cfg.alpha == 0.1 and cfg.centralised is True and cfg.lambda_start == 1.5
    assert config_from_mapping({"lambda-start": "auto"}).lambda_start is None


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
    ("epochs", "ten", "epochs: 'ten' is not a valid int"),
    ("epochs", 2.5, "epochs: 2.5 is not a valid int"),
    ("centralised", "maybe", "centralised: 'maybe' is not a valid bool"),
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
