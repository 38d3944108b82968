"""Analyses computed in forked worker processes (``analyze_metrics(workers=...)``, ``--workers``).

These tests fork the test process, or interrupt a command that forks.
"""

import pandas as pd
import pytest
from test_analyze import _tiny_run, tiny_run  # noqa: F401, F811  (a fixture)

from grokinterp.analyze import analysis_dir
from grokinterp.checkpoints import load_run
from grokinterp.errors import AnalysisError, RunError


def test_workers_give_the_rows_of_one_process_and_name_or_skip_what_they_cannot_read(tiny_run, tmp_path):  # noqa: F811
    import shutil

    from grokinterp.analyze import analyze_metrics

    copy = tmp_path / "copy"
    shutil.copytree(tiny_run.path, copy)
    run = load_run(copy)
    names = ["weight-norm", "fourier", "sharpness", "clock-pizza"]
    params = {"sharpness": {"max_samples": 4, "lanczos_iters": 4, "max_hutchinson_samples": 4}}
    for workers, device, message in ((0, "cpu", "workers must be at least 1, got 0"),
                                     (2, "cuda", "workers analyse on CPU threads; on cuda use one")):
        with pytest.raises(AnalysisError, match=message):
            analyze_metrics(run, names, out_root=tmp_path / "refused", workers=workers, device=device)
    assert not (tmp_path / "refused").exists()
    serial = analyze_metrics(run, names, out_root=tmp_path / "one", progress=False, params=params, workers=1)
    forked = analyze_metrics(run, names, out_root=tmp_path / "two", progress=False, params=params, workers=2)
    for one, two in zip(serial, forked):
        assert two.computed == len(run.steps)
        pd.testing.assert_frame_equal(one.table, two.table, rtol=1e-4)  # one thread a worker: float rounding
    # a checkpoint whose bytes no longer match its digest fails inside a worker: it is named, or skipped
    bad = run.steps[3]
    weights = copy / "weights" / f"step_{bad:07d}.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(RunError, match=f"step_{bad:07d}"):
        analyze_metrics(run, names, out_root=tmp_path / "three", progress=False, params=params, workers=2)
    assert not (analysis_dir(run, tmp_path / "three") / "fourier.csv").exists()
    skipped = analyze_metrics(run, names, out_root=tmp_path / "three", progress=False, params=params, workers=2,
                              skip_corrupt=True)
    for one, result in zip(serial, skipped):
        assert result.skipped == [bad] and list(result.table.step) == [s for s in run.steps if s != bad]
        pd.testing.assert_frame_equal(result.table, one.table[one.table.step != bad].reset_index(drop=True),
                                      rtol=1e-4)


def test_ctrl_c_during_a_forked_analysis_is_one_line_and_keeps_the_finished_rows(tmp_path):
    """SIGINT reaches the parent (the workers ignore it): exit 130 with one line and no worker tracebacks, no worker
    left behind, the rows finished so far in the cache, and the same command afterwards computes only the rest."""
    import signal
    import subprocess
    import sys
    import time

    run = _tiny_run(tmp_path / "run", steps=40, checkpoints=20)
    out = tmp_path / "analyses"
    # llc with a fixed number of chains and draws: every checkpoint takes the same time (~0.3 s), so the signal
    # lands with most of them still to do
    command = [sys.executable, "-m", "grokinterp", "analyze", str(run.path), "--metric", "llc", "--out", str(out),
               "--no-progress", "--workers", "2", "--param", "n_draws=300", "--param", "rel_error=0"]
    # as from a terminal: a test run in the background (CI) inherits SIGINT ignored, and Python keeps it so
    default_sigint = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=default_sigint)
    cache = analysis_dir(run, out) / ".cache" / "llc.jsonl"
    deadline = time.monotonic() + 120
    while not (cache.exists() and cache.read_text().count("\n") >= 2) and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130
    assert err.strip().splitlines() == ["grokinterp: interrupted; the rows finished so far are cached: the same "
                                        "command again computes only the rest"]
    done = len([line for line in cache.read_text().splitlines() if line.strip()])
    assert 2 <= done < len(run.steps)
    rest = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert rest.returncode == 0 and f"{len(run.steps) - done} checkpoint(s) computed, {done} from cache" in rest.stdout
