"""plugins/priors.py checked against causality in raster order, hand-computed likelihoods, a hand-written greedy
decoder, softmax frequencies and the known entropy of synthetic code distributions."""

from __future__ import annotations

import math

import pytest
import torch

from vaeflow.core.registry import get_registry
from vaeflow.plugins.priors import GatedPixelCNN


def _prior(grid=(5, 6), k=7, condition=None, **options) -> GatedPixelCNN:
    """A small prior in eval mode with a fixed initialisation."""
    torch.manual_seed(0)
    options = {"channels": 16, "layers": 4, "kernel_size": 3, "condition_layers": 2} | options
    return GatedPixelCNN(GatedPixelCNN.Options(**options), k, grid, condition).eval()


def _dependencies(prior: GatedPixelCNN, codes: torch.Tensor, condition: torch.Tensor | None = None):
    """Which inputs each output position reads: ((h*w, h*w), (h*w, hc*wc) or None) bool.

    Row i is the support of d logits[i] / d embedding, with i and the columns in raster order. Batch element i
    carries position i's logits (examples do not interact), so one backward pass gives every row.
    """
    h, w = prior.grid
    n = h * w
    captured = {}

    def keep(name):
        def hook(module, inputs, output):
            output.retain_grad()
            captured[name] = output  # (B, h, w, C)
        return hook

    handles = [prior.embedding.register_forward_hook(keep("codes"))]
    if condition is not None:
        handles.append(prior.condition_embedding.register_forward_hook(keep("condition")))
    try:
        logits = prior(codes.expand(n, h, w), None if condition is None else condition.expand(n, *condition.shape[1:]))
    finally:
        for handle in handles:
            handle.remove()
    per_position = logits.flatten(2).permute(0, 2, 1)[torch.arange(n), torch.arange(n)]  # (n, K): logits of i in i
    projection = torch.randn(per_position.shape[1], generator=torch.Generator().manual_seed(1))  # (K,)
    (per_position @ projection).sum().backward()
    seen = captured["codes"].grad.abs().sum(-1).flatten(1) > 0  # (n, h*w)
    seen_condition = captured["condition"].grad.abs().sum(-1).flatten(1) > 0 if condition is not None else None
    return seen, seen_condition


def _neighbours_before(r: int, c: int, h: int, w: int) -> list[int]:
    """Raster indices of the left neighbour and the up-left, up and up-right neighbours that exist."""
    cells = [(r, c - 1), (r - 1, c - 1), (r - 1, c), (r - 1, c + 1)]
    return [i * w + j for i, j in cells if 0 <= i < h and 0 <= j < w]


