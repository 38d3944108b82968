"""The run store: one directory per run, written atomically, read through ``load_run``.

Layout of a run directory::

    config.json              the RunConfig (JSON)
    data.safetensors         the task table (tokens, labels) and the train/validation split
    metrics.jsonl            one JSON object per evaluation (step, losses, accuracies, weight norm, ...)
    weights/step_0001200.safetensors
                             model weights in TransformerLens state-dict naming, named by global step, with the
                             config that trained them in the file's metadata (checked against config.json on load)
    trainer_state.pt         optimizer state and progress at the latest checkpoint (read with weights_only=True)
    .lock                    held (flock) while a process trains the run

Every file is written to a temporary name and renamed into place, so a reader never sees half a file and a
killed process leaves only complete checkpoints behind.
"""

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import logging
import os
import re
import shutil
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from grokinterp.config import ConfigError, RunConfig
from grokinterp.errors import RunError
from grokinterp.tasks import TaskData, build_task

CONFIG_FILE = "config.json"
DATA_FILE = "data.safetensors"
METRICS_FILE = "metrics.jsonl"
WEIGHTS_DIR = "weights"
TRAINER_STATE_FILE = "trainer_state.pt"
LOCK_FILE = ".lock"
DEFAULT_ROOT = Path("checkpoints")
log = logging.getLogger(__name__)
RESUMABLE_FIELDS = ("steps", "stop_val_acc", "stop_patience")
"""Config fields a resume may change (a larger budget, another stop rule); training fixes every other field."""


def checkpoint_schedule(total_steps: int, n_regular: int, n_log: int) -> list[int]:
    """Steps to checkpoint: ``n_regular`` evenly spaced intervals over ``[0, total_steps]``, plus ``n_log``
    log-spaced steps over the first ten intervals (dense early, where memorization happens), always with 0 and
    ``total_steps``."""
    n_regular, n_log = min(n_regular, total_steps), min(n_log, total_steps)  # never more than one per step
    regular = np.linspace(0, total_steps, n_regular + 1)
    early_end = min(total_steps, 10 * total_steps / n_regular)
    log = np.geomspace(1, max(early_end, 1), n_log) if n_log > 0 else np.array([])
    return sorted({int(round(s)) for s in np.concatenate([regular, log])} | {0, total_steps})


def weights_name(step: int) -> str:
    return f"step_{step:07d}.safetensors"


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary name beside ``path``, fsync, rename. The bytes are serialized beforehand, so
    the only failure here is an OSError with its errno (a full disk is ENOSPC or EFBIG, not a serializer's own
    message), raised with ``path`` as its filename; the temporary file is removed whatever happens."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as err:
        err.filename = str(path)
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


_TEMPORARY = re.compile(r"\.(?P<name>.+)\.(?:tmp|creating)(?P<pid>\d+)")


def remove_stale_temporaries(folder: Path, runs_only: bool = False) -> list[Path]:
    """Remove the temporary files (``.NAME.tmpPID``) and half-built run folders (``.NAME.creatingPID``) in
    ``folder`` whose writer PID is dead: what a process killed mid-write leaves. A live PID's are left alone,
    as that process may still be writing them. ``runs_only``: only half-built run folders (in a folder of runs,
    which may hold anything else too). Called when a run is opened for writing; returns what it removed."""
    removed = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _TEMPORARY.fullmatch(entry.name)
        if match is None or _pid_alive(int(match["pid"])):
            continue
        if runs_only and not (".creating" in entry.name and (entry / WEIGHTS_DIR).is_dir()):
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError:
            continue  # not ours to remove (permissions): harmless, readers skip hidden names
        log.info("removed %s, left by process %s, which is gone", entry, match["pid"])
        removed.append(entry)
    return removed


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's process (or a number no PID can be): do not touch
    return True


def write_text_atomic(path: Path, text: str) -> None:
    _atomic_write(path, text.encode("utf-8"))


WRITE_FAILURES = {errno.EFBIG: "the file-size limit (ulimit -f) is reached", errno.ENOSPC: "the disk is full",
                  errno.EDQUOT: "the disk quota is used up"}


