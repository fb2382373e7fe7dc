"""core/disentanglement.py: MIG, SAP and DCI against hand computations, closed forms and invariances.

Known answers used below:
- latents that copy the factors: I(z_k; v_k) = H(v_k) exactly (same bins), and the runner-up I between
  independent variables is only the plug-in bias, about (A - 1)(B - 1) / (2N) nats = 19 * 19 / 4000 = 0.09
  for 20 x 20 bins and N = 2000, against H(v_k) ~ ln 20 = 3.0; so each gap is about 0.97 and MIG > 0.9.
- latents mixed by a Hadamard matrix (entries +-1/sqrt(J)) from factors that are independent and symmetric
  about their means: every latent is the factor plus an equally distributed rest, so in the population
  all I(z_j; v_k) (and all r^2, all classifier accuracies) are equal over j and every gap is exactly 0.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vaeflow.core.disentanglement import (
    dci,
    discrete_entropy,
    discrete_mutual_information,
    disentanglement_scores,
    histogram_discretize,
    lasso,
    mig,
    sap,
)

N = 2000
DISCRETE = [True, False, False, False]  # a 4-class factor and three continuous ones


def synthetic_factors(n: int = N, seed: int = 0) -> torch.Tensor:
    """Independent factors (n, 4): class id in 0..3, then three uniform [0, 1) columns."""
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.randint(4, (n, 1), generator=g).double(), torch.rand(n, 3, generator=g, dtype=torch.float64)], 1)


def with_noise_dims(factors: torch.Tensor, extra: int = 3, seed: int = 1) -> torch.Tensor:
    """The factors themselves as latents (N, K + extra), followed by `extra` nuisance dims of pure noise."""
    g = torch.Generator().manual_seed(seed)
    return torch.cat([factors, torch.randn(len(factors), extra, generator=g, dtype=factors.dtype)], 1)


def standardize(x: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit variance columns, so that a rotation mixes factors in equal measure."""
    return (x - x.mean(0)) / x.std(0)


def random_rotation(d: int, seed: int) -> torch.Tensor:
    """A random orthogonal (d, d) matrix from the QR factorisation of a Gaussian one."""
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def hadamard(d: int) -> torch.Tensor:
    """Sylvester's orthogonal Hadamard matrix (d, d), d a power of 2, entries +-1/sqrt(d)."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while len(h) < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h / math.sqrt(d)


@pytest.fixture(scope="module")
def shapes_factors() -> torch.Tensor:
    """The real `shapes` test-split factors (2000, 5): shape id, scale, rotation, x, y."""
    from vaeflow.plugins.datasets import Shapes

    return Shapes(Shapes.Options(n_train=10, n_test=2000)).factors("test")


SHAPES_DISCRETE = [True, False, False, False, False]


# ------------------------------------------------------------------------------------ histograms, MI by hand
def test_histogram_discretize_matches_numpy_histogram_digitize():
    """Bins are disentanglement_lib's np.digitize(x, np.histogram(x, bins)[1][:-1]) - 1, edges included."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 4, generator=g, dtype=torch.float64)
    x[:, 1] = torch.randint(7, (1000,), generator=g).double() * 0.1  # values on bin edges
    x[:21, 2] = torch.linspace(0, 1, 21, dtype=torch.float64)  # every edge of 20 bins over [0, 1]
    x[:, 3] = 3.0  # constant
    ref = np.stack([np.digitize(c, np.histogram(c, 20)[1][:-1]) - 1 for c in x.numpy().T], 1)
    got = histogram_discretize(x, 20)
    assert got.dtype == torch.long
    np.testing.assert_array_equal(got.numpy(), ref)
    assert got[:, 0].min() == 0 and got[:, 0].max() == 19


