import contextlib
import io
import warnings

import pytest
import torch

from grokinterp.config import ModelConfig, RunConfig, TaskConfig, TrainConfig

warnings.filterwarnings("ignore", message="HookedTransformer is deprecated", category=DeprecationWarning)


def tiny_config(**overrides) -> RunConfig:
    """A run that memorizes x+y mod 7 in a few dozen steps and takes well under a second per 100 steps."""
    base = RunConfig(
        task=TaskConfig(op="add", p=7, frac_train=0.6, data_seed=0),
        model=ModelConfig(n_layers=1, d_model=32, n_heads=2, d_head=16, d_mlp=64, model_seed=0),
        train=TrainConfig(steps=60, lr=1e-2, eval_every=5, checkpoints=6, log_checkpoints=4),
    )
    return base.replace(**overrides)


@pytest.fixture
def tiny():
    return tiny_config


@pytest.fixture
def float64_training(monkeypatch):
    """The training loop builds float64 models: for tests that compare two implementations over a
    trajectory. In float32 two summation orders part ways once a rounding difference flips a ReLU or Adam divides
    by a near-zero gradient, chaotically and by a different amount on each CPU (0.06 relative on an Intel Xeon
    where an AMD EPYC gave 3e-5); in float64 the same trajectories stay ~1e-13 apart. The float32 claim is made
    per step instead (gradient accuracy against float64, in test_fastpath and test_sweep)."""
    import grokinterp.trainer
    from grokinterp.model import build_model

    def build_float64(*args, **kwargs):
        with contextlib.redirect_stdout(io.StringIO()):  # TransformerLens announces the dtype change
            return build_model(*args, **kwargs).to(torch.float64)

    monkeypatch.setattr(grokinterp.trainer, "build_model", build_float64)


def cli_flags(sections: dict) -> list[str]:
    """The command-line flags that set these config values, given as ``{section: {field: value}}`` (the shape of
    ``RunConfig.to_dict()``); floats are written with repr, so they come back exactly."""
    flags = []
    for values in sections.values():
        for key, value in values.items():
            flag = "--" + key.replace("_", "-")
            if isinstance(value, bool):
                flags.append(flag if value else "--no-" + flag[2:])
            else:
                flags += [flag, repr(value) if isinstance(value, float) else str(value)]
    return flags
