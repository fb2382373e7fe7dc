"""Disentanglement scores of posterior means against known generative factors: MIG, SAP and DCI.

MIG:  Chen et al. 2018, "Isolating Sources of Disentanglement in VAEs", https://arxiv.org/abs/1802.04942
SAP:  Kumar et al. 2018, "Variational Inference of Disentangled Latent Concepts from Unlabeled
      Observations", https://arxiv.org/abs/1711.00848
DCI:  Eastwood & Williams 2018, "A Framework for the Quantitative Evaluation of Disentangled
      Representations", https://openreview.net/forum?id=By-7dz-AZ

Every score takes the posterior means `latents` (N, J) (one row per example, J latent dimensions)
and the ground-truth `factors` (N, K) with `discrete[k]` saying whether factor k is categorical.
Scores follow disentanglement_lib (Locatello et al. 2019) where the papers leave a choice open; each
function's docstring says where they differ. Everything is computed in float64 with torch alone.

Scores are 1 for an ideal code and near 0 for an entangled one, but none is exactly 0 or 1 on a
finite sample: histograms and held-out splits add a small positive bias to the runner-up term.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch


# ------------------------------------------------------------------------------------ inputs
def _check_inputs(latents: torch.Tensor, factors: torch.Tensor,
                  discrete: Sequence[bool]) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate (N, J) latents, (N, K) factors and K discrete flags; return both as float64 on the CPU."""
    if latents.dim() != 2:
        raise ValueError(f"latents must be (N, J) posterior means, got shape {tuple(latents.shape)}")
    if factors.dim() != 2:
        raise ValueError(f"factors must be (N, K), one column per generative factor, "
                         f"got shape {tuple(factors.shape)}")
    if len(latents) != len(factors):
        raise ValueError(f"latents have {len(latents)} rows but factors have {len(factors)}: "
                         f"give one row per example to both")
    if len(discrete) != factors.shape[1]:
        raise ValueError(f"discrete has {len(discrete)} flags but factors have {factors.shape[1]} columns: give one flag per factor")
    if len(latents) < 2:
        raise ValueError(f"need at least 2 examples, got {len(latents)}")
    if latents.shape[1] < 2:
        raise ValueError(f"need at least 2 latent dimensions to take a gap between the top two, got {latents.shape[1]}")
    z, v = latents.detach().double().cpu(), factors.detach().double().cpu()
    if not (torch.isfinite(z).all() and torch.isfinite(v).all()):
        raise ValueError("latents and factors must be finite; found NaN or Inf")
    return z, v