def resolve_run_path(run: str | os.PathLike) -> Path:
    """A run given as a path, or as a name under ./checkpoints/."""
    path = Path(run)
    if not path.exists() and not path.is_absolute() and (DEFAULT_ROOT / path).exists():
        path = DEFAULT_ROOT / path
    return path


@dataclass(frozen=True)
class TrainerState:
    step: int
    optimizer: dict[str, Any]
    finished: bool
    """Whether training ended (budget spent or early stop) rather than being interrupted."""
    stop_reason: str
    extra: dict[str, Any] = field(default_factory=dict)
    """State of the interventions that carry one across steps (Grokfast's filter); empty for most runs."""


class RunStore:
    """Reads and writes one run directory."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock_fd: int | None = None

    # -- creating and locking -------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | os.PathLike, config: RunConfig, data: TaskData) -> "RunStore":
        """Make a new run directory; refuses to touch one that exists."""
        path = Path(path)
        if path.exists():
            raise RunError(f"run directory {path} already exists; pick another --name, or continue it with --resume {path}")
        # Build the whole directory beside its final name, then rename: a run directory is complete or absent.
        tmp = path.with_name(f".{path.name}.creating{os.getpid()}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(path.parent, runs_only=True)
            tmp.mkdir()
            (tmp / WEIGHTS_DIR).mkdir()
            write_text_atomic(tmp / CONFIG_FILE, config.to_json())
            tensors = {
                "tokens": data.tokens.cpu().contiguous(),
                "labels": data.labels.cpu().contiguous(),
                "train_idx": data.train_idx.cpu().contiguous(),
                "val_idx": data.val_idx.cpu().contiguous(),
            }
            _write_tensors(tmp / DATA_FILE, tensors, {"n_symbols": str(data.n_symbols)})
            (tmp / METRICS_FILE).touch()
            os.rename(tmp, path)
        except OSError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            if path.exists():
                raise RunError(f"run directory {path} appeared while creating it; pick another --name") from None
            if err.errno in WRITE_FAILURES:
                raise RunError(f"could not create run directory {path}: {WRITE_FAILURES[err.errno]} (writing "
                               f"{Path(err.filename).name}); free space or raise the limit, then train again") from None
            raise RunError(f"could not create run directory {path} ({err.strerror}); check the path and free space") from None
        return cls(path)

    def lock(self) -> None:
        """Take the run's training lock, or fail if another process holds it."""
        fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunError(f"run {self.path} is being trained by another process; wait for it or stop it first") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd
        remove_stale_temporaries(self.path)
        remove_stale_temporaries(self.path / WEIGHTS_DIR)
        remove_stale_temporaries(self.path.parent, runs_only=True)

    def unlock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- reading --------------------------------------------------------------------------------------------
    def _require(self, name: str) -> Path:
        file = self.path / name
        if not file.exists():
            raise RunError(f"{file} is missing: {self.path} is not a complete grokinterp run")
        return file

    def read_config(self) -> RunConfig:
        file = self._require(CONFIG_FILE)
        try:
            return RunConfig.from_json(_read_text(file))
        except ConfigError as err:
            raise RunError(f"{file}: {err}") from None

    def read_data(self) -> TaskData:
        file = self._require(DATA_FILE)
        tensors, metadata = _read_tensors(file)
        try:
            n_symbols = int(metadata["n_symbols"])
            data = TaskData(tensors["tokens"], tensors["labels"], tensors["train_idx"], tensors["val_idx"], n_symbols)
        except (KeyError, ValueError) as err:
            raise RunError(f"{file} is corrupt ({type(err).__name__}: {err}); the run's data cannot be read") from None
        problem = _data_problem(data)
        if problem:
            raise RunError(f"{file} is corrupt: {problem}; the run's data cannot be read")
        return data

    def steps(self) -> list[int]:
        """Steps with a complete weights file, ascending."""
        folder = self.path / WEIGHTS_DIR
        if not folder.is_dir():
            return []
        out = []
        for file in folder.glob("step_*.safetensors"):
            try:
                out.append(int(file.name[len("step_") : -len(".safetensors")]))
            except ValueError:
                continue
        return sorted(out)

    def read_weights(self, step: int) -> dict[str, torch.Tensor]:
        return self.read_checkpoint(step)[0]

    def weights_file(self, step: int) -> Path:
        """The weights file of ``step``, or a one-line error listing the steps there are."""
        file = self.path / WEIGHTS_DIR / weights_name(step)
        if not file.exists():
            raise RunError(f"no checkpoint at step {step} in {self.path}; available: {_describe_steps(self.steps())}")
        return file

    def read_checkpoint(self, step: int) -> tuple[dict[str, torch.Tensor], "RunConfig | None", Path]:
        """Weights at ``step``, the config that trained them (None for a run written before it was recorded) and
        the file they came from."""
        file = self.weights_file(step)
        tensors, metadata = _read_tensors(file)
        return tensors, _trained_config(metadata, file), file

    def check_config(self, config: RunConfig, data: TaskData | None = None, table: bool = True) -> None:
        """Refuse ``config`` (config.json as read, with any resume flags) unless it is the config that trained the
        checkpoints, up to RESUMABLE_FIELDS. The latest checkpoint's record is checked; a run with no record (written
        before the record existed, or killed before its first checkpoint) is checked against its task table, unless
        ``table`` is False (a quick look, as ``grokinterp runs`` takes)."""
        steps = self.steps()
        if steps:
            file = self.path / WEIGHTS_DIR / weights_name(steps[-1])
            trained = _trained_config(_read_metadata(file), file)
            if trained is not None:
                self.check_trained_by(config, trained, file)
                return
        if table:
            self.check_table(config, self.read_data() if data is None else data)

    def check_trained_by(self, config: RunConfig, trained: RunConfig, file: Path) -> None:
        """Refuse ``config`` if it differs from ``trained``, the config recorded in checkpoint ``file``."""
        changes = config_changes(trained, config, self._raw_config())
        if changes:
            restore = ", ".join(f"{name} to {value!r}" for name, value, _ in changes)
            raise RunError(
                f"{self.path / CONFIG_FILE} does not match the config that trained {file.name}: "
                f"{'; '.join(text for _, _, text in changes)}; restore {restore} in config.json, or start a new run "
                "(grokinterp train --name NEW ...) to train with the new value"
            )

    def check_table(self, config: RunConfig, data: TaskData) -> None:
        """Refuse ``config`` if its task section does not build the table and split in data.safetensors (the check
        for runs whose checkpoints carry no record of the config that trained them)."""
        t = config.task
        try:
            expected = build_task(t.op, t.p, t.n, t.frac_train, t.data_seed)
        except ValueError:
            expected = None
        same = expected is not None and expected.n_symbols == data.n_symbols and all(
            a.shape == b.shape and torch.equal(a, b)
            for a, b in zip((expected.tokens, expected.labels, expected.train_idx, expected.val_idx),
                            (data.tokens, data.labels, data.train_idx, data.val_idx)))
        if not same:
            raise RunError(
                f"{self.path / DATA_FILE} holds the table the run was trained on, not the table config.json's task "
                f"section builds ({t.op} {t.size_label}, {t.frac_train:g} train, data seed {t.data_seed}): "
                "config.json was edited after training; restore its task section, or start a new run "
                "(grokinterp train --name NEW ...) for the new task"
            )

    def _raw_config(self) -> dict[str, Any]:
        try:
            raw = json.loads(_read_text(self.path / CONFIG_FILE))
        except (OSError, RunError, json.JSONDecodeError):
            return {}
        return raw if isinstance(raw, dict) else {}

    def read_metrics(self, stop_at_damage: bool = False) -> list[dict[str, Any]]:
        """Every logged evaluation, in step order. A torn last line (a killed writer) is ignored; a damaged line
        before it is an error, or with ``stop_at_damage`` the end of the rows kept (to rebuild the rest)."""
        file = self._require(METRICS_FILE)
        lines = _read_text(file).split("\n")
        rows = []
        rebuild = f"restore it, or rebuild it from the checkpoints with: grokinterp train --resume {self.path} --rebuild-log"
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                if i == len(lines) - 1 or stop_at_damage:
                    break
                raise RunError(f"{file} line {i + 1} is not valid JSON; the metrics log is corrupt: {rebuild}") from None
            if not (isinstance(row, dict) and type(row.get("step")) is int
                    and all(isinstance(v, (int, float)) for v in row.values())):
                if stop_at_damage:
                    break
                raise RunError(f"{file} line {i + 1} is not a row of numbers with a step; the metrics log is corrupt: "
                               f"{rebuild}")
            if stop_at_damage and rows and row["step"] <= rows[-1]["step"]:
                break
            rows.append(row)
        return rows

    def read_trainer_state(self) -> TrainerState | None:
        file = self.path / TRAINER_STATE_FILE
        if not file.exists():
            return None
        try:
            with warnings.catch_warnings():  # torch warns about a foreign pickle before refusing it: one line is ours
                warnings.simplefilter("ignore")
                raw = torch.load(file, map_location="cpu", weights_only=True)
            state = TrainerState(int(raw["step"]), raw["optimizer"], bool(raw["finished"]), str(raw["stop_reason"]),
                                 raw.get("extra", {}))
            digest = raw.get("sha256")
        except Exception as err:  # noqa: BLE001 -- any unreadable state is reported the same way
            raise RunError(f"{file} is corrupt or truncated ({type(err).__name__}); the run cannot resume") from None
        if digest is not None and digest != _state_digest(state):  # torch.load checks no CRC: a flipped bit loads
            raise RunError(f"{file} is corrupt: its contents do not match the checksum written with it")
        return state

    # -- writing --------------------------------------------------------------------------------------------
    # Each write that fails (a full disk, a file-size limit, a read-only folder) raises a one-line RunError naming
    # the file; the files written before it are untouched, so the run resumes from its last complete checkpoint.
    def write_weights(self, step: int, state_dict: dict[str, torch.Tensor], config: RunConfig) -> None:
        """Save the weights of ``step``, recording ``config``, the config that trained them."""
        tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
        text = _config_record(config)
        metadata = {"config": text, "config_sha256": hashlib.sha256(text.encode()).hexdigest()}
        with self._reporting_write_failures():
            _write_tensors(self.path / WEIGHTS_DIR / weights_name(step), tensors, metadata)

    def write_trainer_state(self, state: TrainerState) -> None:
        payload = {"step": state.step, "optimizer": state.optimizer, "finished": state.finished,
                   "stop_reason": state.stop_reason, "sha256": _state_digest(state)}
        if state.extra:
            payload["extra"] = state.extra
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        with self._reporting_write_failures():
            _atomic_write(self.path / TRAINER_STATE_FILE, buffer.getvalue())

    def write_config(self, config: RunConfig) -> None:
        with self._reporting_write_failures():
            write_text_atomic(self.path / CONFIG_FILE, config.to_json())

    def rewrite_metrics(self, rows: Iterable[dict[str, Any]]) -> None:
        with self._reporting_write_failures():
            write_text_atomic(self.path / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in rows))

    def open_metrics_for_append(self) -> "MetricsLog":
        return MetricsLog(self)

    @contextlib.contextmanager
    def _reporting_write_failures(self):
        try:
            yield
        except OSError as err:
            raise self.write_failure(err) from None

    def write_failure(self, err: OSError) -> RunError:
        """One line for a write that failed: the file, why, what is intact and the command that continues."""
        why = WRITE_FAILURES.get(err.errno, err.strerror or str(err))
        steps = self.steps()
        intact = (f"the checkpoints up to step {steps[-1]} are intact" if steps else
                  "the files written before it are intact, but no checkpoint was complete yet (a resume starts "
                  "the run over)")
        fix = "free space or raise the limit" if err.errno in WRITE_FAILURES else "fix that"
        return RunError(f"could not write {err.filename or self.path}: {why}; {intact}; {fix}, then continue with: "
                        f"grokinterp train --resume {self.path}")


