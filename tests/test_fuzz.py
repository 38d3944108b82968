"""Property tests: random configurations, flag values and damaged run files never end in a traceback.

Every outcome is either success or exit code 2 with one line on stderr that starts with ``grokinterp: error:``.
Training itself is replaced by a stand-in that stops once every check has passed and the run directory exists,
so the properties cover validation, not the optimizer. Raise GROKINTERP_FUZZ_EXAMPLES for a longer session.
"""

import dataclasses
import json
import math
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import grokinterp.trainer
from grokinterp.checkpoints import RunStore, load_run
from grokinterp.cli import main
from grokinterp.config import PRESETS, SECTIONS, ConfigError, RunConfig
from grokinterp.errors import GrokinterpError
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
    """Raised in place of training: every check passed."""


class _Accepted_list(list):
    def __repr__(self) -> str:
        return f"<{len(self)} accepted configs>"


@pytest.fixture
def no_training(monkeypatch):
    accepted = _Accepted_list()

    def stand_in(config, store, *args, **kwargs):
        accepted.append((config, store.path))
        raise _Accepted

    monkeypatch.setattr(grokinterp.trainer, "_train_locked", stand_in)
    return accepted


def _one_error_line(capsys) -> str:
    """The error, alone on stderr but for the one-line announcement a training command starts with."""
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith(("Training ",
                                                                                                  "Resuming "))]
    assert len(err) == 1 and err[0].startswith("grokinterp: error: "), err
    return err[0]


@FUZZ
@given(pairs=flag_pairs, bare=bare_flags, preset=st.sampled_from([None, *PRESETS]))
def test_train_flags_are_accepted_or_refused_in_one_line(no_training, capsys, pairs, bare, preset):
    argv = ["train", *(["--preset", preset] if preset else []), *pairs, *bare]
    capsys.readouterr()
    with tempfile.TemporaryDirectory() as tmp:
        cwd = os.getcwd()
        os.chdir(tmp)  # relative --out and --name land in the temporary folder
        try:
            n_accepted = len(no_training)
            try:
                code = main(argv)
            except _Accepted:
                config, path = no_training[-1]
                assert len(no_training) == n_accepted + 1
                # a config that passed validation is whole: finite numbers, and it round-trips through its file
                assert all(math.isfinite(v) for s in config.to_dict().values() for v in s.values()
                           if isinstance(v, float))
                assert load_run(path).config == config
                return
            if code == 2:
                _one_error_line(capsys)
                created = [p for p in Path(tmp).rglob("*") if p.is_dir() and (p / "config.json").exists()]
                assert not created or "--resume" in argv, f"refused input left a run behind: {created}"
            else:
                assert code == 0 and ("-h" in argv or any(a.startswith("--h") for a in argv)), (code, argv)
        finally:
            os.chdir(cwd)


json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20), st.integers(-5, 200),
                         st.floats(allow_nan=True, allow_infinity=True), st.floats(0, 1), text_values,
                         st.sampled_from(["add", "div", "x-y", "perm_mul", "relu", "LN", "adamw", "sgd"]))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(text_values, inner, max_size=3), max_leaves=6)
section_dicts = st.fixed_dictionaries(
    {}, optional={name: st.dictionaries(st.sampled_from([f.name for f in dataclasses.fields(cls)] + ["zzz"]),
                                        json_values, max_size=6)
                  for name, cls in SECTIONS.items()})


@FUZZ
@given(data=st.one_of(section_dicts, json_values))
def test_config_loader_accepts_or_refuses_with_a_config_error(data):
    text = json.dumps(data)  # Python writes NaN and Infinity, as a hand-edited file might hold them
    try:
        config = RunConfig.from_json(text)
    except ConfigError as err:
        assert "\n" not in str(err) and str(err)
        return
    assert RunConfig.from_json(config.to_json()) == config


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


@FUZZ
@given(victim=st.sampled_from(["config.json", "metrics.jsonl", "data.safetensors", "trainer_state.pt", "weights"]),
       how=st.sampled_from(["truncate", "flip", "splice", "replace"]), at=st.floats(0, 1),
       junk=st.binary(min_size=1, max_size=64))
def test_a_damaged_run_file_is_named_in_one_line(tiny_run, tmp_path_factory, capsys, victim, how, at, junk):
    import shutil

    run_dir = tmp_path_factory.mktemp("damaged") / "run"
    shutil.copytree(tiny_run, run_dir)
    store = RunStore(run_dir)
    file = run_dir / "weights" / f"step_{store.steps()[-1]:07d}.safetensors" if victim == "weights" else run_dir / victim
    original = file.read_bytes()
    file.write_bytes(_damage(original, how, at, junk))
    with tempfile.TemporaryDirectory() as out:
        for argv in (["analyze", str(run_dir), "--metric", "weight-norm", "--out", out, "--no-progress"],
                     ["train", "--resume", str(run_dir), "--steps", "24", "--no-progress"],
                     ["runs", str(run_dir.parent)]):
            capsys.readouterr()
            code = main(argv)
            if code == 2:
                line = _one_error_line(capsys)
                assert file.name in line, (argv, line)
            else:
                assert code == 0, argv
    # a damaged run is only ever read, never "repaired" into something else, by analysis or listing
    try:
        load_run(run_dir)
    except GrokinterpError as err:
        assert file.name in str(err)


grid_values = st.one_of(values, st.lists(st.one_of(st.integers(-2, 5).map(str), st.floats(-0.5, 1.5).map(repr),
                                                   values), min_size=1, max_size=3).map(",".join))
sweep_pairs = st.lists(st.tuples(st.sampled_from(["--seeds", "--fracs", "--weight-decays", "--group-size",
                                                  "--frac-train", "--model-seed", "--steps", "--p", "--op",
                                                  "--lr", "--name", "--device", "--bogus"]), grid_values),
                       max_size=6).map(lambda pairs: [t for pair in pairs for t in pair])


@FUZZ
@given(pairs=sweep_pairs, preset=st.sampled_from([None, *PRESETS]))
def test_sweep_flags_are_accepted_or_refused_in_one_line(monkeypatch, capsys, pairs, preset):
    import grokinterp.sweep

    def stand_in(configs, run_dirs, **kwargs):
        assert configs and len(configs) == len(run_dirs) == len(set(run_dirs))
        grokinterp.sweep.check_stackable(configs)
        raise _Accepted

    monkeypatch.setattr(grokinterp.sweep, "train_many", stand_in)
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