def test_mutual_information_of_a_2x2_table_by_hand():
    """Counts [[3, 1], [1, 3]] over 8 rows: I = 3/4 ln(3/2) + 1/4 ln(1/2) nats, H = ln 2 per variable."""
    a = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    b = torch.tensor([0, 0, 0, 1, 1, 1, 1, 0])
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)  # 0.1308...
    mi = discrete_mutual_information(a[:, None], b[:, None])
    assert mi.shape == (1, 1)
    assert float(mi[0, 0]) == pytest.approx(expected, rel=1e-12)
    assert float(discrete_mutual_information(b[:, None], a[:, None])[0, 0]) == pytest.approx(expected, rel=1e-12)
    assert discrete_entropy(b[:, None]).tolist() == pytest.approx([math.log(2)], rel=1e-12)

    # through mig(): latent 0 is a (two values -> bins 0 and 19), latent 1 is constant (I = 0)
    latents = torch.stack([a.double(), torch.zeros(8, dtype=torch.float64)], 1)  # (8, 2)
    out = mig(latents, b.double()[:, None], [True])
    assert [row[0] for row in out["mutual_information"]] == pytest.approx([expected, 0.0], rel=1e-12, abs=1e-15)
    assert out["mig"] == pytest.approx(expected / math.log(2), rel=1e-12)

    # a continuous factor with the same two values lands in the same two bins: the same answer
    assert mig(latents, b.double()[:, None], [False])["mig"] == pytest.approx(expected / math.log(2), rel=1e-12)


# ------------------------------------------------------------------------------------ MIG and SAP: known answers
def test_copied_factors_give_mig_and_sap_near_one():
    """Latents = factors + 3 noise dims: I(z_k; v_k) = H(v_k), MIG > 0.9 (bias bound in the docstring), SAP high."""
    f = synthetic_factors()
    z = with_noise_dims(f)
    out = mig(z, f, DISCRETE)
    mi = torch.tensor(out["mutual_information"])  # (7, 4)
    assert torch.allclose(mi.diagonal(), torch.tensor(out["entropy"], dtype=mi.dtype), rtol=1e-12)
    assert mi[4:].max() < 19 * 19 / N * 1.5  # noise dims carry only the plug-in bias
    assert out["mig"] > 0.9 and min(out["mig_per_factor"]) > 0.9

    s = sap(z, f, DISCRETE)
    assert min(s["sap_per_factor"][1:]) > 0.98  # continuous: r^2 = 1 against r^2 = O(1/N)
    # 4 classes: balanced accuracy 1 against about chance 1/4 for any other latent, so the gap is about 3/4
    assert s["sap_per_factor"][0] == pytest.approx(0.75, abs=0.1)
    assert s["sap"] > 0.9


def test_rotated_codes_give_low_mig_and_sap():
    """The same codes (standardized) mixed by a random rotation, or a Hadamard one, lose their gaps."""
    f = synthetic_factors()
    z = with_noise_dims(standardize(f), extra=4)  # (N, 8)
    rotated = z @ random_rotation(8, seed=0)
    assert mig(rotated, f, DISCRETE)["mig"] < 0.2
    assert sap(rotated, f, DISCRETE)["sap"] < 0.3

    mixed = z @ hadamard(8)  # population gaps are exactly 0 (module docstring)
    assert mig(mixed, f, DISCRETE)["mig"] < 0.05
    assert sap(mixed, f, DISCRETE)["sap"] < 0.1


