"""Run configuration: frozen dataclasses that round-trip through JSON, and the named presets.

Building a config has no side effects. Each field's docstring is also its ``--help`` text on the command line
(see ``field_docs``), so documentation lives in one place.
"""

import ast
import dataclasses
import inspect
import json
import math
import sys
import textwrap
from dataclasses import dataclass, field
from typing import Any

from grokinterp.errors import ConfigError
from grokinterp.tasks import TaskError, check_task, get_operation


@dataclass(frozen=True)
class TaskConfig:
    op: str = "add"
    """Binary operation: a registry name (add, sub, mul, div, ..., perm_mul) or the paper's formula ("x+y")."""
    p: int = 113
    """Modulus for the mod-p operations (a prime for those that divide)."""
    n: int = 5
    """Degree of the symmetric group S_n for the permutation operations (S5 has 120 elements)."""
    frac_train: float = 0.3
    """Fraction of all pairs used for training; the rest is validation."""
    data_seed: int = 0
    """Seed of the train/validation split."""

    def __post_init__(self) -> None:
        try:
            op = check_task(self.op, self.p, self.n, self.frac_train)
        except TaskError as err:
            raise ConfigError(str(err)) from None
        object.__setattr__(self, "op", op.name)  # store the canonical name, so "x+y" and "add" are one config
        _check_seed("data_seed", self.data_seed)

    @property
    def family(self) -> str:
        return get_operation(self.op).family

    @property
    def n_symbols(self) -> int:
        """Answer symbols of the table: p for the mod-p tasks, n! for S_n."""
        return self.p if self.family == "mod" else math.factorial(self.n)

    @property
    def size_label(self) -> str:
        """'p=113' for mod-p tasks, 'S5' for permutation tasks."""
        return f"p={self.p}" if self.family == "mod" else f"S{self.n}"


