import warnings

import pytest

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