def test_mig_is_invariant_to_permuting_and_rescaling_latents():
    """Histogram bins follow each latent's own range: order, scale, shift and sign do not matter."""
    f = synthetic_factors()
    z = with_noise_dims(f) + 0.05 * torch.randn(N, 7, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    base = mig(z, f, DISCRETE)
    perm = torch.tensor([6, 2, 0, 5, 3, 1, 4])
    permuted = mig(z[:, perm], f, DISCRETE)
    assert permuted["mig"] == base["mig"]
    assert permuted["mutual_information"] == torch.tensor(base["mutual_information"], dtype=torch.float64)[perm].tolist()
    powers_of_two = torch.tensor([4.0, 0.25, 2.0 ** -10, 1024.0, 8.0, 0.5, 2.0], dtype=torch.float64)
    assert mig(z * powers_of_two, f, DISCRETE)["mig"] == base["mig"]  # exact in floating point
    affine = z * torch.tensor([-3.7, 0.01, 250.0, -1.0, 7.3, 1e-3, -42.0], dtype=torch.float64) + 5.0
    assert mig(affine, f, DISCRETE)["mig_per_factor"] == pytest.approx(base["mig_per_factor"], abs=1e-3)


def test_a_factor_copied_into_two_latents_has_zero_gap():
    """Two identical latents share I_(1) = I_(2), so that factor's gap is 0; the other factors keep theirs."""
    f = synthetic_factors()
    z = torch.cat([f[:, 1:2], with_noise_dims(f)], 1)  # factor 1 twice
    out = mig(z, f, DISCRETE)
    assert out["mig_per_factor"][1] == 0.0
    assert min(out["mig_per_factor"][i] for i in (0, 2, 3)) > 0.9
    assert sap(z, f, DISCRETE)["sap_per_factor"][1] == 0.0


# ------------------------------------------------------------------------------------ SAP score matrix: closed forms
def test_sap_continuous_score_is_the_r2_of_a_noisy_copy():
    """z = v + sigma * eps with v, eps standard normal: R^2 = 1 / (1 + sigma^2); a rescaled exact copy has R^2 = 1."""
    g = torch.Generator().manual_seed(3)
    v = torch.randn(4000, 1, generator=g, dtype=torch.float64)
    z = torch.cat([v + torch.randn(4000, 1, generator=g, dtype=torch.float64), -2.5 * v + 1.0], 1)  # sigma = 1
    score = sap(z, v, [False])["score_matrix"]
    assert score[0][0] == pytest.approx(0.5, abs=0.03)
    assert score[1][0] == pytest.approx(1.0, abs=1e-12)


def test_sap_discrete_score_is_the_held_out_balanced_accuracy():
    """Two classes at 0 and 1 with N(0, 0.5^2) noise: the mean-midpoint rule is right with probability Phi(1)."""
    g = torch.Generator().manual_seed(4)
    y = (torch.rand(5000, generator=g) < 0.3).double()  # imbalanced classes: balanced accuracy is still Phi(1)
    noisy = y + 0.5 * torch.randn(5000, generator=g, dtype=torch.float64)  # (N,)
    z = torch.stack([noisy, torch.zeros(5000, dtype=torch.float64)], 1)  # (N, 2): the noisy id and a constant
    score = sap(z, y[:, None], [True])["score_matrix"]
    phi_1 = 0.5 * (1 + math.erf(1 / math.sqrt(2)))  # 0.8413
    assert score[0][0] == pytest.approx(phi_1, abs=0.03)
    assert score[1][0] == pytest.approx(0.5, abs=1e-12)  # a constant latent predicts one class: recall 1 and 0


# ------------------------------------------------------------------------------------ DCI
def test_dci_separates_copied_from_mixed_codes_and_keeps_informativeness():
    """Copies: D, C near 1. Hadamard mix: D, C near 0. A rotation loses no information: I_k is unchanged."""
    f = synthetic_factors()
    z = with_noise_dims(standardize(f), extra=4)  # (N, 8)
    copied, mixed = dci(z, f, DISCRETE), dci(z @ hadamard(8), f, DISCRETE)
    assert copied["dci_disentanglement"] > 0.9 and copied["dci_completeness"] > 0.9
    assert mixed["dci_disentanglement"] < 0.1 and mixed["dci_completeness"] < 0.1
    assert min(copied["informativeness_per_factor"][1:]) > 0.99  # continuous factors: a linear copy
    assert mixed["informativeness_per_factor"] == pytest.approx(copied["informativeness_per_factor"], abs=0.01)


def test_lasso_on_an_orthonormal_design_soft_thresholds_least_squares():
    """With X^T X / N = I the Lasso solution is sign(c) max(|c| - alpha, 0) for c = X^T y / N."""
    x = hadamard(8)[:, :4] * math.sqrt(8)  # (8, 4): orthogonal +-1 columns, X^T X / 8 = I
    y = torch.tensor([[3.0, 1.0, -2.0, 0.5, 0.0, 1.5, -1.0, 2.0], [1.0] * 8], dtype=torch.float64).T  # (8, 2)
    c = x.T @ y / 8  # (4, 2)
    expected = torch.sign(c) * (c.abs() - 0.3).clamp_min(0.0)
    assert torch.allclose(lasso(x, y, alpha=0.3), expected, atol=1e-10)


# ------------------------------------------------------------------------------------ the real shapes factors
def test_shapes_factors_copied_score_high_and_rotated_score_low(shapes_factors):
    """Shapes factors plus 1% noise and a noise dim: high MIG, SAP, D; standardized and rotated: low."""
    f = shapes_factors  # (2000, 5) float32
    g = torch.Generator().manual_seed(5)
    noisy = f + 0.01 * f.std(0) * torch.randn(f.shape, generator=g)
    z = torch.cat([noisy, torch.randn(len(f), 1, generator=g)], 1)  # (2000, 6)
    names = ("shape", "scale", "rotation", "x", "y")
    high = disentanglement_scores(z, f, names, SHAPES_DISCRETE)
    assert high["mig"] > 0.8 and high["sap"] > 0.85 and high["dci_disentanglement"] > 0.9
    assert high["mig/shape"] > 0.95  # 4 well-separated ids survive 1% noise untouched

    rotated = torch.cat([standardize(f), torch.randn(len(f), 1, generator=g)], 1) @ random_rotation(6, seed=0).float()
    low = disentanglement_scores(rotated, f, names, SHAPES_DISCRETE)
    assert low["mig"] < 0.2 and low["sap"] < 0.3 and low["dci_disentanglement"] < 0.4


def test_disentanglement_scores_are_flat_floats_that_match_the_parts():
    """One flat float per key, the same numbers as mig(), sap() and dci() give."""
    f = synthetic_factors(n=500)
    z = with_noise_dims(f)
    names = ["shape", "a", "b", "c"]
    out = disentanglement_scores(z, f, names, DISCRETE)
    assert all(isinstance(v, float) for v in out.values())
    per_factor = {f"{m}/{n}" for m in ("mig", "sap", "dci_completeness", "dci_informativeness") for n in names}
    assert set(out) == {"mig", "sap", "dci_disentanglement", "dci_completeness", "dci_informativeness"} | per_factor
    assert out["mig"] == mig(z, f, DISCRETE)["mig"]
    assert out["sap/b"] == sap(z, f, DISCRETE)["sap_per_factor"][2]
    assert out["dci_completeness"] == dci(z, f, DISCRETE)["dci_completeness"]


# ------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("latents, factors, discrete, match", [
    (torch.zeros(10, 3), torch.zeros(9, 2), [False, False], "10 rows but factors have 9"),
    (torch.zeros(10, 3), torch.zeros(10, 2), [False], "one flag per factor"),
    (torch.zeros(10), torch.zeros(10, 2), [False, False], r"\(N, J\)"),
    (torch.zeros(10, 1), torch.zeros(10, 2), [False, False], "at least 2 latent dimensions"),
    (torch.full((10, 3), float("nan")), torch.zeros(10, 2), [False, False], "finite"),
])
def test_bad_inputs_say_what_is_wrong(latents, factors, discrete, match):
    """Shape and flag mistakes raise ValueError naming the problem."""
    with pytest.raises(ValueError, match=match):
        mig(latents, factors, discrete)


def test_a_constant_factor_is_refused_by_mig():
    """H(v_k) = 0 makes the MIG gap 0/0: refuse it by column rather than return NaN."""
    f = torch.stack([torch.arange(10.0), torch.ones(10)], 1)
    with pytest.raises(ValueError, match=r"factor column\(s\) \[1\]"):
        mig(torch.randn(10, 3), f, [False, False])
