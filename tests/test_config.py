import json

import pytest

from grokinterp.config import PRESETS, SECTIONS, ConfigError, RunConfig, TaskConfig, field_docs, get_preset


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_round_trip_through_json(name):
    config = PRESETS[name]
    assert RunConfig.from_json(config.to_json()) == config


def test_nanda2023_matches_the_paper():
    c = get_preset("nanda2023")
    assert (c.task.op, c.task.p, c.task.frac_train) == ("add", 113, 0.3)
    assert (c.model.n_layers, c.model.d_model, c.model.n_heads, c.model.d_head, c.model.d_mlp) == (1, 128, 4, 32, 512)
    assert c.model.act_fn == "relu" and c.model.normalization == "none" and c.model.freeze_biases
    assert (c.train.batch_size, c.train.lr, c.train.weight_decay, c.train.warmup_steps) == (0, 1e-3, 1.0, 10)
    assert (c.train.beta1, c.train.beta2, c.train.optimizer) == (0.9, 0.98, "adamw")


def test_power2022_matches_the_paper():
    c = get_preset("power2022")
    n_train = int(c.task.frac_train * 97 * 96)  # x/y leaves out y = 0
    assert c.task.p == 97 and c.model.n_layers == 2 and c.model.d_model == 128 and c.model.n_heads == 4
    assert c.train.batch_size == min(512, -(-n_train // 2))
    assert c.train.steps == 100_000


def test_formula_names_are_canonicalized():
    assert TaskConfig(op="x+y") == TaskConfig(op="add")


def test_replace_routes_fields_to_sections():
    c = RunConfig().replace(p=23, lr=0.01, d_model=64)
    assert (c.task.p, c.train.lr, c.model.d_model) == (23, 0.01, 64)
    with pytest.raises(ConfigError, match="unknown config field 'nope'"):
        RunConfig().replace(nope=1)


@pytest.mark.parametrize(
    "data, message",
    [
        ({"task": {"op": "nope"}}, "unknown operation 'nope'"),
        ({"train": {"lr": "fast"}}, "train.lr must be float"),
        ({"train": {"steps": 1.5}}, "train.steps must be int"),
        ({"model": {"freeze_biases": 1}}, "model.freeze_biases must be bool"),
        ({"train": {"colour": 1}}, r"unknown field\(s\) \['colour'\]"),
        ({"extra": {}}, "unknown config section"),
        ([], "JSON object"),
        ({"train": {"steps": 0}}, "--steps must be at least 1"),
        ({"train": {"optimizer": "lion"}}, "unknown --optimizer 'lion'; choose one of: adamw, adam, sgd"),
        ({"train": {"stop_val_acc": 2.0}}, "--stop-val-acc must lie in"),
        ({"model": {"normalization": "RMS"}}, "unknown --normalization"),
        ({"train": {"lr": float("inf")}}, "--lr must be positive and finite"),
        ({"train": {"weight_decay": float("nan")}}, "--weight-decay must be >= 0 and finite"),
        ({"train": {"weight_decay": 1.1125369292536007e-308}}, "--weight-decay 1.1125369292536007e-308 is below the "
                                                              "smallest normal float"),
        ({"model": {"model_seed": -1}}, r"--model-seed must lie in \[0, 4294967295\]"),
        ({"task": {"data_seed": 2**40}}, "--data-seed must lie in"),
        ({"model": {"d_model": 100_000, "d_mlp": 100_000}}, r"the model would have 20,074,500,497 parameters \(more than 1,000,000,000\)"),
    ],
)
def test_bad_configs_are_refused(data, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_dict(data)


def test_bad_json():
    with pytest.raises(ConfigError, match="not valid JSON"):
        RunConfig.from_json("{")


def test_every_field_is_documented():
    for section in SECTIONS.values():
        docs = field_docs(section)
        assert set(docs) == set(section.__dataclass_fields__)
        assert all(len(d) > 10 for d in docs.values())


def test_int_is_accepted_for_float_fields():
    c = RunConfig.from_dict(json.loads('{"train": {"lr": 1, "weight_decay": 0}}'))
    assert c.train.lr == 1.0 and isinstance(c.train.lr, float)


def test_parameter_count_is_the_models():
    from grokinterp.config import parameter_count
    from grokinterp.model import build_model

    for overrides in ({}, {"normalization": "LN", "n_layers": 2}, {"d_mlp": 0, "normalization": "LN"},
                      {"op": "perm_mul", "n": 4, "normalization": "LNPre"}):
        config = RunConfig().replace(**{"d_model": 32, "d_head": 8, "d_mlp": 64, "p": 11, **overrides})
        n_symbols = 11 if config.task.family == "mod" else 24
        model = build_model(config.model, n_symbols)
        assert parameter_count(config.task, config.model) == sum(p.numel() for p in model.parameters())
