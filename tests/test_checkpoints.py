import pytest
import torch

from grokinterp.checkpoints import RunError, RunStore, checkpoint_schedule, load_run
from grokinterp.model import build_model
from grokinterp.tasks import build_task


def test_schedule_is_dense_early_and_regular_later():
    steps = checkpoint_schedule(10_000, n_regular=100, n_log=40)
    assert steps[0] == 0 and steps[-1] == 10_000
    assert steps == sorted(set(steps))
    assert {1, 2, 3, 4, 5} <= set(steps)  # log-spaced: every early step
    later = [s for s in steps if s > 1000]
    assert all(s % 100 == 0 for s in later)  # regular: every 100 steps
    assert 100 <= len(steps) <= 141


def test_schedule_of_a_tiny_budget():
    assert checkpoint_schedule(3, 10, 10) == [0, 1, 2, 3]


def test_weights_round_trip_exactly(tmp_path, tiny):
    config = tiny()
    data = build_task("add", 7, 5, 0.6, 0)
    store = RunStore.create(tmp_path / "run", config, data)
    model = build_model(config.model, data.n_symbols)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))  # weights no initializer would give
    store.write_weights(17, model.state_dict())
    run = load_run(tmp_path / "run")
    assert run.steps == [17]
    loaded = run.model(17)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert set(run.state_dict(17)) == {k for k in model.state_dict()}  # TransformerLens naming
    assert torch.equal(run.data.tokens, data.tokens) and torch.equal(run.split[0], data.train_idx)


def test_create_refuses_an_existing_directory(tmp_path, tiny):
    (tmp_path / "run").mkdir()
    with pytest.raises(RunError, match="already exists; pick another --name"):
        RunStore.create(tmp_path / "run", tiny(), build_task("add", 7, 5, 0.6, 0))


def test_create_where_it_cannot_leaves_nothing(tmp_path, tiny):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(RunError, match="could not create run directory .*a-file/run"):
        RunStore.create(blocker / "run", tiny(), build_task("add", 7, 5, 0.6, 0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_missing_step_and_missing_run(tmp_path, tiny):
    RunStore.create(tmp_path / "run", tiny(), build_task("add", 7, 5, 0.6, 0))
    run = load_run(tmp_path / "run")
    with pytest.raises(RunError, match="has no checkpoints yet"):
        run.model()
    with pytest.raises(RunError, match="no run at"):
        load_run(tmp_path / "nothing")


def test_corrupt_files_are_named(tmp_path, tiny):
    store = RunStore.create(tmp_path / "run", tiny(), build_task("add", 7, 5, 0.6, 0))
    (store.path / "config.json").write_text('{"train": {"lr": "x"}}')
    with pytest.raises(RunError, match=r"config.json: config field train.lr must be float"):
        load_run(store.path)
    (store.path / "data.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(RunError, match="data.safetensors is corrupt or truncated"):
        store.read_data()


def test_torn_last_metrics_line_is_ignored(tmp_path, tiny):
    store = RunStore.create(tmp_path / "run", tiny(), build_task("add", 7, 5, 0.6, 0))
    (store.path / "metrics.jsonl").write_text('{"step": 0, "val_acc": 0.1}\n{"step": 5, "val_')
    assert [r["step"] for r in store.read_metrics()] == [0]


def test_second_trainer_is_locked_out(tmp_path, tiny):
    store = RunStore.create(tmp_path / "run", tiny(), build_task("add", 7, 5, 0.6, 0))
    store.lock()
    try:
        with pytest.raises(RunError, match="being trained by another process"):
            RunStore(store.path).lock()
    finally:
        store.unlock()
    RunStore(store.path).lock()  # free again