class MetricsLog:
    """metrics.jsonl opened for appending rows. A row the disk cannot take is cut off again, so the log never ends
    in half a row, and the failure is a RunError naming the file."""

    def __init__(self, store: RunStore):
        self.store = store
        self.file = store.path / METRICS_FILE
        self._fd = None
        with store._reporting_write_failures():
            self._fd: int | None = os.open(self.file, os.O_WRONLY | os.O_APPEND)

    def write(self, text: str) -> None:
        size = os.fstat(self._fd).st_size
        try:
            _write_all(self._fd, text.encode("utf-8"))
        except OSError as err:
            os.ftruncate(self._fd, size)  # shrinking is allowed past a file-size limit, and frees space
            err.filename = str(self.file)
            raise self.store.write_failure(err) from None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:  # a trainer stopped by an error leaves its log open: close it with the object
        with contextlib.suppress(Exception):  # at interpreter exit, os may already be gone
            self.close()


def _config_record(config: RunConfig) -> str:
    return json.dumps(config.to_dict(), sort_keys=True, separators=(",", ":"))


def _trained_config(metadata: dict[str, str], file: Path) -> RunConfig | None:
    """The config recorded in a checkpoint's metadata, or None for a checkpoint written before the record."""
    text = metadata.get("config")
    if text is None:
        return None
    if hashlib.sha256(text.encode()).hexdigest() != metadata.get("config_sha256"):
        raise RunError(f"{file} is corrupt: its record of the training config does not match its checksum")
    try:
        return RunConfig.from_json(text)
    except ConfigError as err:
        raise RunError(f"{file} is corrupt: its record of the training config cannot be read ({err})") from None


