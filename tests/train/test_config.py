"""Config values are checked when the config is built: one line naming the key, the value, what is allowed."""

from __future__ import annotations

import dataclasses

import pytest

from jestclip.models import APPROXIMATIONS
from jestclip.selection import LOSSES, SCORINGS, independent
from jestclip.train.config import (
    ConfigError,
    MethodConfig,
    TrainConfig,
    apply_overrides,
    from_dict,
    load_recipe,
    to_dict,
)
from jestclip.train.methods import METHODS
from jestclip.train.optim import OptimConfig
from jestclip.train.validation import field_types, type_problem

BAD_OVERRIDES = [
    ("steps=3.5", "config: steps = 3.5 is not an int"),
    ("steps=abc", "config: steps = 'abc' is not an int"),
    ("steps=true", "config: steps = True is not an int"),
    ("steps=0", "config: steps = 0 must be >= 1"),
    ("log_every=0", "config: log_every = 0 must be >= 1"),
    ("checkpoint_every=0", "config: checkpoint_every = 0 must be >= 1"),
    ("eval_every=-1", "config: eval_every = -1 must be >= 0"),
    ("stop_after=0", "config: stop_after = 0 must be >= 1"),
    ("eval_limit=0", "config: eval_limit = 0 must be >= 1"),
    ("num_workers=-1", "config: num_workers = -1 must be >= 0"),
    ("seed=-1", "config: seed = -1 must be in [0, 9223372036854775807]"),
    ("device=gpu", "config: device = 'gpu' is not 'auto' or a torch device"),
    ("filter_ratio=1", "config: filter_ratio = 1 must be in [0, 1)"),
    ("filter_ratio=-0.1", "config: filter_ratio = -0.1 must be in [0, 1)"),
    ("filter_ratio=NaN", "config: filter_ratio = nan is not a finite number"),
    ("reference_cache=3", "config: reference_cache = 3 is not a string or None"),
    ("method.batch_size=0", "config: method.batch_size = 0 must be >= 1"),
    ("method.batch_size=8.0", "config: method.batch_size = 8.0 is not an int"),
    ("method.n_chunks=0", "config: method.n_chunks = 0 must be >= 1"),
    ("method.gain=0", "config: method.gain = 0 must be > 0"),
    ("method.gain=Infinity", "config: method.gain = inf is not a finite number"),
    ("method.gain=true", "config: method.gain = True is not a finite number"),
    ("method.approx_fraction=1.5", "config: method.approx_fraction = 1.5 must be in [0, 1]"),
    ("method.method=random", f"config: method.method = 'random' is not one of {tuple(METHODS)}"),
    ("method.scoring=bar", f"config: method.scoring = 'bar' is not one of {SCORINGS}"),
    ("method.loss=hinge", f"config: method.loss = 'hinge' is not one of {LOSSES}"),
    ("method.approx=x", f"config: method.approx = 'x' is not one of {APPROXIMATIONS}"),
    (
        "method.independent_context=x",
        f"config: method.independent_context = 'x' is not one of {independent.CONTEXTS}",
    ),
    (
        "method.independent_method=x",
        f"config: method.independent_method = 'x' is not one of {independent.METHODS}",
    ),
    ("optim.lr=0", "config: optim.lr = 0 must be > 0"),
    ("optim.lr=-1e-3", "config: optim.lr = -0.001 must be > 0"),
    ("optim.weight_decay=-1", "config: optim.weight_decay = -1 must be >= 0"),
    ("optim.beta1=1", "config: optim.beta1 = 1 must be in [0, 1)"),
    ("optim.beta2=-0.5", "config: optim.beta2 = -0.5 must be in [0, 1)"),
    ("optim.warmup_fraction=1.0", "config: optim.warmup_fraction = 1.0 must be in [0, 1)"),
    ("optim.grad_clip=0", "config: optim.grad_clip = 0 must be > 0"),
    ("optim.eps=-1", "config: optim.eps = -1 must be >= 0"),
    ("method=iid", "config: method = 'iid' is a section; set its keys as method.KEY=VALUE"),
]


@pytest.mark.parametrize(("override", "message"), BAD_OVERRIDES, ids=[o for o, _ in BAD_OVERRIDES])
def test_bad_values_are_refused_when_the_config_is_built(override, message):
    with pytest.raises(ConfigError) as info:
        apply_overrides(TrainConfig(), [override])
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