def _split(n: int, train_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random train and test row indices (n_train,), (n - n_train,) from a seeded permutation."""
    n_train = round(train_fraction * n)
    if not 1 <= n_train <= n - 1:
        raise ValueError(f"train_fraction={train_fraction} leaves an empty train or test split of {n} examples; "
                         f"use a value in (0, 1) with at least one example on each side")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))  # (N,)
    return perm[:n_train], perm[n_train:]


def _class_ids(column: torch.Tensor) -> torch.Tensor:
    """Map the distinct values of a categorical column (N,) to ids 0..C-1 in sorted order: (N,) long."""
    return torch.unique(column, return_inverse=True)[1]


# ------------------------------------------------------------------------------------ histograms and information
def histogram_discretize(values: torch.Tensor, bins: int = 20) -> torch.Tensor:
    """Bin each column of (N, D) values into `bins` equal-width bins over its own [min, max]: (N, D) long in 0..bins-1.

    Same as disentanglement_lib's `np.digitize(x, np.histogram(x, bins)[1][:-1]) - 1`: a value on an inner
    edge goes to the upper bin, the maximum to the last bin; a constant column lands in one bin.
    """
    if bins < 1:
        raise ValueError(f"bins must be a positive integer, got {bins}")
    x = values.double()  # (N, D)
    lo, hi = x.min(0).values, x.max(0).values  # (D,), (D,)
    const = hi == lo
    lo, hi = torch.where(const, lo - 0.5, lo), torch.where(const, hi + 0.5, hi)  # numpy widens a constant range
    out = torch.empty(x.shape, dtype=torch.long)
    for d in range(x.shape[1]):
        left_edges = lo[d] + torch.arange(bins, dtype=torch.float64) * ((hi[d] - lo[d]) / bins)  # (bins,) as np.linspace
        out[:, d] = torch.bucketize(x[:, d].contiguous(), left_edges, right=True) - 1
    return out


def discretize_factors(factors: torch.Tensor, discrete: Sequence[bool], bins: int = 20) -> torch.Tensor:
    """Categorical factor columns to class ids 0..C-1, continuous ones to `bins` histogram bins: (N, K) long."""
    binned = histogram_discretize(factors, bins)  # (N, K)
    for k, is_discrete in enumerate(discrete):
        if is_discrete:
            binned[:, k] = _class_ids(factors[:, k])
    return binned


def _joint_counts(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Contingency table of two id columns (N,), (N,): (A, B) float64 counts."""
    na, nb = int(a.max()) + 1, int(b.max()) + 1
    return torch.bincount(a * nb + b, minlength=na * nb).reshape(na, nb).double()  # (A, B)


def discrete_mutual_information(codes: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Plug-in mutual information I(z_j; v_k) in nats between id columns (N, J) and (N, K): (J, K).

    I = sum_ab p(a, b) log[p(a, b) / (p(a) p(b))] over the empirical joint histogram, as sklearn's
    `mutual_info_score`.
    """
    mi = torch.zeros(codes.shape[1], factors.shape[1], dtype=torch.float64)  # (J, K)
    for j in range(codes.shape[1]):
        for k in range(factors.shape[1]):
            p = _joint_counts(codes[:, j], factors[:, k])  # (A, B)
            p = p / p.sum()
            pa, pb = p.sum(1, keepdim=True), p.sum(0, keepdim=True)  # (A, 1), (1, B)
            nz = p > 0
            mi[j, k] = (p[nz] * (p[nz].log() - (pa * pb)[nz].log())).sum().clamp_min(0.0)
    return mi


def discrete_entropy(codes: torch.Tensor) -> torch.Tensor:
    """Plug-in entropy H(v_k) in nats of each id column of (N, K): (K,)."""
    out = torch.zeros(codes.shape[1], dtype=torch.float64)  # (K,)
    for k in range(codes.shape[1]):
        p = torch.bincount(codes[:, k]).double()
        p = p[p > 0] / len(codes)
        out[k] = -(p * p.log()).sum()
    return out


# ------------------------------------------------------------------------------------ MIG
def mig(latents: torch.Tensor, factors: torch.Tensor, discrete: Sequence[bool], bins: int = 20) -> dict:
    """Mutual Information Gap (Chen et al. 2018, eq. 6) of latents (N, J) against factors (N, K).

    Each latent dimension and each continuous factor is cut into `bins` equal-width histogram bins;
    a discrete factor keeps its own values as classes. For factor k, with I_(1) >= I_(2) the two
    largest I(z_j; v_k) over j, the gap is (I_(1) - I_(2)) / H(v_k); MIG is the mean gap over factors.
    Chen et al. estimate I from the encoder's full posterior; this is disentanglement_lib's histogram
    estimate on the posterior means, which is biased upwards by about (A - 1)(B - 1) / (2N) nats per pair.
    Returns {"mig": float, "mig_per_factor": [K], "mutual_information": J x K nats, "entropy": [K] nats}.
    """
    z, v = _check_inputs(latents, factors, discrete)  # (N, J), (N, K)
    v_ids = discretize_factors(v, discrete, bins)  # (N, K)
    mi = discrete_mutual_information(histogram_discretize(z, bins), v_ids)  # (J, K)
    entropy = discrete_entropy(v_ids)  # (K,)
    constant = (entropy == 0).nonzero().flatten().tolist()
    if constant:
        raise ValueError(f"factor column(s) {constant} take a single value over the {len(v)} examples, so their "
                         f"entropy is 0 and the MIG gap is undefined; drop them from factors and discrete")
    top2 = mi.topk(2, dim=0).values  # (2, K)
    per_factor = (top2[0] - top2[1]) / entropy  # (K,)
    return {"mig": float(per_factor.mean()), "mig_per_factor": per_factor.tolist(),
            "mutual_information": mi.tolist(), "entropy": entropy.tolist()}


# ------------------------------------------------------------------------------------ SAP
def _squared_correlation(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """R^2 of the one-variable linear regression of y (N,) on each latent of z (N, J), i.e. Pearson r^2: (J,).

    A latent with (near) zero variance scores 0, as in disentanglement_lib.
    """
    zc, yc = z - z.mean(0), y - y.mean()  # (N, J), (N,)
    var_z, var_y = zc.pow(2).mean(0), yc.pow(2).mean()  # (J,), ()
    cov = (zc * yc[:, None]).mean(0)  # (J,)
    r2 = cov.pow(2) / (var_z * var_y).clamp_min(1e-300)
    return torch.where(var_z > 1e-12, r2, torch.zeros_like(r2))


def _nearest_class_mean_balanced_accuracy(z_train: torch.Tensor, y_train: torch.Tensor,
                                          z_test: torch.Tensor, y_test: torch.Tensor) -> torch.Tensor:
    """Held-out balanced accuracy of a 1-D nearest-class-mean classifier on each latent alone: (J,).

    Fit: the train mean of each latent per class. Predict: the class whose mean is closest. Score: the
    mean over classes present in the test split of the fraction of that class predicted right (chance 1/C).
    """
    classes = torch.unique(y_train)  # (C,)
    means = torch.stack([z_train[y_train == c].mean(0) for c in classes])  # (C, J)
    pred = classes[(z_test[:, :, None] - means.T[None]).abs().argmin(-1)]  # (N_test, J)
    correct = pred == y_test[:, None]  # (N_test, J)
    recalls = [correct[y_test == c].double().mean(0) for c in torch.unique(y_test)]  # C_test x (J,)
    return torch.stack(recalls).mean(0)


def sap(latents: torch.Tensor, factors: torch.Tensor, discrete: Sequence[bool],
        train_fraction: float = 0.8, seed: int = 0) -> dict:
    """Separated Attribute Predictability (Kumar et al. 2018, sec. 3) of latents (N, J) against factors (N, K).

    Score matrix S[j, k]: for a continuous factor, the R^2 of a linear regression of v_k on z_j alone
    (the squared Pearson correlation, on the train split as in disentanglement_lib); for a discrete factor,
    the balanced accuracy on the held-out split of a nearest-class-mean classifier of v_k from z_j alone
    fit on the train split (disentanglement_lib uses a linear SVM and plain accuracy instead). SAP is the
    mean over factors of the gap between the two largest S[j, k] over j. A noise latent scores about
    1/C on a C-class factor, so that factor's gap is at most about 1 - 1/C, not 1.
    Returns {"sap": float, "sap_per_factor": [K], "score_matrix": J x K}.
    """
    z, v = _check_inputs(latents, factors, discrete)  # (N, J), (N, K)
    train, test = _split(len(z), train_fraction, seed)  # (N_train,), (N_test,)
    score = torch.zeros(z.shape[1], v.shape[1], dtype=torch.float64)  # (J, K)
    for k, is_discrete in enumerate(discrete):
        if is_discrete:
            y = _class_ids(v[:, k])  # (N,)
            score[:, k] = _nearest_class_mean_balanced_accuracy(z[train], y[train], z[test], y[test])
        else:
            score[:, k] = _squared_correlation(z[train], v[train, k])
    top2 = score.topk(2, dim=0).values  # (2, K)
    per_factor = top2[0] - top2[1]  # (K,)
    return {"sap": float(per_factor.mean()), "sap_per_factor": per_factor.tolist(), "score_matrix": score.tolist()}


# ------------------------------------------------------------------------------------ DCI
def _standardize(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Centre and scale the columns of x (M, D) by the mean and std of ref (N, D); constant columns become 0."""
    mean, std = ref.mean(0), ref.std(0, unbiased=False)  # (D,), (D,)
    return torch.where(std > 1e-12, (x - mean) / std.clamp_min(1e-12), torch.zeros_like(x))


def lasso(x: torch.Tensor, y: torch.Tensor, alpha: float, max_iter: int = 1000, tol: float = 1e-8) -> torch.Tensor:
    """Lasso weights W (J, T) minimising ||y - x W||^2 / (2N) + alpha |W|_1 for centred x (N, J), y (N, T).

    Cyclic coordinate descent on the Gram matrix (sklearn's objective, no intercept).
    """
    n = len(x)
    gram, cross = x.T @ x / n, x.T @ y / n  # (J, J), (J, T)
    w = torch.zeros(x.shape[1], y.shape[1], dtype=x.dtype)  # (J, T)
    for _ in range(max_iter):
        largest_step = 0.0
        for j in range(x.shape[1]):
            if gram[j, j] <= 0:
                continue
            rho = cross[j] - gram[j] @ w + gram[j, j] * w[j]  # (T,)
            new = torch.sign(rho) * (rho.abs() - alpha).clamp_min(0.0) / gram[j, j]  # (T,)
            largest_step = max(largest_step, float((new - w[j]).abs().max()))
            w[j] = new
        if largest_step < tol:
            break
    return w


def _normalized_entropy(p: torch.Tensor, dim: int) -> torch.Tensor:
    """Entropy of the distributions p along `dim`, in units of log(size of dim), so in [0, 1]."""
    size = p.shape[dim]
    if size == 1:
        return torch.zeros(p.sum(dim).shape, dtype=p.dtype)
    return -(p * p.clamp_min(1e-300).log()).sum(dim) / math.log(size)


def dci(latents: torch.Tensor, factors: torch.Tensor, discrete: Sequence[bool],
        train_fraction: float = 0.8, seed: int = 0, alpha: float = 0.02) -> dict:
    """Disentanglement, completeness, informativeness (Eastwood & Williams 2018) with a Lasso probe.

    Regressor: Lasso (their linear choice, eq. 2 with R[j, k] = |W[j, k]|) with penalty `alpha` on the
    standardized latents and factors of the train split; a discrete factor is one-hot encoded, each class
    a standardized target, and its importance is the mean of |W| over its classes. disentanglement_lib uses
    gradient-boosted trees instead, so numbers are not comparable with it. From R (J, K):
    D_j = 1 - H_K(R[j] / sum_k R[j, k]), D = sum_j rho_j D_j with rho_j = sum_k R[j, k] / sum R;
    C_k = 1 - H_J(R[:, k] / sum_j R[j, k]), C = sum_k (sum_j R[j, k] / sum R) C_k (importance-weighted, as
    disentanglement_lib; the paper reports C_k per factor); I_k = held-out R^2 of the probe (= 1 - NRMSE^2,
    the paper reports NRMSE), averaged over a discrete factor's classes, I = mean_k I_k.
    Returns {"dci_disentanglement", "dci_completeness", "dci_informativeness": float,
    "disentanglement_per_code": [J], "completeness_per_factor": [K], "informativeness_per_factor": [K],
    "importance": J x K}.
    """
    z, v = _check_inputs(latents, factors, discrete)  # (N, J), (N, K)
    train, test = _split(len(z), train_fraction, seed)  # (N_train,), (N_test,)
    targets, owner = [], []  # target columns (N,) and the factor each belongs to
    for k, is_discrete in enumerate(discrete):
        if is_discrete:
            ids = _class_ids(v[:, k])  # (N,)
            onehot = torch.nn.functional.one_hot(ids).double()  # (N, C)
            targets += list(onehot.unbind(1))
            owner += [k] * onehot.shape[1]
        else:
            targets.append(v[:, k])
            owner.append(k)
    y = torch.stack(targets, 1)  # (N, T)
    owner_t = torch.tensor(owner)  # (T,)
    z_train, z_test = _standardize(z[train], z[train]), _standardize(z[test], z[train])  # (N_train, J), (N_test, J)
    y_train, y_test = _standardize(y[train], y[train]), _standardize(y[test], y[train])  # (N_train, T), (N_test, T)
    w = lasso(z_train, y_train, alpha)  # (J, T)
    counts = torch.bincount(owner_t, minlength=v.shape[1]).double()  # (K,) target columns per factor
    importance = torch.zeros(z.shape[1], v.shape[1], dtype=torch.float64).index_add_(1, owner_t, w.abs()) / counts  # (J, K)

    residual = (y_test - z_test @ w).pow(2).mean(0)  # (T,)
    total = (y_test - y_test.mean(0)).pow(2).mean(0)  # (T,)
    r2 = torch.where(total > 0, 1 - residual / total.clamp_min(1e-300), torch.zeros_like(total))  # (T,)
    informativeness = torch.zeros(v.shape[1], dtype=torch.float64).index_add_(0, owner_t, r2) / counts  # (K,)

    r = importance if importance.sum() > 0 else torch.ones_like(importance)  # (J, K)
    d_code = 1 - _normalized_entropy(r / r.sum(1, keepdim=True).clamp_min(1e-300), dim=1)  # (J,)
    d_code = torch.where(r.sum(1) > 0, d_code, torch.zeros_like(d_code))
    c_factor = 1 - _normalized_entropy(r / r.sum(0, keepdim=True).clamp_min(1e-300), dim=0)  # (K,)
    c_factor = torch.where(r.sum(0) > 0, c_factor, torch.zeros_like(c_factor))
    rho_code, rho_factor = r.sum(1) / r.sum(), r.sum(0) / r.sum()  # (J,), (K,)
    return {"dci_disentanglement": float((rho_code * d_code).sum()),
            "dci_completeness": float((rho_factor * c_factor).sum()),
            "dci_informativeness": float(informativeness.mean()),
            "disentanglement_per_code": d_code.tolist(), "completeness_per_factor": c_factor.tolist(),
            "informativeness_per_factor": informativeness.tolist(), "importance": importance.tolist()}


# ------------------------------------------------------------------------------------ all together
def disentanglement_scores(latents: torch.Tensor, factors: torch.Tensor, factor_names: Sequence[str],
                           discrete: Sequence[bool], bins: int = 20, seed: int = 0) -> dict[str, float]:
    """MIG, SAP and DCI of latents (N, J) against named factors (N, K) as flat floats for MLflow.

    Keys: "mig", "sap", "dci_disentanglement", "dci_completeness", "dci_informativeness", and per factor
    "mig/<name>", "sap/<name>", "dci_completeness/<name>", "dci_informativeness/<name>".
    """
    if len(factor_names) != factors.shape[-1]:
        raise ValueError(f"factor_names has {len(factor_names)} names but factors have {factors.shape[-1]} columns: "
                         f"give one name per factor, e.g. Shapes.FACTOR_NAMES")
    m = mig(latents, factors, discrete, bins)
    s = sap(latents, factors, discrete, seed=seed)
    d = dci(latents, factors, discrete, seed=seed)
    out = {"mig": m["mig"], "sap": s["sap"], "dci_disentanglement": d["dci_disentanglement"],
           "dci_completeness": d["dci_completeness"], "dci_informativeness": d["dci_informativeness"]}
    for k, name in enumerate(factor_names):
        out[f"mig/{name}"] = m["mig_per_factor"][k]
        out[f"sap/{name}"] = s["sap_per_factor"][k]
        out[f"dci_completeness/{name}"] = d["completeness_per_factor"][k]
        out[f"dci_informativeness/{name}"] = d["informativeness_per_factor"][k]
    return out