# ---------------------------------------------------------------------------------------------- causality
@pytest.mark.parametrize("kernel_size", [3, 5])
def test_causal_and_no_blind_spot(kernel_size):
    h, w = 5, 6
    prior = _prior((h, w), kernel_size=kernel_size)
    codes = torch.randint(0, 7, (1, h, w), generator=torch.Generator().manual_seed(2))
    seen, _ = _dependencies(prior, codes)
    n = h * w
    assert not seen.triu().any(), "logits at i depend on codes at or after i"
    for i in range(n):
        near = _neighbours_before(i // w, i % w, h, w)
        assert seen[i, near].all(), f"position {divmod(i, w)} misses a neighbour: {seen[i, near].tolist()}"
    if kernel_size == 5:  # 4 layers of reach 2 cover a 5x6 grid: every earlier code is seen, no blind spot at all
        assert torch.equal(seen, torch.ones(n, n, dtype=torch.bool).tril(-1))


def test_conditional_causal_but_sees_all_of_the_condition():
    prior = _prior((8, 8), k=9, condition=(5, (4, 4)))
    g = torch.Generator().manual_seed(3)
    codes, top = torch.randint(0, 9, (1, 8, 8), generator=g), torch.randint(0, 5, (1, 4, 4), generator=g)
    seen, seen_top = _dependencies(prior, codes, top)
    assert not seen.triu().any(), "bottom logits at i depend on bottom codes at or after i"
    for i in range(64):
        r, c = divmod(i, 8)
        assert seen[i, _neighbours_before(r, c, 8, 8)].all()
        own = (r // 2) * 4 + c // 2  # the top cell above position i
        # the cell itself and its right and lower neighbours, which come after i in raster order
        later = [own] + [j for j, ok in ((own + 1, c // 2 < 3), (own + 4, r // 2 < 3)) if ok]
        assert seen_top[i, later].all(), f"bottom {(r, c)} does not see top cells {later}"
    # the conditioning stack adds a summary of the whole top grid: every bottom position sees every top code
    assert seen_top.all()


# ---------------------------------------------------------------------------------------------- likelihood
def test_log_prob_is_minus_hand_cross_entropy():
    prior = _prior((3, 4), k=5).double()
    codes = torch.randint(0, 5, (3, 3, 4), generator=torch.Generator().manual_seed(4))
    logits = prior(codes)  # (B, K, h, w)
    assert logits.shape == (3, 5, 3, 4)
    want = []
    for b in range(3):
        total = 0.0
        for r in range(3):
            for c in range(4):
                row = logits[b, :, r, c].tolist()
                total += row[codes[b, r, c]] - math.log(sum(math.exp(v) for v in row))
        want.append(total)
    torch.testing.assert_close(prior.log_prob(codes), torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------- sampling
def _greedy(prior: GatedPixelCNN, n: int, condition=None) -> torch.Tensor:
    """Hand-written greedy decoder: the argmax code at each position in raster order."""
    h, w = prior.grid
    codes = torch.zeros(n, h, w, dtype=torch.long)
    with torch.no_grad():
        for r in range(h):
            for c in range(w):
                codes[:, r, c] = prior(codes, condition)[:, :, r, c].argmax(1)
    return codes


def test_sample_shape_seed_and_greedy():
    prior = _prior((3, 4), k=7)
    draw = lambda seed, **kw: prior.sample(6, generator=torch.Generator().manual_seed(seed), **kw)  # noqa: E731
    a = draw(0)
    assert a.shape == (6, 3, 4) and a.dtype == torch.int64 and 0 <= a.min() and a.max() < 7
    assert torch.equal(a, draw(0))
    assert not torch.equal(a, draw(1))
    greedy = _greedy(prior, 6)
    assert torch.equal(draw(5, top_k=1), greedy)
    assert torch.equal(draw(6, temperature=1e-6), greedy)  # logits / T -> one-hot on the argmax
    assert not torch.equal(draw(6, temperature=1.0), greedy)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sample_frequencies_match_softmax(temperature):
    # the first position has no predecessors, so its distribution is softmax(logits / T) for any input
    prior = _prior((1, 2), k=4)
    with torch.no_grad():
        p = (prior(torch.zeros(1, 1, 2, dtype=torch.long))[0, :, 0, 0] / temperature).softmax(0)  # (K,)
    n = 20000
    draws = prior.sample(n, temperature=temperature, generator=torch.Generator().manual_seed(7))[:, 0, 0]
    freq = torch.bincount(draws, minlength=4) / n
    assert (freq - p).abs().max() < 5 * math.sqrt(0.25 / n)  # 5 binomial standard deviations at worst


def test_conditional_samples_depend_on_condition():
    prior = _prior((4, 4), k=7, condition=(5, (2, 2)))
    top_a = torch.randint(0, 5, (8, 2, 2), generator=torch.Generator().manual_seed(8))
    top_b = (top_a + 1) % 5
    draw = lambda top: prior.sample(8, top, generator=torch.Generator().manual_seed(9))  # noqa: E731
    assert torch.equal(draw(top_a), draw(top_a))
    assert not torch.equal(draw(top_a), draw(top_b))
    assert torch.equal(prior.sample(8, top_a, top_k=1), _greedy(prior, 8, top_a))


# ---------------------------------------------------------------------------------------------- learning
def _fit(prior: GatedPixelCNN, data, steps: int, lr: float = 3e-3) -> None:
    """Adam on the mean NLL of fresh batches from `data(batch, generator) -> (codes, condition)`."""
    prior.train()
    optimizer = torch.optim.Adam(prior.parameters(), lr=lr)
    g = torch.Generator().manual_seed(10)
    for _ in range(steps):
        codes, condition = data(128, g)
        loss = -prior.log_prob(codes, condition).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    prior.eval()


def _rotations(n: int, g: torch.Generator):
    """4x4 grids: row 0 is 4 codes uniform over {0, 1, 2, 3}; each later row is the one above rotated left by
    one, so (r, c) copies its up-right neighbour (and (r, 3) the first code of the row above)."""
    first = torch.randint(0, 4, (n, 4), generator=g)  # (n, 4)
    return torch.stack([first.roll(-r, dims=1) for r in range(4)], dim=1), None  # (n, 4, 4)


def test_learns_known_entropy():
    # H = 4 log 4 nats per grid (only row 0 is random), reached only by copying the up-right neighbour, which a
    # PixelCNN with a blind spot cannot see in every layer. Cross-entropy on fresh data is >= H, and at the optimum
    # every grid has the same NLL, so its sample mean has almost no noise: the band allows 0.15 nats (2.7 %) of
    # undertraining above H and 0.05 below for a row-0 marginal that is not exactly uniform.
    prior = _prior((4, 4), k=8, channels=32, layers=4, kernel_size=3)
    entropy = 4 * math.log(4)
    codes, _ = _rotations(4096, torch.Generator().manual_seed(11))
    with torch.no_grad():
        before = -prior.log_prob(codes).mean().item()
    _fit(prior, _rotations, steps=300)
    with torch.no_grad():
        nll = -prior.log_prob(codes).mean().item()
    assert before > entropy + 10  # untrained: about 16 log 8 = 33 nats
    assert entropy - 0.05 < nll < entropy + 0.15, (nll, entropy)


def _copy_top(n: int, g: torch.Generator):
    """Top 2x2 codes uniform over 5; the bottom 4x4 codes are (top + 2) mod 5, upsampled by 2: H(bottom | top) = 0."""
    top = torch.randint(0, 5, (n, 2, 2), generator=g)  # (n, 2, 2)
    bottom = ((top + 2) % 5).repeat_interleave(2, 1).repeat_interleave(2, 2)  # (n, 4, 4)
    return bottom, top


def test_conditional_learns_to_copy_condition():
    # H(bottom | top) = 0 against 16 log 5 = 25.8 nats per grid for a prior that ignores the top codes; 0.05 nats
    # per grid (0.003 per position: the right code at probability >= 0.997) is "near zero" after 200 steps.
    prior = _prior((4, 4), k=5, condition=(5, (2, 2)), channels=32, layers=2, kernel_size=3, condition_layers=1)
    _fit(prior, _copy_top, steps=200)
    bottom, top = _copy_top(2048, torch.Generator().manual_seed(12))
    with torch.no_grad():
        nll = -prior.log_prob(bottom, top).mean().item()
        assert nll < 0.05, nll
        assert torch.equal(prior.sample(64, top[:64], top_k=1), bottom[:64])


# ---------------------------------------------------------------------------------------------- precision
def test_bf16_autocast_matches_float32():
    prior = _prior((4, 4), k=7, condition=(5, (2, 2)))
    g = torch.Generator().manual_seed(13)
    codes, top = torch.randint(0, 7, (4, 4, 4), generator=g), torch.randint(0, 5, (4, 2, 2), generator=g)
    want = prior(codes, top)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = prior(codes, top)
        loss = -prior.log_prob(codes, top).mean()
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.05)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in prior.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_train_step_and_sample():
    prior = _prior((8, 8), k=512, condition=(512, (4, 4)), channels=32).cuda()
    codes = torch.randint(0, 512, (16, 8, 8), device="cuda")
    top = torch.randint(0, 512, (16, 4, 4), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = -prior.log_prob(codes, top).mean()
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in prior.parameters())
    draw = lambda: prior.sample(16, top, generator=torch.Generator().manual_seed(0))  # noqa: E731
    a = draw()
    assert a.shape == (16, 8, 8) and a.device.type == "cuda" and torch.equal(a, draw())


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("grid, condition_grid", [((8, 8), (3, 3)), ((8, 8), (4, 2)), ((8, 6), (4, 2))])
def test_condition_grid_must_divide_by_one_integer_factor(grid, condition_grid):
    with pytest.raises(ValueError, match="must divide the code grid") as error:
        GatedPixelCNN(GatedPixelCNN.Options(channels=8, layers=1), 5, grid, (5, condition_grid))
    assert error.match("fit: 8x8, 4x4, 2x2, 1x1$" if grid == (8, 8) else "fit: 8x6, 4x3$")


def test_bad_inputs_raise_value_error():
    plain, conditional = _prior((4, 4), k=5), _prior((4, 4), k=5, condition=(3, (2, 2)))
    codes, top = torch.zeros(2, 4, 4, dtype=torch.long), torch.zeros(2, 2, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="unconditional"):
        plain(codes, top)
    with pytest.raises(ValueError, match="pass condition"):
        conditional(codes)
    with pytest.raises(ValueError, match=r"expected codes of shape \(B, 4, 4\), got \(2, 4, 5\)"):
        plain(torch.zeros(2, 4, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"expected a condition of shape \(2, 2, 2\), got \(2, 4, 4\)"):
        conditional(codes, codes)
    with pytest.raises(ValueError, match="integer indices"):
        plain(codes.float())
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        GatedPixelCNN.Options(kernel_size=4)
    with pytest.raises(ValueError):  # extra="forbid"
        GatedPixelCNN.Options(channel=8)


def test_registered():
    entry = get_registry().get("prior", "gated-pixelcnn")
    assert entry.cls is GatedPixelCNN
    assert all(f.description for f in GatedPixelCNN.Options.model_fields.values())
