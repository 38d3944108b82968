"""Property tests: random configurations, flag values and damaged run files never end in a traceback.

Every outcome is either success or exit code 2 with one line on stderr that starts with ``grokinterp: error:``.
Inputs are drawn so that most are valid (each field in its own range and type, with some junk mixed in), and
each test asserts the share it accepted, so the properties reach the code behind validation: accepted training
flags build the model and train it for a few steps. Raise GROKINTERP_FUZZ_EXAMPLES for a longer session.
"""

import dataclasses
import json
import math
import os
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import cli_flags
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from grokinterp.checkpoints import RunStore, load_run
from grokinterp.cli import main
from grokinterp.config import (
    ACT_FNS,
    GROKFAST_FILTERS,
    LOSSES,
    MAX_SEED,
    NORMALIZATIONS,
    OPTIMIZERS,
    PRESETS,
    SECTIONS,
    WD_TARGETS,
    ConfigError,
    RunConfig,
)
from grokinterp.errors import GrokinterpError
from grokinterp.tasks import OPERATIONS, get_operation
from grokinterp.trainer import train

EXAMPLES = int(os.environ.get("GROKINTERP_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

FIELDS = {f.name: f.type for cls in SECTIONS.values() for f in dataclasses.fields(cls)}
CONFIG_FLAGS = ["--" + name.replace("_", "-") for name in FIELDS]
BOOL_FLAGS = [f"--{prefix}{name.replace('_', '-')}" for name, kind in FIELDS.items() if kind is bool
              for prefix in ("", "no-")]

# what a person types: numbers of every size, the float spellings Python accepts, words, and stray unicode
text_values = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12)
values = st.one_of(
    st.integers(-3, 300).map(str),
    st.integers(-10**30, 10**30).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.floats(0, 1).map(repr),
    st.sampled_from(["nan", "inf", "-inf", "1e309", "0x10", "", " ", "1_000", "True", "none", "x+y", "x^3+x*y^2+y",
                     "div", "perm_mul", "LN", "gelu", "sgd", "cpu", "cuda", "cuda:7", "mps", "auto", "tpu", "-1"]),
    text_values,
)
flag_names = st.one_of(
    st.sampled_from(CONFIG_FLAGS + ["--preset", "--device", "--name", "--resume"]),
    st.sampled_from(["--bogus", "-x", "--", "--help-me", "--p=", "--steps=3"]),
)
flag_pairs = st.lists(st.tuples(flag_names, values), max_size=6).map(lambda pairs: [t for pair in pairs for t in pair])
bare_flags = st.lists(st.sampled_from(BOOL_FLAGS + ["--no-progress", "--verbose"]), max_size=2)


class _Accepted(Exception):
    """Raised in place of training a sweep: every check passed."""


def _one_error_line(capsys) -> str:
    """The error, alone on stderr but for the one-line announcement a training command starts with."""
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith(("Training ",
                                                                                                  "Resuming "))]
    assert len(err) == 1 and err[0].startswith("grokinterp: error: "), err
    return err[0]


