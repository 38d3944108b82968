import pytest
import torch

from grokinterp.groups import SymmetricGroup
from grokinterp.tasks import OPERATIONS, TaskError, answer_table, build_task, get_operation, is_prime


def brute_mod(name: str, x: int, y: int, p: int):
    """Each operation written out on Python integers, straight from Power et al.'s list."""
    inv = pow(y, -1, p) if y % p else None
    return {
        "add": (x + y) % p,
        "sub": (x - y) % p,
        "mul": (x * y) % p,
        "div": None if inv is None else (x * inv) % p,
        "div_odd_sub": ((x * inv) % p) if y % 2 == 1 else (x - y) % p,
        "sq_sum": (x**2 + y**2) % p,
        "quad": (x**2 + x * y + y**2) % p,
        "quad_x": (x**2 + x * y + y**2 + x) % p,
        "cube_xy": (x**3 + x * y) % p,
        "cube_xy2_y": (x**3 + x * y**2 + y) % p,
    }[name]


def brute_perm(name: str, x, y):
    compose = lambda a, b: tuple(a[b[i]] for i in range(len(a)))  # noqa: E731 -- (a·b)(i) = a(b(i))
    inverse = lambda a: tuple(sorted(range(len(a)), key=lambda i: a[i]))  # noqa: E731
    return {
        "perm_mul": compose(x, y),
        "perm_conj": compose(compose(x, y), inverse(x)),
        "perm_xyx": compose(compose(x, y), x),
    }[name]


MOD_OPS = [name for name, op in OPERATIONS.items() if op.family == "mod"]
PERM_OPS = [name for name, op in OPERATIONS.items() if op.family == "perm"]


def test_registry_covers_power_et_al():
    assert len(MOD_OPS) == 10 and len(PERM_OPS) == 3


@pytest.mark.parametrize("name", MOD_OPS)
@pytest.mark.parametrize("p", [5, 7, 23])
def test_mod_tables_match_brute_force(name, p):
    table = answer_table(name, p, 5)
    for x in range(p):
        for y in range(p):
            expected = brute_mod(name, x, y, p)
            assert table[x, y] == (-1 if expected is None else expected), (name, x, y)


@pytest.mark.parametrize("name", PERM_OPS)
@pytest.mark.parametrize("n", [3, 4])
def test_perm_tables_match_brute_force(name, n):
    group = SymmetricGroup(n)
    table = answer_table(name, 97, n)
    perms = [tuple(int(v) for v in row) for row in group.perms]
    for x in range(group.order):
        for y in range(group.order):
            assert perms[table[x, y]] == brute_perm(name, perms[x], perms[y])


def test_large_modulus_does_not_overflow():
    p = 1999
    table = answer_table("cube_xy2_y", p, 5)
    for x, y in [(p - 1, p - 1), (1234, 1777), (0, 5)]:
        assert table[x, y] == brute_mod("cube_xy2_y", x, y, p)


@pytest.mark.parametrize("name", [*MOD_OPS, *PERM_OPS])
def test_task_data_encodes_every_defined_pair(name):
    data = build_task(name, 7, 3, 0.5, data_seed=0)
    table = answer_table(name, 7, 3)
    n = table.shape[0]
    assert data.n_symbols == n and data.d_vocab == n + 1
    assert len(data.labels) == int((table >= 0).sum())
    assert (data.tokens[:, 2] == n).all()
    a, b = data.tokens[:, 0].numpy(), data.tokens[:, 1].numpy()
    assert (table[a, b] == data.labels.numpy()).all()
    # division drops y = 0, and nothing else
    assert len(data.labels) == (n * (n - 1) if name == "div" else n * n) == OPERATIONS[name].n_pairs(7 if n == 7 else 3)


def test_split_is_a_seeded_partition():
    a = build_task("add", 23, 5, 0.3, data_seed=1)
    b = build_task("add", 23, 5, 0.3, data_seed=1)
    c = build_task("add", 23, 5, 0.3, data_seed=2)
    assert torch.equal(a.train_idx, b.train_idx) and torch.equal(a.val_idx, b.val_idx)
    assert not torch.equal(a.train_idx, c.train_idx)
    everything = torch.cat([a.train_idx, a.val_idx]).sort().values
    assert torch.equal(everything, torch.arange(23 * 23))
    assert len(a.train_idx) == int(0.3 * 23 * 23)
    # the split does not consume or depend on the global RNG
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    build_task("add", 23, 5, 0.3, data_seed=1)
    assert torch.equal(torch.rand(1), before)


def test_formula_aliases():
    assert get_operation("x+y").name == "add"
    assert get_operation("x^2 + xy + y^2").name == "quad"
    assert get_operation("x·y·x⁻¹").name == "perm_conj"


@pytest.mark.parametrize(
    "args, message",
    [
        (("foo", 7, 5, 0.5), "unknown operation 'foo'; choose one of: add, sub"),
        (("div", 21, 5, 0.5), "p=21 is not prime"),
        (("div_odd_sub", 9, 5, 0.5), "not prime"),
        (("add", 7, 5, 0.0), "strictly between 0 and 1"),
        (("add", 7, 5, 0.01), "leaves the training split empty"),
        (("perm_mul", 7, 8, 0.5), "n=8 is not supported"),
        (("add", 1, 5, 0.5), "out of range"),
    ],
)
def test_bad_tasks_are_refused(args, message):
    with pytest.raises(TaskError, match=message):
        build_task(*args, data_seed=0)


def test_composite_modulus_is_fine_without_inverses():
    assert not is_prime(21)
    assert build_task("add", 21, 5, 0.5, data_seed=0).n_symbols == 21
