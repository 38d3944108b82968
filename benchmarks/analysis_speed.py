"""Speed of the S_n analyses, timed here rather than in the tests (a wall-clock bound in a test flakes on a busy
machine and means nothing on another CPU).

    python benchmarks/analysis_speed.py

* S5 group: the first build of ``SymmetricGroup(5)``'s irreps, character table and conjugacy classes in a process.
* S5 checkpoint rows: ``irrep_metrics`` and ``coset_metrics`` of one checkpoint of the default model (d_model 128,
  d_mlp 512) on the whole S5 table, with the group already built.

The rows are the median of five repeats, beside the CPU they ran on.
"""

import statistics
import time
import warnings

import torch

warnings.filterwarnings("ignore", message="HookedTransformer is deprecated", category=DeprecationWarning)

from train_speed import cpu_model  # noqa: E402  (run as a script, benchmarks/ is on sys.path)

from grokinterp.config import ModelConfig, RunConfig, TaskConfig  # noqa: E402
from grokinterp.groups import SymmetricGroup  # noqa: E402
from grokinterp.metrics.base import Checkpoint  # noqa: E402
from grokinterp.metrics.sn import coset_metrics, irrep_metrics  # noqa: E402
from grokinterp.model import build_model  # noqa: E402
from grokinterp.tasks import build_task  # noqa: E402


def median_seconds(work, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    print(f"CPU: {cpu_model()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}")

    def fresh_group():
        g = SymmetricGroup(5)  # a new instance: nothing cached yet
        return g.irreps, g.character_table, g.conjugacy_classes

    # the first build in a process is the one a user waits for (later instances reuse cached tables)
    print(f"S5 irreps, character table and classes, first build in this process: {median_seconds(fresh_group, 1):.3f} s")

    config = RunConfig(task=TaskConfig(op="perm_mul", n=5, frac_train=0.5), model=ModelConfig())
    data = build_task("perm_mul", 113, 5, 0.5, 0)
    ckpt = Checkpoint(step=0, model=build_model(config.model, data.n_symbols).eval(), data=data, config=config)
    irrep_metrics(ckpt), coset_metrics(ckpt)  # build and cache the group first
    seconds = median_seconds(lambda: (irrep_metrics(ckpt), coset_metrics(ckpt)))
    print(f"S5 checkpoint rows (irreps and cosets, default model, 14,400 pairs): {seconds:.3f} s")


if __name__ == "__main__":
    main()