# -- valid configurations: every field drawn within its own range, small enough to train in a blink ----------------
PRIMES = [5, 7, 11, 13, 17, 19, 23]
unit_floats = st.floats(0, 1, exclude_max=True)
FIELD_VALUES = {
    "task": {"op": st.sampled_from(sorted(OPERATIONS)), "p": st.sampled_from(PRIMES), "n": st.integers(2, 4),
             "frac_train": st.floats(0.3, 0.9), "data_seed": st.integers(0, MAX_SEED)},
    "model": {"n_layers": st.integers(1, 2), "d_model": st.integers(4, 24), "n_heads": st.integers(1, 3),
              "d_head": st.integers(2, 8), "d_mlp": st.integers(0, 32), "act_fn": st.sampled_from(ACT_FNS),
              "normalization": st.sampled_from(NORMALIZATIONS), "freeze_biases": st.booleans(),
              "model_seed": st.integers(0, MAX_SEED)},
    "train": {"steps": st.integers(1, 3), "batch_size": st.integers(0, 16), "optimizer": st.sampled_from(OPTIMIZERS),
              "lr": st.floats(1e-5, 0.1), "weight_decay": st.floats(0, 2), "beta1": unit_floats, "beta2": unit_floats,
              "warmup_steps": st.integers(0, 20), "eval_every": st.integers(1, 3), "checkpoints": st.integers(1, 3),
              "log_checkpoints": st.integers(0, 3), "stop_val_acc": st.floats(0, 1),
              "stop_patience": st.integers(0, 5), "fast_path": st.booleans(), "loss": st.sampled_from(LOSSES),
              "wd_target": st.sampled_from(WD_TARGETS), "weight_noise": st.floats(0, 0.1),
              "update_noise": st.floats(0, 0.1), "grad_noise": st.floats(0, 0.1), "dropout": st.floats(0, 0.5),
              "attn_dropout": st.floats(0, 0.5), "grokfast": st.sampled_from(GROKFAST_FILTERS),
              "grokfast_alpha": unit_floats, "grokfast_lamb": st.floats(0, 5), "grokfast_window": st.integers(1, 4),
              "orthograd": st.booleans(), "norm_scale": st.floats(0, 3)},
}
assert {k: set(v) for k, v in FIELD_VALUES.items()} == {name: {f.name for f in dataclasses.fields(cls)}
                                                      for name, cls in SECTIONS.items()}, "a field has no strategy"
SIZE_FIELDS = {"p", "n", "d_model", "d_mlp", "n_heads", "d_head", "n_layers", "steps", "checkpoints", "eval_every",
               "log_checkpoints", "batch_size"}  # always drawn, so junk can never ask for a large run
valid_sections = st.fixed_dictionaries(
    {name: st.fixed_dictionaries({k: v for k, v in fields.items() if k in SIZE_FIELDS},
                                 optional={k: v for k, v in fields.items() if k not in SIZE_FIELDS})
     for name, fields in FIELD_VALUES.items()})


def test_train_flags_are_accepted_or_refused_in_one_line(capsys):
    """Random valid flags (and some junk before them) either train a run whose saved config is exactly what was
    asked, or are refused in one line and leave no run behind."""
    outcomes = []

    @settings(FUZZ, max_examples=max(20, EXAMPLES // 2))  # each accepted example trains a run: half as many
    @given(sections=valid_sections, junk=st.lists(st.tuples(flag_names, values), max_size=2),
           bare=bare_flags, preset=st.sampled_from([None, *PRESETS]))
    def check(sections, junk, bare, preset):
        # the valid flags come last, so they win over junk that names the same field: the run stays small
        argv = ["train", *(["--preset", preset] if preset else []), *[t for pair in junk for t in pair], *bare,
                *cli_flags(sections), "--name", "run", "--device", "cpu", "--no-progress"]
        capsys.readouterr()
        with tempfile.TemporaryDirectory() as tmp:
            cwd = os.getcwd()
            os.chdir(tmp)  # the default --out lands in the temporary folder
            try:
                code = main(argv)
                if code == 0 and not any(a.startswith(("-h", "--h")) for a in argv):
                    run = load_run(Path(tmp) / "checkpoints" / "run")
                    asked = {k: v for values in sections.values() for k, v in values.items()}
                    saved = {k: v for values in run.config.to_dict().values() for k, v in values.items()}
                    assert {k: saved[k] for k in asked if k != "op"} == {k: v for k, v in asked.items() if k != "op"}
                    assert all(math.isfinite(v) for v in saved.values() if isinstance(v, float))
                    assert run.config.task.op == get_operation(asked.get("op", run.config.task.op)).name
                    rows = run.store.read_metrics()
                    stopped_at_init = run.trainer_state.stop_reason == "early_stop" and rows[-1]["step"] == 0
                    assert rows[0]["step"] == 0 and (1 <= rows[-1]["step"] <= run.config.train.steps
                                                     or stopped_at_init)  # the stop rule met by the initialization
                    assert run.steps[0] == 0 and run.steps[-1] == rows[-1]["step"] and run.trainer_state.finished
                    outcomes.append("trained")
                elif code == 2:
                    _one_error_line(capsys)
                    created = [p for p in Path(tmp).rglob("*") if p.is_dir() and (p / "config.json").exists()]
                    assert not created or "--resume" in argv, f"refused input left a run behind: {created}"
                    outcomes.append("refused")
                else:
                    assert code == 0, (code, argv)  # --help
            finally:
                os.chdir(cwd)

    check()
    assert outcomes.count("trained") >= 0.4 * len(outcomes), f"{outcomes.count('trained')} of {len(outcomes)} trained"
    assert outcomes.count("refused") >= 1


json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20), st.integers(-5, 200),
                         st.floats(allow_nan=True, allow_infinity=True), st.floats(0, 1), text_values,
                         st.sampled_from(["add", "div", "x-y", "perm_mul", "relu", "LN", "adamw", "sgd"]))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(text_values, inner, max_size=3), max_leaves=6)