def config_changes(trained: RunConfig, config: RunConfig, raw: dict[str, Any]) -> list[tuple[str, Any, str]]:
    """(field, trained value, description) for every field where ``config`` differs from ``trained``, the config recorded in a
    checkpoint, besides RESUMABLE_FIELDS. ``raw`` is config.json as parsed JSON, to tell a deleted field (which
    falls back to its default) from an edited one."""
    changes = []
    now, then = config.to_dict(), trained.to_dict()
    for section, values in then.items():
        for key, value in values.items():
            if key in RESUMABLE_FIELDS or now[section][key] == value:
                continue
            name = f"{section}.{key}"
            present = isinstance(raw.get(section), dict) and key in raw[section]
            where = "config.json gives" if present else "config.json lacks it, so the default"
            changes.append((name, value, f"{name} was {value!r} in training, {where} {now[section][key]!r}"
                                  + ("" if present else " applies (the field is missing)")))
    return changes


def fit_weights(model: torch.nn.Module, tensors: dict[str, torch.Tensor], file: Path) -> None:
    """Load ``tensors`` (from checkpoint ``file``) into ``model``, or say in one line which tensor does not fit."""
    expected = model.state_dict()
    for name, tensor in tensors.items():
        if name not in expected:
            raise RunError(f"{file}: {name} is not a tensor of the model config.json's model section builds; "
                           "restore config.json's model section, or start a new run")
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise RunError(f"{file}: {name} has shape {tuple(tensor.shape)}, but config.json's model builds "
                           f"{tuple(expected[name].shape)}; restore config.json's model section, or start a new run")
    missing = [name for name in expected if name not in tensors]
    if missing:
        raise RunError(f"{file} lacks {missing[0]}, which the model config.json's model section builds has; "
                       "restore config.json's model section, or start a new run")
    model.load_state_dict(tensors)


