import itertools

import numpy as np
import pytest

from grokinterp.groups import SymmetricGroup


@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_group_axioms(n):
    g = SymmetricGroup(n)
    order = g.order
    assert order == int(np.prod(range(1, n + 1)))
    mul, inv, e = g.mul, g.inv, g.identity
    assert e == 0 and tuple(g.perms[e]) == tuple(range(n))
    everything = np.arange(order)
    # closure: each row of the table is a permutation of the group (Latin square)
    assert all(sorted(row) == list(everything) for row in mul)
    assert all(sorted(col) == list(everything) for col in mul.T)
    assert (mul[e, :] == everything).all() and (mul[:, e] == everything).all()
    assert (mul[everything, inv] == e).all() and (mul[inv, everything] == e).all()
    # associativity on every triple
    assert (mul[mul[:, :, None], everything[None, None, :]] == mul[everything[:, None, None], mul[None, :, :]]).all()


def test_composition_convention_applies_right_factor_first():
    g = SymmetricGroup(3)
    x, y = g.index((1, 0, 2)), g.index((0, 2, 1))  # x swaps 0,1; y swaps 1,2
    xy = g.perms[g.mul[x, y]]
    # (x·y)(i) = x(y(i)): 0 -> y 0 -> x 1;  1 -> y 2 -> x 2;  2 -> y 1 -> x 0
    assert tuple(xy) == (1, 2, 0)
    assert tuple(xy) == tuple(g.perms[x][g.perms[y]])


def test_elements_are_lexicographic_and_indexed():
    g = SymmetricGroup(4)
    assert [tuple(p) for p in g.perms] == list(itertools.permutations(range(4)))
    assert all(g.index(p) == i for i, p in enumerate(g.perms))
    with pytest.raises(ValueError, match="not a permutation"):
        g.index((0, 0, 1, 2))


def test_sign_cycle_type_and_subgroups():
    g = SymmetricGroup(5)
    assert (g.sign == 1).sum() == 60
    assert g.cycle_type(g.index((1, 0, 2, 3, 4))) == (2, 1, 1, 1)
    assert g.cycle_type(g.index((1, 2, 3, 4, 0))) == (5,)
    assert len(g.alternating()) == 60
    assert len(g.point_stabilizer(0)) == 24
    klein = g.generate([(3, 4, 2, 0, 1), (0, 2, 1, 4, 3)])  # ⟨(0 3)(1 4), (1 2)(3 4)⟩
    assert len(klein) == 10  # the dihedral group D5: the symmetries of a pentagon, closed under the product
    sub = set(klein.tolist())
    assert all(int(g.mul[a, b]) in sub for a in sub for b in sub)


@pytest.mark.parametrize("n", [3, 4])
def test_cosets_partition_the_group(n):
    g = SymmetricGroup(n)
    h = g.point_stabilizer(n - 1)
    for labels in (g.left_cosets(h), g.right_cosets(h)):
        sizes = np.bincount(labels)
        assert len(sizes) == g.order // len(h) and (sizes == len(h)).all()
    left = g.left_cosets(h)
    # x and y share a left coset xH exactly when x⁻¹y lies in H
    hs = set(h.tolist())
    for x in range(g.order):
        for y in range(g.order):
            assert (left[x] == left[y]) == (int(g.mul[g.inv[x], y]) in hs)


def test_out_of_range_degree():
    with pytest.raises(ValueError, match="2 <= n <= 6"):
        SymmetricGroup(9)