section_dicts = st.fixed_dictionaries(
    {}, optional={name: st.dictionaries(st.sampled_from([f.name for f in dataclasses.fields(cls)] + ["zzz"]),
                                        json_values, max_size=6)
                  for name, cls in SECTIONS.items()})


def test_config_loader_accepts_or_refuses_with_a_config_error():
    """Valid config files round-trip exactly, keeping every value given; junk among them is refused in one line."""
    accepted = []

    @FUZZ
    @given(data=st.one_of(valid_sections, valid_sections, valid_sections, section_dicts, json_values),
           junk=st.one_of(st.none(), st.tuples(st.sampled_from(list(SECTIONS)),
                                               st.sampled_from(sorted(FIELDS) + ["zzz"]), json_values)))
    def check(data, junk):
        if junk is not None and isinstance(data, dict) and isinstance(data.get(junk[0]), dict):
            data[junk[0]][junk[1]] = junk[2]
        text = json.dumps(data)  # Python writes NaN and Infinity, as a hand-edited file might hold them
        try:
            config = RunConfig.from_json(text)
        except ConfigError as err:
            assert "\n" not in str(err) and str(err)
            return
        assert RunConfig.from_json(config.to_json()) == config
        for name, values in data.items():  # every value given is the value kept (op under its canonical name)
            for key, value in values.items():
                assert getattr(getattr(config, name), key) == (get_operation(value).name if key == "op" else value)
        accepted.append(config)

    check()
    assert len(accepted) >= 0.3 * EXAMPLES, f"only {len(accepted)} configs accepted"
    assert sum(config != RunConfig() for config in accepted) >= 0.2 * EXAMPLES  # the round trip sees real configs


@FUZZ
@given(text=st.one_of(st.text(max_size=200), st.binary(max_size=200).map(lambda b: b.decode("latin-1"))))
def test_config_loader_survives_arbitrary_text(text):
    try:
        RunConfig.from_json(text)
    except ConfigError as err:
        assert "\n" not in str(err)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from conftest import tiny_config

    path = tmp_path_factory.mktemp("fuzz") / "run"
    train(tiny_config(steps=20, checkpoints=4, log_checkpoints=2), path, device="cpu", progress=False)
    return path


analyze_flags = st.lists(st.tuples(st.sampled_from(["--steps", "--device", "--seed", "--metric", "--bogus"]),
                                   st.one_of(values, st.sampled_from(["weight-norm", "phases", "all", "0,5",
                                                                      "0:10", "5:", ":", "3", "0,,1", "10:0"]))),
                          max_size=4).map(lambda pairs: [t for pair in pairs for t in pair])