def _read_text(file: Path) -> str:
    try:
        return file.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise RunError(f"{file} is corrupt: byte {err.start} is not UTF-8 text") from None


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes: safetensors has no checksum of its own, and a flipped bit in
    a weight would otherwise load as a slightly different model."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(f"{name}|".encode())
        _hash_tensor(h, tensors[name])
    return h.hexdigest()


def _hash_tensor(h, tensor: torch.Tensor) -> None:
    """Feed a tensor's dtype, shape and raw bytes to the hash ``h``."""
    t = tensor.detach().cpu().contiguous()
    h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def _state_digest(state: TrainerState) -> str:
    """SHA-256 of a trainer state: its fields, the optimizer's structure and every tensor's bytes."""
    h = hashlib.sha256(f"{state.step}|{state.finished}|{state.stop_reason}|".encode())

    def walk(obj) -> None:
        if isinstance(obj, torch.Tensor):
            h.update(b"T")
            _hash_tensor(h, obj)
        elif isinstance(obj, dict):
            for key in sorted(obj, key=repr):
                h.update(f"K{key!r}".encode())
                walk(obj[key])
        elif isinstance(obj, (list, tuple)):
            h.update(f"L{len(obj)}".encode())
            for item in obj:
                walk(item)
        else:
            h.update(f"V{obj!r}".encode())

    walk(state.optimizer)
    if state.extra:  # runs without one keep the digest they were written with
        h.update(b"E")
        walk(state.extra)
    return h.hexdigest()


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    metadata = {**(metadata or {}), "sha256": _digest(tensors)}
    _atomic_write(path, safetensors_bytes(tensors, metadata=metadata))


