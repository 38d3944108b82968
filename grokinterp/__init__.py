"""grokinterp: train small transformers that grok, keep dense checkpoints, and analyse the transition.

    import grokinterp
    run = grokinterp.load_run("checkpoints/my_run")
    run.steps, run.metrics, run.model(run.steps[-1]), run.split
"""

from grokinterp.checkpoints import Run, RunError, find_runs, load_run
from grokinterp.config import PRESETS, ConfigError, ModelConfig, RunConfig, TaskConfig, TrainConfig, get_preset
from grokinterp.groups import SymmetricGroup
from grokinterp.tasks import OPERATIONS, TaskData, build_task

__all__ = [
    "OPERATIONS", "PRESETS", "ConfigError", "ModelConfig", "Run", "RunConfig", "RunError", "SymmetricGroup",
    "TaskConfig", "TaskData", "TrainConfig", "build_model", "build_task", "find_runs", "get_preset", "load_run",
    "train",
]


def __getattr__(name: str):
    # The training loop and model builder import transformer_lens (seconds); load them on first use.
    if name == "train":
        from grokinterp.trainer import train

        return train
    if name == "build_model":
        from grokinterp.model import build_model

        return build_model
    raise AttributeError(f"module 'grokinterp' has no attribute {name!r}")
