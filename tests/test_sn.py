import math

import numpy as np
import pytest
import torch

from grokinterp.config import ModelConfig, RunConfig, TaskConfig
from grokinterp.groups import SymmetricGroup
from grokinterp.metrics.base import Checkpoint
from grokinterp.metrics.sn import (
    coset_metrics,
    coset_score,
    coset_scores,
    irrep_fve,
    irrep_metrics,
    key_irreps,
    logit_similarity,
    random_label_draws,
    subgroup_families,
    symmetric_group,
)
from grokinterp.model import answer_logits, build_model
from grokinterp.tasks import build_task


def rep_embedding(group: SymmetricGroup, names: list[str], d: int = 64, seed: int = 0) -> np.ndarray:
    """Rows = flattened ρ(g) of the named irreps, side by side, mixed into d dimensions by a random matrix."""
    rows = np.concatenate([group.irrep(k).matrices.reshape(group.order, -1) for k in names], axis=1)
    return rows @ np.random.default_rng(seed).normal(size=(rows.shape[1], d))


# ---- groups.py: classes, irreps, characters ---------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 3, 4, 5, 6])
def test_classes_are_the_cycle_types(n):
    g = symmetric_group(n)
    assert len(g.partitions) == len(g.conjugacy_classes) == len(g.irreps)
    assert all(sum(shape) == n and list(shape) == sorted(shape, reverse=True) for shape in g.partitions)
    assert sorted(np.concatenate(g.conjugacy_classes).tolist()) == list(range(g.order))
    for c, members in enumerate(g.conjugacy_classes):
        assert all(g.cycle_type(int(x)) == g.partitions[c] for x in members)
        # closed under conjugation
        conj = g.mul[g.mul[:, members], g.inv[:, None]]
        assert set(conj.ravel().tolist()) == set(members.tolist())
    assert (g.class_of[g.identity] == g.partitions.index((1,) * n))


@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_irreps_are_orthogonal_homomorphisms(n):
    g = symmetric_group(n)
    assert sum(rho.dim**2 for rho in g.irreps) == g.order
    for rho in g.irreps:
        R = rho.matrices
        assert np.allclose(np.einsum("gab,gcb->gac", R, R), np.eye(rho.dim), atol=1e-12)  # orthogonal
        # ρ(x·y) = ρ(x)ρ(y) under this module's product, (x·y)(i) = x(y(i))
        assert np.allclose(R[g.mul], np.einsum("xab,ybc->xyac", R, R), atol=1e-12), rho.name
        # Schur: the |G| × d² matrix of entries has orthogonal columns of squared norm |G|/d
        B = R.reshape(g.order, -1)
        assert np.allclose(B.T @ B, g.order / rho.dim * np.eye(rho.dim**2), atol=1e-10)


def test_s6_irreps_are_homomorphisms_on_generators():
    g = symmetric_group(6)
    assert sorted(rho.dim for rho in g.irreps) == [1, 1, 5, 5, 5, 5, 9, 9, 10, 10, 16]
    gens = [g.index((1, 0, 2, 3, 4, 5)), g.index((1, 2, 3, 4, 5, 0))]
    for rho in g.irreps:
        R = rho.matrices
        for s in gens:
            assert np.allclose(R[g.mul[:, s]], R @ R[s], atol=1e-10)


