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
    store.write_weights(17, model.state_dict(), config)
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


def _flip_last_float_byte(file, tensor) -> None:
    """Flip one byte inside ``tensor``'s data in ``file`` (where a silent bit error would hit)."""
    raw = bytearray(file.read_bytes())
    at = raw.find(tensor.contiguous().numpy().tobytes())
    assert at > 0
    raw[at + tensor.numel() * tensor.element_size() - 1] ^= 0x01
    file.write_bytes(bytes(raw))


def test_a_flipped_bit_is_caught_by_the_checksums(tmp_path, tiny):
    from grokinterp.trainer import train

    run = train(tiny(steps=10, checkpoints=2, log_checkpoints=0), tmp_path / "run", device="cpu",
                progress=False).run
    weights_file = run.path / "weights" / "step_0000010.safetensors"
    _flip_last_float_byte(weights_file, run.state_dict(10)["unembed.W_U"])
    with pytest.raises(RunError, match=r"step_0000010.safetensors is corrupt: its contents do not match"):
        run.state_dict(10)
    # one bit of the task table: the first label 0 becomes 1, still a valid table, so only the checksum can tell
    labels = run.data.labels
    raw = bytearray((run.path / "data.safetensors").read_bytes())
    at = raw.find(labels.numpy().tobytes()) + int((labels == 0).nonzero()[0]) * labels.element_size()
    raw[at] ^= 0x01
    (run.path / "data.safetensors").write_bytes(bytes(raw))
    with pytest.raises(RunError, match=r"data.safetensors is corrupt: its contents do not match"):
        run.store.read_data()
    state = run.trainer_state
    _flip_last_float_byte(run.path / "trainer_state.pt", state.optimizer["state"][0]["exp_avg"])
    with pytest.raises(RunError, match=r"trainer_state.pt is corrupt: its contents do not match"):
        run.store.read_trainer_state()


def test_a_data_file_with_impossible_values_is_refused(tmp_path, tiny):
    from safetensors.torch import save_file

    data = build_task("add", 7, 5, 0.6, 0)
    store = RunStore.create(tmp_path / "run", tiny(), data)
    labels = data.labels.clone()
    labels[3] = 99  # a label outside the vocabulary, written without a checksum (as an older or foreign file)
    save_file({"tokens": data.tokens, "labels": labels, "train_idx": data.train_idx, "val_idx": data.val_idx},
              str(store.path / "data.safetensors"), metadata={"n_symbols": "7"})
    with pytest.raises(RunError, match="data.safetensors is corrupt: a label lies outside the vocabulary"):
        store.read_data()
    tokens = data.tokens.clone()
    tokens[5, 2] = 0
    save_file({"tokens": tokens, "labels": data.labels, "train_idx": data.train_idx, "val_idx": data.val_idx},
              str(store.path / "data.safetensors"), metadata={"n_symbols": "7"})
    with pytest.raises(RunError, match="data.safetensors is corrupt: a row does not end in the '=' token"):
        store.read_data()


def test_damaged_text_files_are_named(tmp_path, tiny):
    store = RunStore.create(tmp_path / "run", tiny(), build_task("add", 7, 5, 0.6, 0))
    (store.path / "metrics.jsonl").write_text('{"step": 0}\n[1, 2]\n{"step": 10}\n')
    with pytest.raises(RunError, match=r"metrics.jsonl line 2 is not a row of numbers with a step"):
        store.read_metrics()
    (store.path / "metrics.jsonl").write_text('{"step": 0}\n{"step": 5, "val_\n{"step": 10}\n')
    with pytest.raises(RunError, match=r"metrics.jsonl line 2 is not valid JSON"):
        store.read_metrics()
    (store.path / "config.json").write_bytes(b'{"task": {"op": "\xff"}}')
    with pytest.raises(RunError, match=r"config.json is corrupt: byte 17 is not UTF-8 text"):
        load_run(store.path)
