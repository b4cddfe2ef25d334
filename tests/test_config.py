"""Config: YAML round trips, overrides, and one clear error per kind of mistake."""

from __future__ import annotations

import pytest
import yaml

from conftest import CONFIGS
from megatron.config import Config, ConfigError, config_from_dict, config_to_yaml, load_config, save_config

SIZES = ["560m", "1b1", "1b7", "3b", "7b1", "176b"]


def write(tmp_path, body: dict) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(body))
    return str(path)


def base(**sections) -> dict:
    body = {
        "model": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "vocab_size": 1000, "seq_length": 32},
        "training": {"micro_batch_size": 2, "global_batch_size": 8, "train_iters": 10},
    }
    for name, values in sections.items():
        body.setdefault(name, {}).update(values)
    return body


@pytest.mark.parametrize("size", SIZES + ["tiny"])
def test_shipped_configs_load_and_round_trip(size, tmp_path):
    name = size if size == "tiny" else f"bloom-{size}"
    cfg = load_config(CONFIGS / f"{name}.yaml")
    save_config(cfg, tmp_path / "again.yaml")
    assert load_config(tmp_path / "again.yaml") == cfg
    assert config_from_dict(yaml.safe_load(config_to_yaml(cfg))) == cfg


def test_176b_config_has_blooms_hyperparameters():
    cfg = load_config(CONFIGS / "bloom-176b.yaml")
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.model.num_attention_heads) == (70, 14336, 112)
    assert cfg.padded_vocab_size == 250880
    assert cfg.training.rampup_batch_size == [192, 16, 9765625]
    assert (cfg.optimizer.lr, cfg.optimizer.min_lr, cfg.optimizer.lr_warmup_samples) == (6e-5, 6e-6, 183105)
    assert cfg.data_parallel_size(384) == 8
    cfg.validate(world_size=384)


def test_overrides_parse_yaml_values(tmp_path):
    cfg = load_config(write(tmp_path, base()), ["model.num_layers=4", "training.rampup_batch_size=[2, 2, 100]",
                                                "training.bf16=true", "optimizer.lr=3e-4"])
    assert cfg.model.num_layers == 4 and cfg.training.bf16 is True
    assert cfg.training.rampup_batch_size == [2, 2, 100]
    assert cfg.optimizer.lr == pytest.approx(3e-4)


def test_yaml_float_without_dot_is_accepted(tmp_path):
    # PyYAML reads 6e-5 as a string; the config still treats it as the number it plainly is.
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(base()) + "optimizer:\n  lr: 6e-5\n  min_lr: 6e-6\n")
    assert load_config(path).optimizer.lr == pytest.approx(6e-5)


def test_hidden_not_divisible_by_heads(tmp_path):
    with pytest.raises(ConfigError, match=r"model.hidden_size \(64\) must be divisible by model.num_attention_heads \(6\)"):
        load_config(write(tmp_path, base(model={"num_attention_heads": 6})))


def test_vocab_padding_not_multiple_of_128_times_tp(tmp_path):
    body = base(model={"pad_vocab_size_to": 1152}, parallel={"tensor_model_parallel_size": 4})
    with pytest.raises(ConfigError, match=r"pad_vocab_size_to \(1152\) must be a multiple of .* 128 x 4 = 512: use 1536"):
        load_config(write(tmp_path, body))


def test_vocab_padding_rule_rounds_up_per_tp():
    cfg = load_config(CONFIGS / "bloom-560m.yaml", ["model.pad_vocab_size_to=null"])
    assert cfg.padded_vocab_size == 250752  # next multiple of 128
    cfg.parallel.tensor_model_parallel_size = 4
    assert cfg.padded_vocab_size == 250880  # next multiple of 512


def test_padding_smaller_than_vocab(tmp_path):
    with pytest.raises(ConfigError, match=r"smaller than model.vocab_size \(1000\): use 1024"):
        load_config(write(tmp_path, base(model={"pad_vocab_size_to": 896})))


@pytest.mark.parametrize("key, suggestion", [("n_layer", "num_layers"), ("num_layer", "num_layers"),
                                             ("hiden_size", "hidden_size"), ("n_head", "num_attention_heads")])
def test_unknown_field_suggests_the_right_name(tmp_path, key, suggestion):
    with pytest.raises(ConfigError, match=rf"unknown field 'model.{key}' \(did you mean '{suggestion}'\?\)"):
        load_config(write(tmp_path, base(model={key: 4})))