def test_s5_irreps_and_character_table():
    g = symmetric_group(5)
    assert [rho.dim for rho in g.irreps] == [1, 4, 5, 6, 5, 4, 1]
    assert sorted(rho.dim for rho in g.irreps) == [1, 1, 4, 4, 5, 5, 6]
    assert [rho.name for rho in g.irreps] == ["trivial", "standard", "p32", "p311", "p221", "standard_sign", "sign"]
    assert g.irrep("wedge2") is g.irrep((3, 1, 1)) is g.irrep("p311")
    with pytest.raises(ValueError, match="no irrep"):
        g.irrep("six")
    table = g.character_table
    sizes = np.array([len(c) for c in g.conjugacy_classes])
    # row orthogonality: Σ_classes |C| χ_i χ_j = |G| δ_ij, and columns likewise
    assert np.array_equal(table * sizes @ table.T, g.order * np.eye(7, dtype=np.int64))
    assert np.array_equal(table.T @ table, np.diag(g.order // sizes))
    # characters are constant on classes and agree with the traces
    for i, rho in enumerate(g.irreps):
        assert np.allclose(rho.character, table[i, g.class_of])
    # known rows: trivial, sign, and standard = (fixed points) - 1
    fixed = (g.perms == np.arange(5)).sum(axis=1)
    assert np.allclose(g.irrep("trivial").character, 1)
    assert np.allclose(g.irrep("sign").character, g.sign)
    assert np.allclose(g.irrep("standard").character, fixed - 1)
    assert np.allclose(g.irrep("standard_sign").character, (fixed - 1) * g.sign)
    assert np.allclose(g.irrep("p221").character, g.irrep("p32").character * g.sign)


# ---- irrep FVE ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["standard", "sign", "p32", "standard_sign"])
def test_embedding_from_one_irrep_is_found_in_it(name):
    g = symmetric_group(5)
    fve = irrep_fve(rep_embedding(g, [name]), g)
    assert fve[name] >= 0.99
    assert key_irreps(fve) == [name]


def test_fve_sums_to_one_and_is_spread_by_dimension_for_random_embeddings():
    g = symmetric_group(5)
    W = torch.randn(g.order, 512, generator=torch.Generator().manual_seed(0))
    fve = irrep_fve(W, g)
    assert set(fve) == {rho.name for rho in g.irreps}
    assert sum(fve.values()) == pytest.approx(1.0, abs=1e-9)
    assert fve["trivial"] == pytest.approx(0.0, abs=1e-12)
    for rho in g.irreps[1:]:
        expected = rho.dim**2 / (g.order - 1)
        assert fve[rho.name] == pytest.approx(expected, rel=0.3), rho.name
    assert set(key_irreps(fve)) == {"standard", "p32", "p311", "p221", "standard_sign"}


def test_mixture_of_irreps_is_split_between_them():
    g = symmetric_group(4)
    fve = irrep_fve(rep_embedding(g, ["standard", "sign"], d=32), g)
    assert fve["standard"] + fve["sign"] == pytest.approx(1.0, abs=1e-9)
    assert min(fve["standard"], fve["sign"]) > 0.01


def test_fve_rejects_wrong_row_count():
    with pytest.raises(ValueError, match="one row per element"):
        irrep_fve(np.zeros((5, 3)), symmetric_group(3))


# ---- logit similarity ---------------------------------------------------------------------------------------


def character_logits(g: SymmetricGroup, weights: dict[str, float]) -> np.ndarray:
    """logit[x, y, z] = Σ_ρ w_ρ tr ρ(x)ρ(y)ρ(z⁻¹), from the matrices themselves (not through characters)."""
    out = np.zeros((g.order,) * 3)
    for name, w in weights.items():
        R = g.irrep(name).matrices
        out += w * np.einsum("xab,ybc,zca->xyz", R, R, R[g.inv])
    return out.reshape(g.order**2, g.order)


@pytest.mark.parametrize("n, name", [(4, "standard"), (5, "standard"), (5, "p311")])
def test_logit_template_of_one_irrep_is_recognised(n, name):
    g = symmetric_group(n)
    logits = character_logits(g, {name: 1.0})
    answers = g.mul.reshape(-1)
    assert (logits.argmax(axis=1) == answers).all()  # the trace is largest at z = x·y
    sims = logit_similarity(logits, answers, g)
    assert sims[name] == pytest.approx(1.0, abs=1e-9)
    assert all(abs(v) < 1e-9 for k, v in sims.items() if k != name)
    # a constant shift per pair and noise leave the standard template recognisable
    noisy = logits + np.random.default_rng(0).normal(size=logits.shape) * 0.1 + np.arange(len(logits))[:, None]
    assert logit_similarity(torch.from_numpy(noisy), torch.from_numpy(answers), g)[name] > 0.95


def test_logit_templates_of_two_irreps_split_the_variance():
    g = symmetric_group(4)
    sims = logit_similarity(character_logits(g, {"standard": 1.0, "sign": 2.0}), g.mul.reshape(-1), g)
    # each template has squared norm |G| per pair, so the weights 1 : 2 give cosines 1/√5 and 2/√5
    assert sims["standard"] == pytest.approx(1 / math.sqrt(5), abs=1e-9)
    assert sims["sign"] == pytest.approx(2 / math.sqrt(5), abs=1e-9)


# ---- cosets -------------------------------------------------------------------------------------------------


def coset_embedding(labels: np.ndarray, d: int = 32, noise: float = 0.1, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(labels.max() + 1, d))
    return centres[labels] + noise * rng.normal(size=(len(labels), d))


def test_subgroup_families_of_s5():
    g = symmetric_group(5)
    fam = subgroup_families(g)
    assert [len(h) for h in fam["stabilizer"]] == [24] * 5
    assert [len(h) for h in fam["alternating"]] == [60]
    assert len(fam["dihedral"]) == 6 and all(len(h) == 10 for h in fam["dihedral"])
    for h in fam["dihedral"]:
        members = set(h.tolist())
        assert all(int(g.mul[a, b]) in members for a in members for b in members)
    assert "dihedral" not in subgroup_families(symmetric_group(4))


@pytest.mark.parametrize("family, which", [("stabilizer", 2), ("dihedral", 3), ("alternating", 0)])
def test_left_coset_clusters_score_far_above_random_labels(family, which):
    g = symmetric_group(5)
    h = subgroup_families(g)[family][which]
    W = coset_embedding(g.left_cosets(h))
    scores = coset_scores(W, g)
    assert scores[f"left_{family}"] > 0.95
    assert scores[f"left_{family}_baseline"] < 0.3
    if family != "alternating":  # A5 is normal: its left and right cosets coincide
        assert scores[f"right_{family}"] < scores[f"left_{family}"] - 0.3


def test_random_label_baseline_matches_its_expectation():
    # For shuffled labels of k classes, E[between / total] = (k - 1) / (|G| - 1) exactly, whatever W is.
    g = symmetric_group(4)
    W = np.random.default_rng(1).normal(size=(g.order, 16))
    labels = g.left_cosets(g.point_stabilizer(0))
    assert random_label_draws(W, labels, n_draws=400).mean() == pytest.approx(3 / 23, rel=0.15)
    scores = coset_scores(W, g, {"stabilizer": [g.point_stabilizer(0)]}, n_draws=400)
    se = scores["left_stabilizer_baseline_se"]
    assert abs(scores["left_stabilizer_baseline"] - 3 / 23) < 4 * se and 0 < se < 0.01
    assert random_label_draws(W, labels, n_draws=50, best_of=4).mean() > random_label_draws(W, labels, n_draws=50).mean()


def test_silhouette_agrees_with_variance_score():
    g = symmetric_group(4)
    labels = g.left_cosets(g.point_stabilizer(1))
    W = coset_embedding(labels)
    assert coset_score(W, labels, "silhouette") > 0.8
    assert random_label_draws(W, labels, n_draws=4, method="silhouette").mean() < 0.1
    with pytest.raises(ValueError, match="unknown coset score"):
        coset_score(W, labels, "purity")


# ---- per-checkpoint rows ------------------------------------------------------------------------------------


def perm_checkpoint(n: int, **model) -> Checkpoint:
    config = RunConfig(task=TaskConfig(op="perm_mul", n=n, frac_train=0.5), model=ModelConfig(**model))
    data = build_task("perm_mul", 113, n, 0.5, 0)
    net = build_model(config.model, data.n_symbols).eval()
    return Checkpoint(step=0, model=net, data=data, config=config)


def test_checkpoint_rows_are_consistent_with_the_pure_functions():
    ckpt = perm_checkpoint(4, d_model=32, n_heads=2, d_head=16, d_mlp=64)
    g = symmetric_group(4)
    row = irrep_metrics(ckpt)
    assert all(isinstance(v, float) and math.isfinite(v) for v in row.values())
    embed = irrep_fve(ckpt.model.W_E[:24], g)
    assert row["embed_fve_standard"] == pytest.approx(embed["standard"])
    assert row["n_key_irreps_embed"] == len(key_irreps(embed))
    with torch.no_grad():
        logits = answer_logits(ckpt.model, ckpt.data.tokens)
    sims = logit_similarity(logits, ckpt.data.labels, g)
    assert row["logit_sim_sign"] == pytest.approx(sims["sign"], abs=1e-9)
    assert row["logit_character_fve"] == pytest.approx(sum(v**2 for v in sims.values()), abs=1e-12)
    assert row["logit_key_fve"] == pytest.approx(sum(sims[k] ** 2 for k in key_irreps(embed)), abs=1e-12)
    assert 0 < row["logit_key_fve"] <= row["logit_character_fve"] < 1
    cos = coset_metrics(ckpt)
    assert {"coset_left_stabilizer", "coset_left_stabilizer_baseline", "coset_right_alternating",
            "unembed_coset_left_stabilizer"} <= set(cos)
    assert cos == coset_metrics(ckpt)  # seeded


def test_s5_checkpoint_rows_have_every_column():
    """(Their speed is timed in benchmarks/analysis_speed.py, not here: a wall-clock bound flakes on a busy machine.)"""
    ckpt = perm_checkpoint(5)  # the default model: d_model 128, d_mlp 512
    row = {**irrep_metrics(ckpt), **coset_metrics(ckpt)}
    assert all(isinstance(v, float) and math.isfinite(v) for v in row.values())
    assert {"embed_fve_standard", "unembed_fve_sign", "n_key_irreps_embed", "logit_sim_standard",
            "coset_left_dihedral", "coset_left_dihedral_baseline"} <= set(row)


def test_metrics_refuse_a_mod_p_task(tiny):
    config = tiny()
    data = build_task("add", 7, 5, 0.6, 0)
    ckpt = Checkpoint(step=0, model=build_model(config.model, data.n_symbols), data=data, config=config)
    for metric in (irrep_metrics, coset_metrics):
        with pytest.raises(ValueError, match="permutation task"):
            metric(ckpt)


def test_restricted_and_excluded_losses_of_the_character_algorithm():
    """Logits α·d_ρ·χ_ρ(c·z⁻¹) of the standard irrep (c = x·y), plus per-pair noise that averages to 0 over the pairs
    of each answer (memorization that no function of the answer explains): keeping the standard irrep keeps exactly
    the algorithm, removing it leaves exactly the noise; an irrep the logits lack changes nothing."""
    from grokinterp.metrics.sn import _cross_entropy, restricted_and_excluded_losses

    g = symmetric_group(4)
    x, y = np.divmod(np.arange(g.order**2), g.order)
    answers = g.mul[x, y]
    rho = g.irrep("standard")
    algorithm = 4.0 * rho.dim * rho.character[g.mul[answers[:, None], g.inv[None, :]]]
    noise = np.random.default_rng(0).normal(size=algorithm.shape)
    for c in range(g.order):
        noise[answers == c] -= noise[answers == c].mean(axis=0)
    logits = algorithm + noise
    in_train = np.random.default_rng(1).random(len(answers)) < 0.5

    def batches():  # in two batches, as a model's logits are streamed
        half = len(answers) // 2
        for part in (slice(0, half), slice(half, None)):
            yield logits[part], answers[part], in_train[part]

    out = restricted_and_excluded_losses(batches, g, ["standard"])
    assert out["restricted_loss_keys"] == pytest.approx(_cross_entropy(algorithm, answers).mean(), rel=1e-10)
    assert out["excluded_loss_keys"] == pytest.approx(_cross_entropy(noise[in_train], answers[in_train]).mean(),
                                                      rel=1e-10)
    assert out["restricted_loss_standard"] == out["restricted_loss_keys"]
    assert out["restricted_loss_sign"] == pytest.approx(math.log(24), rel=1e-12)  # no sign component: uniform
    full = _cross_entropy(logits[in_train], answers[in_train]).mean()
    assert out["excluded_loss_sign"] == pytest.approx(full, rel=1e-10)
    assert out["restricted_loss_keys"] < 0.01 < math.log(24) - 1 < out["restricted_loss_sign"]
    assert {f"restricted_loss_{r.name}" for r in g.irreps if r.name != "trivial"} | {"restricted_loss_keys"} == {
        k for k in out if k.startswith("restricted_loss_")}


def test_irreps_row_uses_the_key_irreps_it_is_given():
    ckpt = perm_checkpoint(4, d_model=32, n_heads=2, d_head=16, d_mlp=64)
    own = irrep_metrics(ckpt)
    given = irrep_metrics(ckpt, key_irreps=["sign"])
    assert given["restricted_loss_keys"] == given["restricted_loss_sign"] == own["restricted_loss_sign"]
    assert given["excluded_loss_keys"] == pytest.approx(given["excluded_loss_sign"])
