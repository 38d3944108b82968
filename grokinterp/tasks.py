"""Binary-operation tables of Power et al. (2022), and the train/validation split.

Every operation maps a pair of symbols (a, b) to an answer c. The model sees the tokens ``[a, b, =]`` (the
``=`` token is ``n_symbols``) and is scored only on the logits at the last position, over the ``n_symbols``
answers. Pairs where an operation is undefined (division by 0) are left out of the table.

Adding an operation is one function and one line in ``OPERATIONS``.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Int

from grokinterp.errors import TaskError
from grokinterp.groups import SymmetricGroup


@dataclass(frozen=True)
class Operation:
    name: str
    """Name used on the command line and in run names."""
    formula: str
    """The operation as Power et al. write it."""
    family: str
    """'mod' (symbols are residues mod p) or 'perm' (symbols are elements of S_n)."""
    fn: Callable[..., np.ndarray]
    """Vectorized definition: (x, y, p) -> x∘y (reduced mod p afterwards), or (group, x, y) -> x∘y for 'perm'."""
    needs_prime: bool = False
    """Whether the operation uses multiplicative inverses mod p."""
    y_nonzero: bool = False
    """Whether pairs with y = 0 are undefined (division) and left out."""

    def table(self, size: int) -> Int[np.ndarray, "n_symbols n_symbols"]:
        """Answer table for modulus p (or S_n with n = size): ``table[x, y] = x∘y``, -1 where undefined."""
        if self.family == "perm":
            group = SymmetricGroup(size)
            x, y = np.meshgrid(np.arange(group.order), np.arange(group.order), indexing="ij")
            return self.fn(group, x, y)
        x, y = np.meshgrid(np.arange(size, dtype=np.int64), np.arange(size, dtype=np.int64), indexing="ij")
        out = np.mod(self.fn(x, y, size), size)
        if self.y_nonzero:
            out[:, 0] = -1
        return out

    def n_pairs(self, size: int) -> int:
        """How many (x, y) pairs the table defines."""
        n_symbols = size if self.family == "mod" else math.factorial(size)
        return n_symbols * (n_symbols - 1 if self.y_nonzero else n_symbols)


def _inverse_mod(y: np.ndarray, p: int) -> np.ndarray:
    inverses = np.array([pow(int(v), -1, p) if v % p else 0 for v in range(p)], dtype=np.int64)
    return inverses[y]


def _mul(a: np.ndarray, b: np.ndarray, p: int) -> np.ndarray:
    return (a % p) * (b % p) % p  # reduce first so cubes of p up to 3e6 stay inside int64


_OPERATION_LIST = [
    Operation("add", "x+y", "mod", lambda x, y, p: x + y),
    Operation("sub", "x-y", "mod", lambda x, y, p: x - y),
    Operation("mul", "x*y", "mod", lambda x, y, p: _mul(x, y, p)),
    Operation("div", "x/y", "mod", lambda x, y, p: _mul(x, _inverse_mod(y, p), p), needs_prime=True, y_nonzero=True),
    # y = 0 is even, so x - 0 is defined there; only the division branch needs y != 0.
    Operation("div_odd_sub", "x/y if y odd else x-y", "mod",
              lambda x, y, p: np.where(y % 2 == 1, _mul(x, _inverse_mod(y, p), p), x - y), needs_prime=True),
    Operation("sq_sum", "x^2+y^2", "mod", lambda x, y, p: _mul(x, x, p) + _mul(y, y, p)),
    Operation("quad", "x^2+xy+y^2", "mod", lambda x, y, p: _mul(x, x, p) + _mul(x, y, p) + _mul(y, y, p)),
    Operation("quad_x", "x^2+xy+y^2+x", "mod", lambda x, y, p: _mul(x, x, p) + _mul(x, y, p) + _mul(y, y, p) + x),
    Operation("cube_xy", "x^3+xy", "mod", lambda x, y, p: _mul(_mul(x, x, p), x, p) + _mul(x, y, p)),
    Operation("cube_xy2_y", "x^3+xy^2+y", "mod",
              lambda x, y, p: _mul(_mul(x, x, p), x, p) + _mul(x, _mul(y, y, p), p) + y),
    Operation("perm_mul", "x·y", "perm", lambda g, x, y: g.mul[x, y]),
    Operation("perm_conj", "x·y·x⁻¹", "perm", lambda g, x, y: g.mul[g.mul[x, y], g.inv[x]]),
    Operation("perm_xyx", "x·y·x", "perm", lambda g, x, y: g.mul[g.mul[x, y], x]),
]
OPERATIONS: dict[str, Operation] = {}
for _op in _OPERATION_LIST:
    if _op.name in OPERATIONS:
        raise RuntimeError(f"duplicate operation {_op.name}")
    OPERATIONS[_op.name] = _op

# The formulas as written in the paper are accepted too (`--op "x+y"`), with ASCII spellings of the S_n ones.
ALIASES: dict[str, str] = {op.formula.replace(" ", ""): op.name for op in _OPERATION_LIST}
ALIASES.update({"x*y^-1": "div", "xy": "perm_mul", "x.y": "perm_mul", "x.y.x^-1": "perm_conj", "x.y.x": "perm_xyx"})


def get_operation(name: str) -> Operation:
    """The operation called ``name`` (a registry name or the paper's formula), or a TaskError listing choices."""
    key = name.replace(" ", "")
    op = OPERATIONS.get(key) or OPERATIONS.get(ALIASES.get(key, ""))
    if op is None:
        raise TaskError(f"unknown operation {name!r}; choose one of: {', '.join(OPERATIONS)}")
    return op


def is_prime(p: int) -> bool:
    return p >= 2 and all(p % d for d in range(2, int(p**0.5) + 1))


MAX_SYMBOLS = 2000  # p^2 = 4M examples: beyond this a table no longer fits the "small algorithmic task" scale


def check_task(op_name: str, p: int, n: int, frac_train: float) -> Operation:
    """Validate a task description without building it; returns its operation."""
    op = get_operation(op_name)
    if op.family == "mod":
        if not 2 <= p <= MAX_SYMBOLS:
            raise TaskError(f"modulus p={p} is out of range; use 2 <= p <= {MAX_SYMBOLS} (the paper uses 97)")
        if op.needs_prime and not is_prime(p):
            raise TaskError(f"{op.name} ({op.formula}) needs inverses mod p, but p={p} is not prime; use e.g. --p 97")
    else:
        if not 2 <= n <= 6:
            raise TaskError(f"S_n with n={n} is not supported; use 2 <= n <= 6 (the paper uses S5: --n 5)")
    if not 0.0 < frac_train < 1.0:
        raise TaskError(f"--frac-train {frac_train} must lie strictly between 0 and 1")
    n_pairs = op.n_pairs(p if op.family == "mod" else n)
    if int(frac_train * n_pairs) == 0:
        raise TaskError(f"--frac-train {frac_train} of {n_pairs} pairs leaves the training split empty; "
                        "choose a larger fraction")
    return op


@dataclass(frozen=True)
class TaskData:
    """Every defined pair of one operation, as model inputs and answers, with the train/validation split."""

    tokens: Int[torch.Tensor, "n_examples 3"]
    """Rows ``[a, b, =]``; the ``=`` token is ``n_symbols``."""
    labels: Int[torch.Tensor, " n_examples"]
    """The answer c = a ∘ b of each row."""
    train_idx: Int[torch.Tensor, " n_train"]
    val_idx: Int[torch.Tensor, " n_val"]
    n_symbols: int
    """Number of answer symbols (p, or n!); the vocabulary has one more token, ``=``."""

    @property
    def d_vocab(self) -> int:
        return self.n_symbols + 1

    def to(self, device: torch.device | str) -> "TaskData":
        return TaskData(
            self.tokens.to(device),
            self.labels.to(device),
            self.train_idx.to(device),
            self.val_idx.to(device),
            self.n_symbols,
        )


def answer_table(op_name: str, p: int, n: int) -> Int[np.ndarray, "n_symbols n_symbols"]:
    """The operation's full table: ``table[a, b] = a ∘ b``, or -1 where undefined."""
    op = get_operation(op_name)
    return op.table(p if op.family == "mod" else n)


def build_task(op_name: str, p: int, n: int, frac_train: float, data_seed: int) -> TaskData:
    """All defined pairs of the table, split at random: ``floor(frac_train · N)`` pairs train, the rest validate.

    The split comes from a ``torch.Generator`` seeded with ``data_seed`` alone, so it is the same on every device.
    """
    check_task(op_name, p, n, frac_train)
    table = answer_table(op_name, p, n)
    n_symbols = table.shape[0]
    a, b = np.nonzero(table >= 0)
    labels = table[a, b]
    tokens = np.stack([a, b, np.full_like(a, n_symbols)], axis=1)
    n_examples = len(labels)
    n_train = int(frac_train * n_examples)  # 0 < n_train < n_examples: checked by check_task
    generator = torch.Generator().manual_seed(data_seed)
    order = torch.randperm(n_examples, generator=generator)
    return TaskData(
        tokens=torch.from_numpy(tokens),
        labels=torch.from_numpy(labels),
        train_idx=order[:n_train].sort().values,
        val_idx=order[n_train:].sort().values,
        n_symbols=n_symbols,
    )