@FUZZ
@given(flags=analyze_flags, command=st.sampled_from(["analyze", "report", "runs"]))
def test_analysis_commands_on_a_real_run(tiny_run, capsys, flags, command):
    capsys.readouterr()
    if command == "analyze":
        # only the cheap metrics: the property is about the flags, not the sharpness computation
        if any(a in ("all", "sharpness", "fourier") for a in flags):
            return
        flags = ["--metric", "weight-norm", *flags]
    with tempfile.TemporaryDirectory() as out:
        argv = [command, str(tiny_run), *flags] if command != "runs" else [command, str(tiny_run.parent), *flags]
        if command in ("analyze", "report"):
            argv += ["--out", out]
        if command == "analyze":
            argv.append("--no-progress")
        code = main(argv)
        if code == 2:
            _one_error_line(capsys)
        else:
            assert code == 0, argv


# -- damaged files ------------------------------------------------------------------------------------------------

def _damage(data: bytes, how: str, at: float, junk: bytes) -> bytes:
    cut = int(at * len(data))
    if how == "truncate":
        return data[:cut]
    if how == "flip":
        return data[:cut] + bytes([data[cut] ^ 0xFF]) + data[cut + 1:] if cut < len(data) else data + junk
    if how == "splice":
        return data[:cut] + junk + data[cut + len(junk):]
    return junk


def _means_the_same(victim: str, original: bytes, damaged: bytes, scratch: Path) -> bool:
    """Whether the damage left what the file says unchanged (junk spliced over equal bytes, a cut at the very end,
    white space in a JSON header): such a file must load, and no command may refuse it."""
    if damaged == original:
        return True
    try:
        if victim == "config.json":
            return RunConfig.from_json(damaged.decode()) == RunConfig.from_json(original.decode())
        if victim in ("weights", "data.safetensors"):
            from safetensors import safe_open

            contents = []
            for i, raw in enumerate((original, damaged)):
                (scratch / f"{i}.safetensors").write_bytes(raw)
                with safe_open(scratch / f"{i}.safetensors", framework="pt") as f:
                    contents.append((f.metadata(), {k: f.get_tensor(k) for k in f.keys()}))
            (meta_a, a), (meta_b, b) = contents
            return meta_a == meta_b and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        if victim == "trainer_state.pt":
            import io

            from grokinterp.checkpoints import TrainerState, _state_digest

            a, b = (torch.load(io.BytesIO(raw), weights_only=True) for raw in (original, damaged))
            state = TrainerState(int(b["step"]), b["optimizer"], bool(b["finished"]), str(b["stop_reason"]))
            return a["sha256"] == b["sha256"] == _state_digest(state)
    except Exception:  # noqa: BLE001 -- whatever fails to parse does not mean the same
        return False
    return False


# which commands read which file, and so must refuse it when it is damaged
READS = {"analyze": {"config.json", "data.safetensors", "weights"},
         "train": {"config.json", "data.safetensors", "weights", "trainer_state.pt"},
         "runs": {"config.json"}}


@FUZZ
@given(victim=st.sampled_from(["config.json", "metrics.jsonl", "data.safetensors", "trainer_state.pt", "weights"]),
       how=st.sampled_from(["truncate", "flip", "splice", "replace"]), at=st.floats(0, 1),
       junk=st.binary(min_size=1, max_size=64))
