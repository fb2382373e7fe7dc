"""The vq and vq-ema quantizers, checked against independent computations: brute-force distances, hand-written
gradients, a hand EMA step, and histograms counted in Python."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from collections import Counter

import pytest
import torch
from pydantic import ValidationError

import vaeflow.plugins.quantizers as quantizers
from vaeflow.core.registry import get_registry
from vaeflow.plugins.quantizers import EMAVQ, VQ

from conftest import ROOT

CLASSES = [VQ, EMAVQ]


def make(cls, embedding_dim: int, **options):
    """A quantizer with k-means and restarts off unless asked for."""
    options = {"kmeans_init": False, "restart_after": None, **options}
    return cls(cls.Options(**options), embedding_dim)


def flatten(z_e: torch.Tensor) -> torch.Tensor:
    """(B, D, h, w) -> (B*h*w, D), rows in (b, y, x) order."""
    return z_e.permute(0, 2, 3, 1).reshape(-1, z_e.shape[1])


def grid(vectors: list[list[float]], h: int, w: int) -> torch.Tensor:
    """Rows (h*w, D) in raster order -> z_e (1, D, h, w)."""
    return torch.tensor(vectors).T.reshape(1, -1, h, w)


def set_codebook(q, codes: torch.Tensor) -> None:
    """Overwrite every code of q with codes (K, D) as fresh codes."""
    q._set_codes(torch.ones(len(codes), dtype=torch.bool), codes.clone())


# --- lookup and nearest codes ----------------------------------------------------------------
@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
@pytest.mark.parametrize("training", [True, False])
def test_lookup_of_indices_is_quantized_exactly(cls, distance, training):
    torch.manual_seed(0)
    q = make(cls, 6, codebook_size=11, distance=distance, kmeans_init=True).train(training)
    z_e = torch.randn(3, 6, 4, 5)
    out = q(z_e)
    assert out.quantized.shape == (3, 6, 4, 5) and out.indices.shape == (3, 4, 5)
    assert out.indices.dtype == torch.int64
    if cls is EMAVQ and training:  # the EMA step moved the codes after quantizing: compare with the old codebook
        q.train(False)
        out = q(z_e)
    assert torch.equal(q.lookup(out.indices), out.quantized)


@pytest.mark.parametrize("cls", CLASSES)
def test_indices_are_the_brute_force_argmin(cls, monkeypatch):
    torch.manual_seed(1)
    monkeypatch.setattr(quantizers, "CHUNK_BYTES", 4 * 13 * 7)  # 7 rows per chunk: 60 rows, a ragged last chunk
    q = make(cls, 5, codebook_size=13).eval()  # eval: vq-ema's codebook stays as it was when quantizing
    z_e = torch.randn(3, 5, 4, 5)
    out = q(z_e)
    expected = torch.cdist(flatten(z_e).double(), q.codebook.detach().double()).argmin(1)  # (N,)
    assert torch.equal(out.indices.flatten(), expected)


@pytest.mark.parametrize("cls", CLASSES)
def test_cosine_indices_are_the_argmax_cosine_similarity(cls):
    torch.manual_seed(2)
    q = make(cls, 4, codebook_size=9, distance="cosine").eval()
    z_e = 3 * torch.randn(2, 4, 3, 3)
    out = q(z_e)
    z, codes = flatten(z_e).double(), q._raw_codebook().detach().double()
    cosine = (z @ codes.T) / z.norm(dim=1, keepdim=True) / codes.norm(dim=1)  # (N, K)
    assert torch.equal(out.indices.flatten(), cosine.argmax(1))
    assert torch.allclose(out.quantized.norm(dim=1), torch.ones(2, 3, 3))


def test_bf16_autocast_keeps_float32_distances():
    torch.manual_seed(3)
    q = make(EMAVQ, 8, codebook_size=32).eval()
    z_e = torch.randn(2, 8, 4, 4).bfloat16()
    expected = torch.cdist(flatten(z_e).double(), q.codebook.double()).argmin(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(z_e)
    assert torch.equal(out.indices.flatten(), expected)
    assert out.quantized.dtype == torch.bfloat16 and out.losses["commitment"].dtype == torch.float32


def test_wrong_embedding_dim_is_a_value_error():
    with pytest.raises(ValueError, match=r"\(B, 4, h, w\), got \(2, 3, 5, 5\)"):
        make(VQ, 4, codebook_size=8)(torch.randn(2, 3, 5, 5))


# --- gradients -------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_straight_through_gradient_is_the_identity(cls, distance):
    torch.manual_seed(4)
    q = make(cls, 4, codebook_size=8, distance=distance)
    z_e = torch.randn(2, 4, 3, 3, requires_grad=True)
    g = torch.randn(2, 4, 3, 3)
    (q(z_e).quantized * g).sum().backward()
    assert torch.equal(z_e.grad, g)


def test_vq_commitment_trains_only_the_encoder_and_codebook_only_the_codes():
    torch.manual_seed(5)
    beta, k = 0.3, 6
    q = make(VQ, 4, codebook_size=k, commitment=beta)
    set_codebook(q, torch.randn(k, 4))
    z_e = torch.randn(2, 4, 3, 5, requires_grad=True)
    out = q(z_e)
    e = q.lookup(out.indices).detach()  # (B, D, h, w)
    numel = z_e.numel()

    out.losses["commitment"].backward(retain_graph=True)
    assert q.embedding.grad is None or not q.embedding.grad.any()
    assert torch.allclose(z_e.grad, 2 * beta * (z_e.detach() - e) / numel, atol=1e-7)

    z_e.grad = None
    out.losses["codebook"].backward()
    assert z_e.grad is None or not z_e.grad.any()
    expected = torch.zeros(k, 4, dtype=torch.float64)  # d/de_k mean ||z - e||^2 = sum over its z of 2 (e_k - z) / numel
    for row, code in zip(flatten(z_e.detach()).double(), out.indices.flatten().tolist()):
        expected[code] += 2 * (q.embedding.detach()[code].double() - row) / numel
    assert torch.allclose(q.embedding.grad.double(), expected, atol=1e-7)
    assert torch.allclose(out.losses["codebook"], ((z_e - e) ** 2).mean())
    assert torch.allclose(out.losses["commitment"], beta * out.losses["codebook"])


def test_vq_ema_has_only_a_commitment_loss():
    torch.manual_seed(6)
    q = make(EMAVQ, 3, codebook_size=4, commitment=0.5)
    z_e = torch.randn(1, 3, 2, 2)
    out = q(z_e)
    assert set(out.losses) == {"commitment"}
    assert torch.allclose(out.losses["commitment"], 0.5 * ((z_e - out.quantized) ** 2).mean())
    assert not any(p.requires_grad for p in q.parameters())


# --- the EMA codebook ------------------------------------------------------------------------
@pytest.mark.parametrize("eps", [1e-5, 0.5])
def test_ema_step_matches_a_hand_computation(eps):
    gamma = 0.9
    q = make(EMAVQ, 2, codebook_size=2, decay=gamma, epsilon=eps)
    set_codebook(q, torch.tensor([[0.0, 0.0], [10.0, 10.0]]))  # N = (1, 1), m = e
    z_e = grid([[1, 0], [0, 1], [1, 1], [11, 11]], 2, 2)  # three vectors near code 0, one near code 1
    out = q(z_e)
    assert out.indices.flatten().tolist() == [0, 0, 0, 1]
    # by hand: n = (3, 1), sums = ((2, 2), (11, 11))
    n0, n1 = gamma * 1 + (1 - gamma) * 3, gamma * 1 + (1 - gamma) * 1  # 1.2, 1.0
    m0 = [(1 - gamma) * 2] * 2  # gamma * 0 + 0.1 * 2
    m1 = [gamma * 10 + (1 - gamma) * 11] * 2  # 10.1
    total = n0 + n1
    s0, s1 = (n0 + eps) / (total + 2 * eps) * total, (n1 + eps) / (total + 2 * eps) * total
    assert torch.allclose(q.cluster_size, torch.tensor([n0, n1]))
    assert torch.allclose(q.embed_sum, torch.tensor([m0, m1]))
    assert torch.allclose(q.codebook, torch.tensor([[m0[0] / s0] * 2, [m1[0] / s1] * 2]))

    before = {name: b.clone() for name, b in q.named_buffers()}
    q.eval()
    q(5 * z_e)
    assert all(torch.equal(before[name], b) for name, b in q.named_buffers())


# --- dead codes ------------------------------------------------------------------------------
def collapsed(cls, restart_after):
    """K = 4 codes, all inputs near code 0, codes 1-3 far away: three dead codes."""
    q = make(cls, 2, codebook_size=4, restart_after=restart_after)
    set_codebook(q, torch.tensor([[0.0, 0.0], [100.0, 100.0], [-100.0, 100.0], [100.0, -100.0]]))
    return q


@pytest.mark.parametrize("cls", CLASSES)
def test_dead_codes_restart_from_the_batch(cls):
    torch.manual_seed(7)
    q = collapsed(cls, restart_after=2)
    z_e = 0.1 * torch.randn(1, 2, 4, 4)
    rows = flatten(z_e)  # (16, 2)
    first = q(z_e)
    assert first.stats["usage"] == 0.25 and first.stats["dead_codes"] == 0  # unused for 1 step only
    assert q.unused_steps.tolist() == [0, 1, 1, 1]
    second = q(z_e)  # unused for 2 steps: restarted from this batch
    assert second.stats["dead_codes"] == 3
    assert q.unused_steps.tolist() == [0, 0, 0, 0]
    for code in q.codebook[1:]:
        assert (rows == code).all(1).any(), f"{code} is not a vector of the batch"
    if cls is EMAVQ:
        assert q.cluster_size[1:].tolist() == [1.0, 1.0, 1.0]
        assert torch.equal(q.embed_sum[1:], q.embedding[1:])
    third = q(z_e)
    assert third.stats["usage"] > 0.25


@pytest.mark.parametrize("cls", CLASSES)
def test_without_restart_dead_codes_stay_dead(cls):
    torch.manual_seed(8)
    q = collapsed(cls, restart_after=None)
    z_e = 0.1 * torch.randn(1, 2, 4, 4)
    for _ in range(4):
        out = q(z_e)
    assert out.stats["usage"] == 0.25 and out.stats["dead_codes"] == 3
    assert torch.allclose(q.codebook[1:], torch.tensor([[100.0, 100.0], [-100.0, 100.0], [100.0, -100.0]]),
                          rtol=0.05)


def test_restarts_are_reproducible_from_the_global_seed():
    codebooks = []
    for _ in range(2):
        torch.manual_seed(9)
        q = collapsed(VQ, restart_after=1)
        z_e = torch.randn(1, 2, 4, 4)
        q(z_e)
        codebooks.append(q.codebook.detach().clone())
    assert torch.equal(*codebooks)


# --- k-means initialisation ------------------------------------------------------------------
CENTRES = torch.tensor([[5.0, 5.0], [-5.0, 5.0], [-5.0, -5.0], [5.0, -5.0]])


def blobs(centres: torch.Tensor, per_blob: int = 64) -> torch.Tensor:
    """Gaussian blobs (std 0.1) around centres (C, D), shuffled -> z_e (1, D, C * per_blob, 1)."""
    points = (centres[:, None] + 0.1 * torch.randn(len(centres), per_blob, centres.shape[1])).reshape(-1, 2)
    points = points[torch.randperm(len(points))]
    return points.T.reshape(1, 2, -1, 1)


def matched_error(codebook: torch.Tensor, centres: torch.Tensor) -> float:
    """Largest distance from a centre to its nearest code, each code used once."""
    nearest = torch.cdist(centres, codebook).argmin(1)
    assert sorted(nearest.tolist()) == list(range(len(codebook)))
    return (centres - codebook[nearest]).norm(dim=1).max().item()


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kmeans_init_finds_the_blobs_and_is_not_rerun_after_resume(cls, seed, monkeypatch):
    torch.manual_seed(seed)
    q = make(cls, 2, codebook_size=4, kmeans_init=True)
    out = q(blobs(CENTRES))
    assert out.stats["usage"] == 1.0 and bool(q.initialized)
    assert matched_error(q.codebook.detach(), CENTRES) < 0.1

    def no_kmeans(*args, **kwargs):
        raise AssertionError("k-means ran again")

    monkeypatch.setattr(quantizers, "kmeans", no_kmeans)
    with pytest.raises(AssertionError, match="ran again"):  # a fresh module would initialise
        make(cls, 2, codebook_size=4, kmeans_init=True)(blobs(CENTRES))
    fresh = make(cls, 2, codebook_size=4, kmeans_init=True)
    fresh.load_state_dict(q.state_dict())
    fresh(blobs(CENTRES + 20.0))
    if cls is VQ:  # no gradient step and no restart: the codebook is exactly the loaded one
        assert torch.equal(fresh.codebook, q.codebook)


def test_kmeans_with_fewer_vectors_than_codes_samples_with_replacement():
    torch.manual_seed(10)
    rows = torch.randn(3, 2)
    starts = quantizers.kmeans(rows, 8, iters=0, spherical=False)  # the starting centroids
    assert starts.shape == (8, 2)
    assert all((rows == code).all(1).any() for code in starts)
    q = make(VQ, 2, codebook_size=8, kmeans_init=True)
    q(rows.T.reshape(1, 2, 3, 1))
    assert bool(q.initialized) and q.codebook.isfinite().all()


def test_kmeans_does_not_run_in_eval_mode():
    q = make(VQ, 2, codebook_size=4, kmeans_init=True).eval()
    before = q.codebook.detach().clone()
    q(blobs(CENTRES))
    assert torch.equal(q.codebook, before) and not bool(q.initialized)


# --- statistics, options, registry -----------------------------------------------------------
@pytest.mark.parametrize("cls", CLASSES)
def test_stats_match_histograms_counted_by_hand(cls):
    torch.manual_seed(11)
    k, decay = 16, 0.9
    q = make(cls, 3, codebook_size=k, usage_decay=decay)
    set_codebook(q, torch.randn(k, 3))
    z_e = torch.randn(2, 3, 3, 4)
    out = q(z_e)
    histogram = Counter(out.indices.flatten().tolist())
    n = sum(histogram.values())
    entropy = -sum(c / n * math.log(c / n) for c in histogram.values())
    assert out.stats["perplexity"].item() == pytest.approx(math.exp(entropy), rel=1e-5)
    assert out.stats["usage"].item() == pytest.approx(len(histogram) / k)
    # from the optimistic start of 1 per code: decay * 1 + (1 - decay) * used
    assert out.stats["usage_ema"].item() == pytest.approx(decay + (1 - decay) * len(histogram) / k)
    assert out.stats["dead_codes"].item() == k - len(histogram)
    assert all(not v.requires_grad and v.dim() == 0 for v in out.stats.values())
    assert out.stats["dead_codes"].dtype == torch.float32


def test_buffers_are_saved_in_the_state_dict():
    assert {"initialized", "unused_steps", "usage_ema", "embedding"} <= set(make(VQ, 2).state_dict())
    assert {"initialized", "unused_steps", "usage_ema", "embedding", "cluster_size", "embed_sum"} \
        <= set(make(EMAVQ, 2).state_dict())


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("bad", [{"codebook_size": 0}, {"commitment": -1.0}, {"restart_after": 0}, {"typo": 1}])
def test_bad_options_are_validation_errors(cls, bad):
    with pytest.raises(ValidationError):
        cls.Options(**bad)


def test_defaults():
    options = EMAVQ.Options()
    assert (options.codebook_size, options.commitment, options.decay, options.epsilon) == (512, 0.25, 0.99, 1e-5)
    assert (options.kmeans_init, options.kmeans_iters, options.restart_after) == (True, 10, 100)
    assert (options.distance, options.usage_decay) == ("euclidean", 0.99)


def test_registered_through_the_registry():
    registry = get_registry()
    assert registry.get("quantizer", "vq").cls is VQ
    assert registry.get("quantizer", "vq-ema").cls is EMAVQ


# --- torch.distributed -----------------------------------------------------------------------
RANK_SCRIPT = textwrap.dedent("""
    import sys
    import torch
    import torch.distributed as dist
    from vaeflow.plugins.quantizers import EMAVQ, VQ

    rank, init_file, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    results = {}
    for cls in (VQ, EMAVQ):  # k-means and restarts on: each rank sees other data and draws other numbers
        torch.manual_seed(0)
        q = cls(cls.Options(codebook_size=8, restart_after=1, kmeans_iters=3), 2)
        torch.manual_seed(100 + rank)
        for _ in range(3):
            q(torch.randn(2, 2, 4, 4))
        results[cls.name] = q.state_dict()
    torch.manual_seed(0)  # one plain EMA step on this rank's half of a global batch
    q = EMAVQ(EMAVQ.Options(codebook_size=8, kmeans_init=False, restart_after=None), 2)
    full = torch.randn(4, 2, 4, 4, generator=torch.Generator().manual_seed(5))
    q(full[2 * rank:2 * rank + 2])
    results["half"] = q.state_dict()
    torch.save(results, out)
    dist.destroy_process_group()
""")


def test_ranks_keep_identical_codebooks_and_match_one_process(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    outs = [tmp_path / f"rank{r}.pt" for r in range(2)]
    procs = [subprocess.Popen([sys.executable, str(script), str(r), str(tmp_path / "init"), str(outs[r])],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-3000:]
    rank0, rank1 = (torch.load(o, weights_only=True) for o in outs)
    for name in ("vq", "vq-ema", "half"):
        assert rank0[name].keys() == rank1[name].keys()
        for key in rank0[name]:
            assert torch.equal(rank0[name][key], rank1[name][key]), f"{name}.{key} differs between ranks"
    assert bool(rank0["vq"]["initialized"]) and bool(rank0["vq-ema"]["initialized"])

    torch.manual_seed(0)
    single = make(EMAVQ, 2, codebook_size=8)
    single(torch.randn(4, 2, 4, 4, generator=torch.Generator().manual_seed(5)))
    for key, value in single.state_dict().items():
        torch.testing.assert_close(rank0["half"][key], value, msg=key)