def test_unknown_override_suggests(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown field 'model.n_layer' \(did you mean 'num_layers'\?\)"):
        load_config(write(tmp_path, base()), ["model.n_layer=4"])


def test_unknown_section_suggests(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown section 'optimiser' \(did you mean 'optimizer'\?\)"):
        load_config(write(tmp_path, base(optimiser={"lr": 1.0})))


@pytest.mark.parametrize("section, key, value, expected", [
    ("model", "num_layers", "four", r"model.num_layers must be int, got str 'four'"),
    ("model", "num_layers", 2.5, r"model.num_layers must be int, got float 2.5"),
    ("training", "bf16", "yes please", r"training.bf16 must be true, false or auto"),
    ("optimizer", "lr", [1], r"optimizer.lr must be float, got list"),
    ("training", "rampup_batch_size", 5, r"training.rampup_batch_size must be a list, got int 5"),
])
def test_wrong_types_name_the_field(tmp_path, section, key, value, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(write(tmp_path, base(**{section: {key: value}})))


def test_the_error_names_the_file(tmp_path):
    path = write(tmp_path, base(model={"num_attention_heads": 6}))
    with pytest.raises(ConfigError, match=rf"^{path}: "):
        load_config(path)


@pytest.mark.parametrize("sections, expected", [
    ({"parallel": {"tensor_model_parallel_size": 8}}, r"num_attention_heads \(4\) must be divisible by parallel.tensor_model_parallel_size \(8\)"),
    ({"parallel": {"pipeline_model_parallel_size": 2, "zero_stage": 2}}, r"zero_stage=2 does not work with pipeline parallelism"),
    ({"parallel": {"pipeline_model_parallel_size": 4}}, r"num_layers \(2\) cannot be split over 4 pipeline stages"),
    ({"training": {"bf16": True, "fp16": True}}, r"bf16 and training.fp16 are both set"),
    ({"training": {"global_batch_size": 7}}, r"global_batch_size \(7\) must be a multiple of training.micro_batch_size \(2\)"),
    ({"training": {"rampup_batch_size": [4, 3, 100]}}, r"minus start \(4\) must be a non-negative multiple of the increment \(3\)"),
    ({"training": {"skip_train_iteration_range": ["10:20"]}}, r"skip_train_iteration_range entry '10:20' must look like 'START-END'"),
    ({"optimizer": {"lr_decay_style": "exp"}}, r"lr_decay_style must be constant, linear or cosine"),
    ({"optimizer": {"lr": 1e-4, "min_lr": 1e-3}}, r"min_lr .* must be between 0 and optimizer.lr"),
    ({"model": {"hidden_dropout": 1.5}}, r"model.hidden_dropout must be in \[0, 1\)"),
    ({"data": {"datasets": [{"name": "fr", "prefix": "p"}]}}, r"give every dataset a weight, or set data.alpha"),
    ({"data": {"split": "a,b"}}, r"data.split must be comma-separated numbers"),
])
def test_cross_field_rules(tmp_path, sections, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(write(tmp_path, base(**sections)))


def test_both_or_neither_length_of_run(tmp_path):
    with pytest.raises(ConfigError, match="exactly one of training.train_samples and training.train_iters"):
        load_config(write(tmp_path, base(training={"train_samples": 100})))


def test_world_size_rules(tmp_path):
    cfg = load_config(write(tmp_path, base(parallel={"tensor_model_parallel_size": 2})))
    with pytest.raises(ConfigError, match=r"world size 3 is not a multiple of .* = 2"):
        cfg.validate(world_size=3)
    with pytest.raises(ConfigError, match=r"global_batch_size \(8\) must be a multiple of micro_batch_size x data-parallel size = 2 x 8 = 16"):
        cfg.validate(world_size=16)
    cfg.validate(world_size=8)


def test_validation_needs_no_torch_state(tmp_path):
    # A bad config is refused from plain values: nothing distributed or allocated is needed.
    import torch.distributed as dist

    with pytest.raises(ConfigError):
        load_config(write(tmp_path, base(model={"num_attention_heads": 6})))
    assert not dist.is_initialized()


def test_default_config_is_valid_and_round_trips():
    cfg = Config()
    cfg.training.train_iters = 1
    assert config_from_dict(yaml.safe_load(config_to_yaml(cfg))) == cfg.validate()