def _read_tensors(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file, checked against the digest written with it (when it has one)."""
    try:
        with safe_open(file, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise RunError(f"{file} is corrupt or truncated ({_first_line(err)})") from None
    if "sha256" in metadata and _digest(tensors) != metadata["sha256"]:
        raise RunError(f"{file} is corrupt: its contents do not match the checksum written with it")
    return tensors, metadata


def stored_digest(file: Path) -> str:
    """The SHA-256 of a safetensors file's tensors, read from its header; computed from the tensors for a file
    written before the digest was stored."""
    digest = _read_metadata(file).get("sha256")
    return digest if digest is not None else _digest(_read_tensors(file)[0])


def _read_metadata(file: Path) -> dict[str, str]:
    """A safetensors file's metadata, read from its header without loading its tensors."""
    try:
        with safe_open(file, framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise RunError(f"{file} is corrupt or truncated ({_first_line(err)})") from None


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _data_problem(data: TaskData) -> str | None:
    """What makes a task table unusable, or None: wrong shapes, out-of-range ids, a split that is not one."""
    n_rows = len(data.labels)
    if data.tokens.ndim != 2 or data.tokens.shape != (n_rows, 3) or data.n_symbols < 1:
        return f"tokens have shape {tuple(data.tokens.shape)}, expected ({n_rows}, 3)"
    if n_rows and (data.tokens.min() < 0 or data.tokens.max() > data.n_symbols):
        return "a token id lies outside the vocabulary"
    if n_rows and not bool((data.tokens[:, 2] == data.n_symbols).all()):
        return "a row does not end in the '=' token"
    if n_rows and (data.labels.min() < 0 or data.labels.max() >= data.n_symbols):
        return "a label lies outside the vocabulary"
    split = torch.cat([data.train_idx, data.val_idx])
    if len(data.train_idx) == 0 or not torch.equal(split.sort().values, torch.arange(n_rows)):
        return "the train and validation indices do not split the table"
    return None


def _describe_steps(steps: list[int]) -> str:
    if not steps:
        return "none"
    if len(steps) <= 6:
        return ", ".join(map(str, steps))
    return f"{len(steps)} steps from {steps[0]} to {steps[-1]}"


class Run:
    """A trained (or training) run, read from disk. Get one with ``grokinterp.load_run(path)``."""

    def __init__(self, path: str | os.PathLike):
        self.store = RunStore(resolve_run_path(path))
        if not self.store.path.is_dir():
            raise RunError(f"no run at {path}; train one with `grokinterp train`, list them with `grokinterp runs`")
        self.path = self.store.path
        self.config: RunConfig = self.store.read_config()
        self._table_checked = False
        self._trained_ok: RunConfig | None = None  # the last training config found to agree with config.json

    def __repr__(self) -> str:
        steps = self.steps
        return (f"Run({str(self.path)!r}, op={self.config.task.op}, checkpoints={len(steps)}, "
                f"last_step={steps[-1] if steps else None})")

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def steps(self) -> list[int]:
        """Checkpointed steps, ascending (re-read each time, so a run still training shows its new ones)."""
        return self.store.steps()

    @cached_property
    def data(self) -> TaskData:
        """The task table and the split it was trained with (``data.train_idx``, ``data.val_idx``)."""
        return self.store.read_data()

    @property
    def split(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(train_idx, val_idx): rows of ``data.tokens`` used for training and for validation."""
        return self.data.train_idx, self.data.val_idx

    @property
    def metrics(self):
        """The metrics log as a pandas DataFrame, one row per evaluation, indexed by step."""
        import pandas as pd

        rows = self.store.read_metrics()
        frame = pd.DataFrame(rows)
        return frame.set_index("step", drop=False) if len(frame) else frame

    def state_dict(self, step: int | None = None) -> dict[str, torch.Tensor]:
        """Weights at ``step`` (default: the latest checkpoint), in TransformerLens naming. Refused if config.json
        is not the config that trained them (a hand-edited file)."""
        return self._checkpoint(step)[0]

    def model(self, step: int | None = None, device: str | torch.device = "cpu"):
        """A ``HookedTransformer`` with the weights of ``step`` (default: the latest checkpoint)."""
        from grokinterp.model import build_model

        tensors, file = self._checkpoint(step)
        model = build_model(self.config.model, self.data.n_symbols, device=device)
        fit_weights(model, tensors, file)
        return model.eval()

    def _checkpoint(self, step: int | None) -> tuple[dict[str, torch.Tensor], Path]:
        tensors, trained, file = self.store.read_checkpoint(self._step(step))
        if trained is None:  # written before the record: the task table is what config.json must still build
            if not self._table_checked:
                self.store.check_table(self.config, self.data)
                self._table_checked = True
        elif trained != self._trained_ok:
            self.store.check_trained_by(self.config, trained, file)
            self._trained_ok = trained
        return tensors, file

    def _step(self, step: int | None) -> int:
        steps = self.steps
        if not steps:
            raise RunError(f"run {self.path} has no checkpoints yet")
        return steps[-1] if step is None else int(step)

    def first_step_reaching(self, column: str, threshold: float) -> int | None:
        """The first logged step where ``column`` >= threshold (e.g. 'val_acc', 0.99), or None."""
        return first_step_reaching(self.store.read_metrics(), column, threshold)

    @property
    def trainer_state(self) -> TrainerState | None:
        return self.store.read_trainer_state()

    def weights_digest(self, step: int) -> str:
        """SHA-256 of the weights at ``step``, as written with them: names a checkpoint's contents (e.g. in the
        analysis cache's key) without loading its tensors."""
        return stored_digest(self.store.weights_file(step))

    def data_digest(self) -> str:
        """SHA-256 of the task table and split, as written with them."""
        return stored_digest(self.store._require(DATA_FILE))


def load_run(path: str | os.PathLike) -> Run:
    """Open a run directory (a path, or a run name under ./checkpoints/)."""
    return Run(path)


def find_runs(root: str | os.PathLike = DEFAULT_ROOT) -> list[Path]:
    """Run directories directly under ``root`` (those with a config.json), sorted by name."""
    root = Path(root)
    if (root / CONFIG_FILE).exists():
        return [root]
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if (p / CONFIG_FILE).exists() and not p.name.startswith("."))


def first_step_reaching(rows: list[dict[str, Any]], column: str, threshold: float) -> int | None:
    """The first row's step where ``column`` >= threshold, or None."""
    for row in rows:
        if row.get(column) is not None and row[column] >= threshold:
            return int(row["step"])
    return None


def metrics_step_cutoff(rows: list[dict[str, Any]], step: int) -> list[dict[str, Any]]:
    return [r for r in rows if r["step"] <= step]


def weight_norm_sq(state: Iterable[torch.Tensor]) -> float:
    """Σ‖θ‖² over the given tensors, in float64."""
    return float(sum(t.detach().double().pow(2).sum() for t in state))