def test_good_values_pass_and_json_ints_become_floats():
    cfg = apply_overrides(
        TrainConfig(),
        [
            "optim.lr=1",
            "method.gain=5",
            "filter_ratio=0",
            "stop_after=null",
            "eval_limit=10",
            "device=cuda:1",
        ],
    )
    assert (cfg.optim.lr, cfg.method.gain, cfg.filter_ratio) == (1.0, 5.0, 0.0)
    assert all(isinstance(x, float) for x in (cfg.optim.lr, cfg.method.gain, cfg.filter_ratio))
    assert (cfg.stop_after, cfg.eval_limit, cfg.device) == (None, 10, "cuda:1")
    assert from_dict(to_dict(cfg)) == cfg


def test_every_way_of_building_a_config_checks_it():
    with pytest.raises(ConfigError, match=r"^config: method\.scoring = 'bar' is not one of"):
        MethodConfig(scoring="bar")
    with pytest.raises(ConfigError, match=r"^config: steps = 0 must be >= 1"):
        TrainConfig(steps=0)
    with pytest.raises(ConfigError, match=r"^config: optim\.lr = -1\.0 must be > 0"):
        TrainConfig(optim=OptimConfig(lr=-1.0))
    with pytest.raises(ConfigError, match=r"^config: log_every = 0 must be >= 1"):
        dataclasses.replace(TrainConfig(), log_every=0)
    with pytest.raises(ConfigError, match=r"^config: method = 'iid' is not a MethodConfig"):
        TrainConfig(method="iid")
    with pytest.raises(ConfigError, match=r"^config: method\.batch_size = '8' is not an int"):
        from_dict({"method": {"batch_size": "8"}})
    with pytest.raises(ValueError, match=r"^config: unknown key 'method\.batch'; known here: \['method', "):
        from_dict({"method": {"batch": 8}})
    with pytest.raises(ValueError, match=r"^config: unknown key 'nope'"):
        from_dict({"nope": 1})


def test_every_config_field_has_a_checked_type():
    # a field whose annotation the checker does not understand would go unchecked: a new field (such as
    # max_bad_steps or keep_checkpoints) must have a plain annotation (int, float, str, bool, X | None, ...)
    for cls in (TrainConfig, MethodConfig, OptimConfig):
        for name, annotation in field_types(cls).items():
            assert type_problem(object(), annotation) is not None, f"{cls.__name__}.{name}: {annotation}"


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("max_bad_steps", 0, "config: max_bad_steps = 0 must be >= 1"),
        ("keep_checkpoints", 0, "config: keep_checkpoints = 0 must be >= 1"),
        ("reference_fingerprint", 3, "config: reference_fingerprint = 3 is not a string"),
    ],
)
def test_reliability_fields_are_checked(key, value, message):
    if key not in field_types(TrainConfig):
        pytest.skip(f"TrainConfig has no {key} yet")
    with pytest.raises(ConfigError) as info:
        apply_overrides(TrainConfig(), [f"{key}={value}"])
    assert str(info.value).startswith(message)


RECIPES = {
    "raises.py": (
        "def get_config(quick=False):\n    raise RuntimeError('boom\\nmore')\n",
        "RuntimeError: boom; more",
    ),
    "syntax.py": ("def get_config(quick=False)\n", "SyntaxError: "),
    "noget.py": ("x = 1\n", "defines no get_config(quick=False)"),
    "noquick.py": ("def get_config():\n    return None\n", "TypeError: "),
    "wrongtype.py": (
        "def get_config(quick=False):\n    return {}\n",
        "get_config returned dict, not TrainConfig",
    ),
    "invalid.py": (
        "from jestclip.train.config import TrainConfig\n"
        "def get_config(quick=False):\n    return TrainConfig(checkpoint_every=0)\n",
        "config: checkpoint_every = 0 must be >= 1",
    ),
    "recipe.txt": ("def get_config(quick=False):\n    return None\n", "is not a Python file"),
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_a_broken_recipe_is_one_line_naming_the_file(tmp_path, name):
    source, message = RECIPES[name]
    (tmp_path / name).write_text(source)
    with pytest.raises(ValueError) as info:
        load_recipe(tmp_path / name)
    assert str(info.value).startswith(f"recipe {tmp_path / name}") and message in str(info.value)
    assert "\n" not in str(info.value)


def test_a_missing_recipe_is_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"^recipe .*missing\.py does not exist$"):
        load_recipe(tmp_path / "missing.py")
    with pytest.raises(IsADirectoryError, match=r"is a directory, not a recipe file"):
        load_recipe(tmp_path)
