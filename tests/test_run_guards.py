"""Guards of issue 15: a run folder never gives a silent wrong answer or a traceback.

A hand-edited config.json is checked against the config that trained the checkpoints; a full disk (or a file-size
limit) ends in one line naming the file; stale temporaries of dead processes are cleaned up; and a config that
cannot fit in memory is refused before it starts. Every refusal is one line, exit 2.
"""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from grokinterp.checkpoints import RunError, load_run
from grokinterp.cli import main
from grokinterp.trainer import train

DELETE = object()


def _one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith(("Training ",
                                                                                                  "Resuming "))]
    assert len(err) == 1 and err[0].startswith("grokinterp: error: "), err
    return err[0]


@pytest.fixture
def trained(tmp_path, tiny):
    """A tiny finished run: 20 steps, checkpoints at 0, 10 and 20."""
    return train(tiny(steps=20, checkpoints=2, log_checkpoints=0), tmp_path / "run", device="cpu",
                 progress=False).run.path


def _edit_config(run_dir, section: str, key: str, value) -> None:
    file = run_dir / "config.json"
    config = json.loads(file.read_text())
    if value is DELETE:
        del config[section][key]
    else:
        config[section][key] = value
    file.write_text(json.dumps(config, indent=2))


def _strip_config_records(run_dir) -> None:
    """Rewrite every checkpoint as a run written before issue 15 would have it: no record of the training config."""
    for file in (run_dir / "weights").glob("step_*.safetensors"):
        with safe_open(file, framework="pt") as f:
            metadata = {k: v for k, v in (f.metadata() or {}).items() if not k.startswith("config")}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        save_file(tensors, str(file), metadata=metadata)


# -- §2: a hand-edited config.json ---------------------------------------------------------------------------------
EDITS = [("task", "p", 11, "task.p"), ("task", "op", "mul", "task.op"), ("model", "d_mlp", 32, "model.d_mlp"),
         ("train", "lr", 0.1, "train.lr"), ("train", "lr", DELETE, "train.lr")]


@pytest.mark.parametrize("section, key, value, field", EDITS, ids=[f"{e[3]}={e[2] is DELETE and 'deleted' or e[2]}"
                                                                    for e in EDITS])
def test_a_hand_edited_config_is_refused_on_resume_and_on_load(trained, tmp_path, capsys, section, key, value, field):
    _edit_config(trained, section, key, value)
    assert main(["train", "--resume", str(trained), "--steps", "30", "--no-progress"]) == 2
    line = _one_error_line(capsys)
    assert field in line and "config.json" in line and "restore" in line and "new run" in line, line
    if value is DELETE:
        assert "missing" in line, line
    assert load_run(trained).steps[-1] == 20  # nothing was trained
    assert main(["analyze", str(trained), "--metric", "weight-norm", "--out", str(tmp_path / "a"),
                 "--no-progress"]) == 2
    assert field in _one_error_line(capsys)
    with pytest.raises(RunError, match=field.replace(".", r"\.")):
        load_run(trained).model()
    assert main(["runs", str(trained.parent)]) == 0  # the listing shows no value training never used
    listing = capsys.readouterr()
    assert "run" not in listing.out.splitlines()[1:] and f"skipping {trained}" in listing.err and field in listing.err


def test_restoring_the_value_makes_the_run_usable_again(trained, capsys):
    original = (trained / "config.json").read_text()
    _edit_config(trained, "train", "lr", 0.1)
    assert main(["train", "--resume", str(trained), "--steps", "30", "--no-progress"]) == 2
    (trained / "config.json").write_text(original)
    assert main(["train", "--resume", str(trained), "--steps", "30", "--no-progress"]) == 0
    assert load_run(trained).steps[-1] == 30


def test_a_larger_budget_after_a_resume_killed_before_its_first_checkpoint(trained, capsys):
    # a resume rewrites config.json with the new budget before its first new checkpoint; killed there, the
    # checkpoints still record the old budget, which is a change resume allows
    _edit_config(trained, "train", "steps", 40)
    assert main(["train", "--resume", str(trained), "--steps", "50", "--no-progress"]) == 0
    assert load_run(trained).steps[-1] == 50
    load_run(trained).model(0)


def test_weights_that_do_not_fit_the_config_name_the_file_and_tensor(trained):
    _strip_config_records(trained)
    _edit_config(trained, "model", "d_mlp", 32)
    with pytest.raises(RunError, match=r"step_0000020.safetensors: blocks.0.mlp.W_in has shape \(32, 64\), but "
                                       r"config.json's model builds \(32, 32\)"):
        load_run(trained).model()


@pytest.mark.parametrize("section, key, value", [("task", "p", 11), ("task", "op", "mul"),
                                                 ("task", "frac_train", 0.5)])
def test_a_run_from_before_the_config_record_is_checked_against_its_task_table(trained, capsys, section, key, value):
    _strip_config_records(trained)
    load_run(trained).model()  # unedited: loads
    _edit_config(trained, section, key, value)
    with pytest.raises(RunError, match=r"data.safetensors .* not the table config.json's task section builds"):
        load_run(trained).model()
    assert main(["train", "--resume", str(trained), "--steps", "30", "--no-progress"]) == 2
    assert "data.safetensors" in _one_error_line(capsys)


def test_a_run_from_before_the_config_record_still_loads_and_resumes(trained):
    _strip_config_records(trained)
    before = load_run(trained).state_dict(20)
    assert all(torch.equal(before[k], v) for k, v in load_run(trained).model(20).state_dict().items() if k in before)
    assert main(["train", "--resume", str(trained), "--steps", "30", "--no-progress"]) == 0