@dataclass(frozen=True)
class ModelConfig:
    n_layers: int = 1
    """Transformer blocks."""
    d_model: int = 128
    """Width of the residual stream."""
    n_heads: int = 4
    """Attention heads per block."""
    d_head: int = 32
    """Width of each attention head."""
    d_mlp: int = 512
    """Hidden width of each MLP; 0 for an attention-only model."""
    act_fn: str = "relu"
    """MLP activation, as TransformerLens names it (relu, gelu, ...)."""
    normalization: str = "none"
    """LayerNorm type: 'none' (Nanda et al.), 'LN' or 'LNPre'."""
    freeze_biases: bool = True
    """Keep every b_* parameter at zero (Nanda et al.'s model has no biases)."""
    model_seed: int = 0
    """Seed of the initialization and of the minibatch order."""

    def __post_init__(self) -> None:
        for name in ("n_layers", "d_model", "n_heads", "d_head"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.d_mlp < 0:
            raise ConfigError(f"--d-mlp must be >= 0 (0 means attention-only), got {self.d_mlp}")
        if self.act_fn not in ACT_FNS:
            raise ConfigError(f"unknown --act-fn {self.act_fn!r}; choose one of: {', '.join(ACT_FNS)}")
        _check_seed("model_seed", self.model_seed)
        if self.normalization not in NORMALIZATIONS:
            raise ConfigError(
                f"unknown --normalization {self.normalization!r}; choose one of: {', '.join(NORMALIZATIONS)}"
            )


ACT_FNS = ("relu", "gelu", "silu", "gelu_new", "solu_ln")
NORMALIZATIONS = ("none", "LN", "LNPre")
OPTIMIZERS = ("adamw", "adam", "sgd")
LOSSES = ("ce", "stablemax")  # computed in grokinterp.objective
WD_TARGETS = ("origin", "init")
GROKFAST_FILTERS = ("none", "ema", "ma")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 20_000
    """Budget of optimizer updates (one update = one batch)."""
    batch_size: int = 0
    """Examples per update; 0 trains on the full training set every step."""
    optimizer: str = "adamw"
    """adamw (decoupled weight decay, as in both papers), adam (L2 penalty inside Adam) or sgd."""
    lr: float = 1e-3
    """Peak learning rate."""
    weight_decay: float = 1.0
    """Weight decay; Power et al.'s most effective lever for grokking."""
    beta1: float = 0.9
    """Adam's first-moment decay."""
    beta2: float = 0.98
    """Adam's second-moment decay."""
    warmup_steps: int = 10
    """Linear learning-rate warm-up: lr · min(1, step / warmup_steps), from step 1."""
    eval_every: int = 10
    """Steps between evaluations of train/validation loss and accuracy (the metrics log)."""
    checkpoints: int = 200
    """Regularly spaced checkpoints over the step budget."""
    log_checkpoints: int = 60
    """Extra log-spaced checkpoints (dense early, where memorization happens); 0 for none."""
    stop_val_acc: float = 0.0
    """Stop once validation accuracy has reached this value (e.g. 0.99); 0 trains for the whole budget."""
    stop_patience: int = 0
    """Steps to keep training after --stop-val-acc is reached, to watch the cleanup."""
    fast_path: bool = True
    """Train and evaluate 1-layer models through grokinterp.fastpath, the same function as the HookedTransformer's
    forward computed from per-token tables (~4x less arithmetic); --no-fast-path uses the forward itself."""
    # -- interventions (grokinterp.interventions): each 0/off by default --
    loss: str = "ce"
    """Training loss: ce (softmax cross-entropy) or stablemax (Prieto et al. 2025, no softmax collapse)."""
    wd_target: str = "origin"
    """Weight decay pulls toward the origin, or toward init (the step-0 weights; Power et al.)."""
    weight_noise: float = 0.0
    """Std of Gaussian noise added to the weights for computing each gradient; the update applies to the
    unperturbed weights (Power et al.'s noise before the gradient)."""
    update_noise: float = 0.0
    """Std of Gaussian noise added to the weights after each update (Power et al.'s noise after the gradient)."""
    grad_noise: float = 0.0
    """Std of Gaussian noise added to each gradient entry."""
    dropout: float = 0.0
    """Dropout rate on the residual stream (the embeddings and each attention and MLP output); trains through the
    HookedTransformer forward, not the fast path."""
    attn_dropout: float = 0.0
    """Dropout rate on the attention pattern; trains through the HookedTransformer forward, not the fast path."""
    grokfast: str = "none"
    """Grokfast gradient filter (Lee et al. 2024): none, ema (h = a·h + (1-a)·g) or ma (mean of the last
    --grokfast-window gradients); the filtered gradient g + lamb·h is what the optimizer sees."""
    grokfast_alpha: float = 0.98
    """Grokfast ema's decay a."""
    grokfast_lamb: float = 0.0
    """Grokfast's amplification lamb; 0 takes the paper's value (2 for ema, 5 for ma)."""
    grokfast_window: int = 100
    """Grokfast ma's window, in steps (the filter starts once it is full)."""
    orthograd: bool = False
    """⊥Grad (Prieto et al. 2025): remove each weight matrix's gradient component along the weights, rescaled to
    the gradient's norm, before the optimizer step."""
    norm_scale: float = 0.0
    """Omnigrok (Liu et al. 2023): scale the initial weights by this factor and hold their total norm there after
    every update; 0 leaves the norm free."""

    def __post_init__(self) -> None:
        positive = ("steps", "eval_every", "checkpoints")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("batch_size", "warmup_steps", "log_checkpoints", "stop_patience"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown --optimizer {self.optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}")
        if not 0 < self.lr < math.inf:
            raise ConfigError(f"--lr must be positive and finite, got {self.lr}")
        if not 0 <= self.weight_decay < math.inf:
            raise ConfigError(f"--weight-decay must be >= 0 and finite, got {self.weight_decay}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"--{name} must lie in [0, 1), got {getattr(self, name)}")
        if not 0 <= self.stop_val_acc <= 1:
            raise ConfigError(f"--stop-val-acc must lie in [0, 1] (0 disables it), got {self.stop_val_acc}")
        if self.loss not in LOSSES:
            raise ConfigError(f"unknown --loss {self.loss!r}; choose one of: {', '.join(LOSSES)}")
        if self.wd_target not in WD_TARGETS:
            raise ConfigError(f"unknown --wd-target {self.wd_target!r}; choose one of: {', '.join(WD_TARGETS)}")
        if self.grokfast not in GROKFAST_FILTERS:
            raise ConfigError(f"unknown --grokfast {self.grokfast!r}; choose one of: {', '.join(GROKFAST_FILTERS)}")
        for name in ("weight_noise", "update_noise", "grad_noise", "grokfast_lamb", "norm_scale"):
            if not 0 <= getattr(self, name) < math.inf:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0 and finite, got {getattr(self, name)}")
        for name in ("dropout", "attn_dropout", "grokfast_alpha"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must lie in [0, 1), got {getattr(self, name)}")
        if self.grokfast_window < 1:
            raise ConfigError(f"--grokfast-window must be at least 1, got {self.grokfast_window}")


MAX_SEED = 2**32 - 1


def _check_seed(name: str, value: int) -> None:
    if not 0 <= value <= MAX_SEED:
        raise ConfigError(f"--{name.replace('_', '-')} must lie in [0, {MAX_SEED}], got {value}")


MAX_PARAMETERS = 10**9  # 4 GB of float32 weights, 16 GB with AdamW's state: far beyond a small algorithmic task


def parameter_count(task: TaskConfig, model: ModelConfig) -> int:
    """Parameters of the HookedTransformer this config builds (biases included, frozen or not)."""
    n_symbols = task.n_symbols
    d, heads, dh, mlp = model.d_model, model.n_heads, model.d_head, model.d_mlp
    ln = 2 * d if model.normalization == "LN" else 0  # LNPre has no weights
    attn = 4 * heads * d * dh + 3 * heads * dh + d + ln
    block = attn + (2 * d * mlp + mlp + d + ln if mlp else 0)
    return (n_symbols + 1) * d + 3 * d + model.n_layers * block + ln + d * n_symbols + n_symbols


SECTIONS = {"task": TaskConfig, "model": ModelConfig, "train": TrainConfig}


@dataclass(frozen=True)
class RunConfig:
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        # A float below the smallest normal float64 (a subnormal, e.g. 1e-310) is read as 0 by a CPU thread that
        # flushes denormals, as training does (grokinterp.denormals): its repr there is '0.0', so the config that
        # trained a run would be recorded differently from config.json. No hyperparameter means anything there.
        for section in (self.task, self.model, self.train):
            for f in dataclasses.fields(section):
                value = getattr(section, f.name)
                if isinstance(value, float) and value != 0 and abs(value) < sys.float_info.min:
                    raise ConfigError(f"--{f.name.replace('_', '-')} {value!r} is below the smallest normal float "
                                      f"({sys.float_info.min:.3g}); use 0 or a larger value")
        n_params = parameter_count(self.task, self.model)
        if n_params > MAX_PARAMETERS:
            raise ConfigError(f"the model would have {n_params:,} parameters (more than {MAX_PARAMETERS:,}); "
                              "check --d-model, --d-mlp, --n-heads, --d-head and --n-layers")

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, data: Any) -> "RunConfig":
        """Rebuild a config, refusing unknown sections or fields (a config from another tool or a typo)."""
        if not isinstance(data, dict):
            raise ConfigError(f"a run config is a JSON object with sections {', '.join(SECTIONS)}")
        unknown = set(data) - set(SECTIONS)
        if unknown:
            raise ConfigError(f"unknown config section(s) {sorted(unknown)}; expected {', '.join(SECTIONS)}")
        sections = {}
        for name, section_cls in SECTIONS.items():
            values = data.get(name, {})
            if not isinstance(values, dict):
                raise ConfigError(f"config section {name!r} must be a JSON object")
            sections[name] = build_section(section_cls, values, where=name)
        return cls(**sections)

    @classmethod
    def from_json(cls, text: str) -> "RunConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"config is not valid JSON ({err})") from None
        return cls.from_dict(data)

    def flat(self) -> dict[str, Any]:
        """Every field by name, across the sections (field names are unique across sections)."""
        return {k: v for section in self.to_dict().values() for k, v in section.items()}

    def replace(self, **overrides: Any) -> "RunConfig":
        """A copy with fields overridden by name (field names are unique across sections)."""
        sections = {name: {} for name in SECTIONS}
        for key, value in overrides.items():
            section = FIELD_SECTION.get(key)
            if section is None:
                raise ConfigError(f"unknown config field {key!r}")
            sections[section][key] = value
        return RunConfig(
            **{
                name: dataclasses.replace(getattr(self, name), **values) if values else getattr(self, name)
                for name, values in sections.items()
            }
        )


def build_section(section_cls: type, values: dict[str, Any], where: str) -> Any:
    known = {f.name: f for f in dataclasses.fields(section_cls)}
    unknown = set(values) - set(known)
    if unknown:
        raise ConfigError(f"unknown field(s) {sorted(unknown)} in config section {where!r}")
    checked = {}
    for key, value in values.items():
        expected = known[key].type
        ok = (
            isinstance(value, bool)
            if expected is bool
            else isinstance(value, (int, float)) and not isinstance(value, bool)
            if expected is float
            else isinstance(value, expected) and not isinstance(value, bool)
        )
        if not ok:
            raise ConfigError(f"config field {where}.{key} must be {expected.__name__}, got {value!r}")
        checked[key] = float(value) if expected is float else value
    return section_cls(**checked)


FIELD_SECTION: dict[str, str] = {}
for _section, _cls in SECTIONS.items():
    for _f in dataclasses.fields(_cls):
        if _f.name in FIELD_SECTION:
            raise RuntimeError(f"config field {_f.name} appears in two sections")
        FIELD_SECTION[_f.name] = _section


def field_docs(section_cls: type) -> dict[str, str]:
    """The docstring under each field of a config dataclass (used for --help)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(section_cls)))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
            docs[node.target.id] = " ".join(str(after.value.value).split())
    return docs


# Named starting points; every field can still be overridden.
PRESETS: dict[str, RunConfig] = {
    # Nanda et al. 2023, "Progress measures for grokking": a+b mod 113, 30% data, 1 layer, full batch.
    "nanda2023": RunConfig(
        task=TaskConfig(op="add", p=113, frac_train=0.3),
        model=ModelConfig(),
        train=TrainConfig(steps=40_000, eval_every=20, checkpoints=400, log_checkpoints=60),
    ),
    # Power et al. 2022: 2 layers, width 128, 4 heads, p = 97, 50% data; batch min(512, ceil(N_train / 2)),
    # which is 512 here (set --batch-size yourself if you change the fraction). The paper's model has biases
    # and LayerNorm.
    "power2022": RunConfig(
        task=TaskConfig(op="div", p=97, frac_train=0.5),
        model=ModelConfig(n_layers=2, d_model=128, n_heads=4, d_head=32, d_mlp=512, normalization="LN",
                          freeze_biases=False),
        train=TrainConfig(steps=100_000, batch_size=512, eval_every=50, checkpoints=400, log_checkpoints=60),
    ),
    # The README's demo: Nanda's model on a smaller table, with a higher learning rate, so it groks in about a
    # minute on 2 CPU cores (measured: train acc 99% at step 58, val acc 99% at step 3,690, 35 s of training).
    "quick": RunConfig(
        task=TaskConfig(op="add", p=59, frac_train=0.3),
        model=ModelConfig(),
        train=TrainConfig(steps=8_000, lr=3e-3, eval_every=10, checkpoints=200, log_checkpoints=60,
                          stop_val_acc=0.99, stop_patience=300),
    ),
}
DEFAULT_PRESET = "quick"


def get_preset(name: str) -> RunConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]