def test_a_damaged_run_file_is_named_in_one_line(tiny_run, tmp_path_factory, capsys, victim, how, at, junk):
    """A command that reads a damaged file exits 2 naming it (a torn last line of the metrics log may be ignored);
    analysis and listing never change the damaged bytes."""
    import shutil

    run_dir = tmp_path_factory.mktemp("damaged") / "run"
    shutil.copytree(tiny_run, run_dir)
    store = RunStore(run_dir)
    file = run_dir / "weights" / f"step_{store.steps()[-1]:07d}.safetensors" if victim == "weights" else run_dir / victim
    original = file.read_bytes()
    damaged = _damage(original, how, at, junk)
    file.write_bytes(damaged)
    harmless = _means_the_same(victim, original, damaged, tmp_path_factory.mktemp("scratch"))
    with tempfile.TemporaryDirectory() as out:
        for argv in (["analyze", str(run_dir), "--metric", "weight-norm", "--out", out, "--no-progress"],
                     ["runs", str(run_dir.parent)],
                     ["train", "--resume", str(run_dir), "--steps", "24", "--no-progress"]):
            capsys.readouterr()
            code = main(argv)
            if code == 2:
                line = _one_error_line(capsys)
                assert file.name in line, (argv, line)
                assert not harmless, f"{argv[0]} refused a file that means what it meant: {line}"
            else:
                assert code == 0, argv
                captured = capsys.readouterr()
                if victim in READS[argv[0]] and not harmless:
                    # `runs` lists the other runs and names the damaged one on stderr; the others must refuse
                    assert argv[0] == "runs" and file.name in captured.err, (argv, captured.err)
            if argv[0] != "train" or code == 2:
                assert file.read_bytes() == damaged, f"{argv[0]} changed the damaged file"
    # a damaged run is only ever read, never "repaired" into something else, by analysis or listing
    try:
        load_run(run_dir)
    except GrokinterpError as err:
        assert file.name in str(err)


GRID_SPECS = ["op=add,div", "op=pow", "frac_train=0.2:0.8:0.2", "frac_train=0.8:0.2:0.1", "weight_noise=0,0.01",
              "weight_noise=-1", "dropout=0,1", "loss=ce,stablemax", "seed=0,1", "seed=a", "colour=red", "lr",
              "lr=", "steps=1:3:0", "orthograd=on,off", "grokfast=ema,ma"]
grid_values = st.one_of(values, st.lists(st.one_of(st.integers(-2, 5).map(str), st.floats(-0.5, 1.5).map(repr),
                                                   values), min_size=1, max_size=3).map(",".join))
sweep_pairs = st.lists(st.tuples(st.sampled_from(["--seeds", "--fracs", "--weight-decays", "--group-size",
                                                  "--frac-train", "--model-seed", "--steps", "--p", "--op",
                                                  "--lr", "--name", "--device", "--bogus", "--grid", "--launcher",
                                                  "--partition", "--time-limit", "--cpus-per-job", "--gpus-per-job",
                                                  "--members-per-job", "--slurm-param"]),
                                     st.one_of(grid_values, st.sampled_from(GRID_SPECS),
                                               st.sampled_from(["slurm", "local", "account=lab", "gpu"]))),
                       max_size=6).map(lambda pairs: [t for pair in pairs for t in pair])


@FUZZ
@given(pairs=sweep_pairs, preset=st.sampled_from([None, *PRESETS]))
def test_sweep_flags_are_accepted_or_refused_in_one_line(monkeypatch, capsys, pairs, preset):
    import grokinterp.slurm
    import grokinterp.sweep

    def stand_in(folder, names=None, **kwargs):
        members = grokinterp.sweep.read_manifest(folder)  # written, whole, before anything trains
        assert members and len({m.name for m in members}) == len(members)
        raise _Accepted

    monkeypatch.setattr(grokinterp.sweep, "run_members", stand_in)
    monkeypatch.setattr(grokinterp.slurm, "submit", lambda folder, *args, **kwargs: stand_in(folder))  # no sbatch
    argv = ["sweep", "--seeds", "0", "--fracs", "0.5", "--weight-decays", "1", *(["--preset", preset] if preset else []),
            *pairs, "--no-progress"]
    capsys.readouterr()
    with tempfile.TemporaryDirectory() as tmp:
        cwd = os.getcwd()
        os.chdir(tmp)
        try:
            code = main(argv)
        except _Accepted:
            return
        finally:
            os.chdir(cwd)
    if code == 2:
        _one_error_line(capsys)
    else:
        assert code == 0 and any(a.startswith("--h") for a in argv), (code, argv)
