"""Built-in vector quantizers: `vq` (a learned codebook) and `vq-ema` (a codebook of exponential moving averages).

van den Oord et al. 2017, "Neural Discrete Representation Learning" (arXiv:1711.00937): section 3.1 (nearest
codebook vector, eq. 1-2), eq. 3 (the loss: log p(x|z_q) + ||sg[z_e] - e||^2 + beta ||z_e - sg[e]||^2, beta = 0.25,
with the straight-through gradient copied from the decoder input to the encoder output) and appendix A.1 (the
codebook as exponential moving averages of cluster sizes N_i and sums m_i, e_i = m_i / N_i, decay 0.99).
Razavi et al. 2019, "Generating Diverse High-Fidelity Images with VQ-VAE-2" (arXiv:1906.00446) use the EMA
codebook throughout; the Laplace smoothing of N_i follows the Sonnet implementation the papers released.

Both quantizers add what later work found necessary to keep every code in use: k-means initialisation of the
codebook on the first training batch, restart of dead codes from the batch's encoder outputs (Dhariwal et al.
2020, "Jukebox", section 3.3; Zeghidour et al. 2021, "SoundStream", section 3.2) and an optional cosine distance
(Yu et al. 2022, "Vector-quantized Image Modeling with Improved VQGAN", section 3.2).

Distances ||z - e||^2 = ||z||^2 - 2 z.e + ||e||^2 come from one matmul per chunk of rows, written into one reused
(rows, K) buffer (never an (N, K, D) temporary, nor a full (N, K) matrix on the CPU, where a fresh 64 MB block is
handed back to the OS by glibc when freed and page-faulted in again on the next call); counts and sums come from
`torch.bincount` and `index_add_`, never an (N, K) one-hot matmul. Nothing on the training path reads a tensor back
to the host, except once per process (and after `load_state_dict`) the flag saying whether k-means has run.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from vaeflow.core.bounds import MAX_CODES, MAX_DEPTH, MAX_STEPS
from vaeflow.core.hookspecs import hookimpl
from vaeflow.core.interfaces import Options, Quantizer, QuantizerOutput

CHUNK_BYTES = 1 << 22  # CPU: 4 MiB of distances per chunk (2048 rows at K = 512), cache-sized and reused


class QuantizerOptions(Options):
    """Options shared by both quantizers."""

    codebook_size: int = Field(
        512, gt=0, le=MAX_CODES, description="K, the number of code vectors (the paper uses 512)")
    commitment: float = Field(0.25, ge=0, description="beta, weight of the commitment loss ||z_e - sg[e]||^2 "
                                                      "(the paper uses 0.25)")
    distance: Literal["euclidean", "cosine"] = Field(
        "euclidean", description="euclidean: nearest code in L2; cosine: l2-normalise z_e and the codes first, "
                                 "so quantized vectors have unit norm")
    kmeans_init: bool = Field(True, description="on the first training forward, set the codebook by k-means on "
                                                "that batch's encoder outputs (saved in state_dict, never re-run)")
    kmeans_iters: int = Field(10, gt=0, le=MAX_DEPTH, description="Lloyd iterations of the k-means initialisation")
    restart_after: Optional[int] = Field(
        100, gt=0, le=MAX_STEPS, description="replace a code unused for this many consecutive training steps by a "
                                             "random encoder output of the current batch; null disables the restart")
    usage_decay: float = Field(0.99, ge=0, lt=1, description="decay of the moving average of per-code usage")


# --- pieces ----------------------------------------------------------------------------------
class StraightThrough(torch.autograd.Function):
    """Forward: the quantized vectors; backward: the gradient goes to z_e unchanged (eq. 3's straight-through).

    The same as z_e + (e - z_e).detach(), but the forward value is e exactly (no z_e + (e - z_e) rounding), so
    `lookup(indices)` reproduces it bit for bit, and neither pass makes an (N, D) temporary.
    """

    @staticmethod
    def forward(ctx, z_e: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
        """z_e, quantized (B, D, h, w) -> quantized (B, D, h, w)."""
        return quantized

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        """d loss / d quantized (B, D, h, w) -> (the same for z_e, nothing for the codes)."""
        return grad, None


@torch.no_grad()
def nearest_code(flat: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """argmin_k ||z_n - e_k||^2: flat (N, D), codebook (K, D), both float32 -> (N,) int64.

    ||z_n||^2 does not change the argmin and is left out; -2 z E^T + ||e||^2 is one addmm per chunk of rows,
    into one (rows, K) buffer reused by every chunk (CPU: rows * K * 4 bytes <= CHUNK_BYTES; CUDA: one chunk).
    """
    n, k = flat.shape[0], codebook.shape[0]
    e_sq = codebook.pow(2).sum(1)  # (K,)
    rows = n if flat.is_cuda else max(1, min(n, CHUNK_BYTES // (4 * k)))
    indices = torch.empty(n, dtype=torch.long, device=flat.device)  # (N,)
    buffer = torch.empty(rows, k, dtype=flat.dtype, device=flat.device)  # (rows, K)
    for start in range(0, n, rows):
        chunk = flat[start:start + rows]  # (r, D)
        dist_chunk = buffer[:chunk.shape[0]]  # (r, K)
        torch.addmm(e_sq, chunk, codebook.t(), alpha=-2.0, out=dist_chunk)  # ||e||^2 - 2 z.e
        torch.argmin(dist_chunk, dim=1, out=indices[start:start + rows])
    return indices


def code_counts(indices: torch.Tensor, k: int) -> torch.Tensor:
    """How many vectors chose each code: indices (N,) int64 -> (K,) float32."""
    return torch.bincount(indices, minlength=k).float()  # (K,)


def code_sums(indices: torch.Tensor, flat: torch.Tensor, k: int) -> torch.Tensor:
    """Sum of the vectors that chose each code: indices (N,), flat (N, D) -> (K, D)."""
    return torch.zeros(k, flat.shape[1], dtype=flat.dtype, device=flat.device).index_add_(0, indices, flat)


def perplexity(counts: torch.Tensor) -> torch.Tensor:
    """exp of the entropy (nats) of the code histogram: counts (K,) -> () in [1, K]."""
    p = counts / counts.sum()  # (K,)
    return torch.exp(-torch.special.xlogy(p, p).sum())


@torch.no_grad()
def kmeans_plus_plus(flat: torch.Tensor, k: int) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): flat (N, D), N >= K -> K starting centroids (K, D).

    Each next centroid is a batch vector drawn with probability proportional to its squared distance to the
    nearest centroid so far, so well-separated clusters each get one; draws come from the global torch RNG.
    """
    n = flat.shape[0]
    flat_sq = flat.pow(2).sum(1)  # (N,)
    picks = torch.empty(k, dtype=torch.long, device=flat.device)  # (K,)
    picks[:1] = torch.randint(n, (1,), device=flat.device)
    nearest_sq = torch.full_like(flat_sq, float("inf"))  # (N,) squared distance to the nearest centroid so far
    for i in range(k):
        if i > 0:  # never all-zero weights, even when every vector is already a centroid
            picks[i:i + 1] = torch.multinomial(nearest_sq.clamp_min(0).add_(1e-30), 1)
        centroid = flat[picks[i:i + 1]][0]  # (D,); a tensor index, so no host sync on CUDA
        sq = torch.addmv(flat_sq, flat, centroid, alpha=-2.0).add_(centroid.dot(centroid))  # (N,) ||z - c||^2
        torch.minimum(nearest_sq, sq, out=nearest_sq)
    return flat[picks]


@torch.no_grad()
def kmeans(flat: torch.Tensor, k: int, iters: int, spherical: bool) -> torch.Tensor:
    """Lloyd's k-means: flat (N, D) -> centroids (K, D); draws from the global torch RNG.

    Seeded by k-means++ when N >= K; with fewer vectors than codes the K starts are drawn with replacement.
    An empty cluster keeps its centroid. `spherical` renormalises the centroids after each step (cosine distance).
    """
    n = flat.shape[0]
    if n >= k:
        centroids = kmeans_plus_plus(flat, k)  # (K, D)
    else:
        centroids = flat[torch.randint(n, (k,), device=flat.device)].clone()  # (K, D)
    for _ in range(iters):
        indices = nearest_code(flat, centroids)  # (N,)
        counts = code_counts(indices, k)  # (K,)
        means = code_sums(indices, flat, k) / counts.clamp(min=1)[:, None]  # (K, D)
        if spherical:
            means = F.normalize(means, dim=1)
        centroids = torch.where(counts[:, None] > 0, means, centroids)  # (K, D)
    return centroids


def _distributed() -> bool:
    """True inside an initialised torch.distributed process group."""
    return dist.is_available() and dist.is_initialized()


def _forget_kmeans_flag(module: "VectorQuantizer", incompatible_keys) -> None:
    """load_state_dict hook: the loaded `initialized` buffer may differ from the cached host copy."""
    module._kmeans_done = None


# --- the shared quantizer --------------------------------------------------------------------
class VectorQuantizer(Quantizer):
    """Nearest-code quantization shared by `vq` and `vq-ema`; subclasses own the codebook and its update.

    Buffers (saved in state_dict, so a resumed run continues exactly): `initialized` (k-means has run),
    `unused_steps` (K,) consecutive training steps each code went unused, `usage_ema` (K,) a moving average of
    "code k was used in the batch" (starts at 1, so a collapse shows as a decay from full usage and the usage
    warning never fires on the start-up bias of a zero start), whose mean is the `usage_ema` statistic.
    Under torch.distributed, `usage_ema` and restarts follow the counts of all ranks; `perplexity`, `usage` and
    (restart off) `dead_codes` describe this rank's batch.
    """

    Options = QuantizerOptions

    def __init__(self, options: QuantizerOptions, embedding_dim: int):
        super().__init__(options, embedding_dim)
        k = self.codebook_size
        self.register_buffer("initialized", torch.tensor(False))
        self.register_buffer("unused_steps", torch.zeros(k, dtype=torch.long))
        self.register_buffer("usage_ema", torch.ones(k))  # optimistic start: no usage warning before evidence
        self._kmeans_done: bool | None = None  # host copy of `initialized`; None = read it once
        self.register_load_state_dict_post_hook(_forget_kmeans_flag)

    # subclass API
    def _raw_codebook(self) -> torch.Tensor:  # pragma: no cover - interface
        """The stored code vectors (K, D), before any normalisation."""
        raise NotImplementedError

    def _set_codes(self, mask: torch.Tensor, vectors: torch.Tensor) -> None:  # pragma: no cover - interface
        """Make the codes where mask (K,) is true equal to vectors (K, D), as fresh codes."""
        raise NotImplementedError

    def _losses(self, flat: torch.Tensor, codes: torch.Tensor) -> dict[str, torch.Tensor]:  # pragma: no cover
        """Weighted loss terms from flat z_e (N, D) and its codes (N, D) (carrying the codebook's gradient)."""
        raise NotImplementedError

    def _update(self, flat: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Training-only codebook update from flat (N, D), indices (N,), counts (K,) -> counts summed over ranks.

        Here (`vq`, trained by its loss) only the counts are reduced, so that usage and restarts agree on all ranks.
        """
        if _distributed():
            counts = counts.clone()
            dist.all_reduce(counts)
        return counts

    @property
    def codebook(self) -> torch.Tensor:
        """The code vectors (K, D) used for lookup: unit rows under the cosine distance."""
        raw = self._raw_codebook()
        return F.normalize(raw, dim=1) if self.options.distance == "cosine" else raw

    def forward(self, z_e: torch.Tensor) -> QuantizerOutput:
        """Quantize z_e (B, D, h, w) to its nearest codes: quantized (B, D, h, w), indices (B, h, w)."""
        if z_e.dim() != 4 or z_e.shape[1] != self.embedding_dim:
            raise ValueError(f"{self.name} quantizer expects z_e of shape (B, {self.embedding_dim}, h, w), "
                             f"got {tuple(z_e.shape)}")
        b, d, h, w = z_e.shape
        with torch.autocast(z_e.device.type, enabled=False):  # distances and losses in float32
            flat = z_e.permute(0, 2, 3, 1).reshape(-1, d).float()  # (N, D)
            if self.options.distance == "cosine":
                flat = F.normalize(flat, dim=1)
            if self.training and self.options.kmeans_init and not self._kmeans_has_run():
                self._kmeans_init(flat.detach())
            codebook = self.codebook  # (K, D), carries the gradient of `vq`
            indices = nearest_code(flat.detach(), codebook.detach())  # (N,)
            codes = codebook[indices]  # (N, D)
            losses = self._losses(flat, codes)
            counts = code_counts(indices, self.codebook_size)  # (K,) this batch, this rank
            dead = self._train_step(flat.detach(), indices, counts) if self.training else self._dead(counts)
        quantized = codes.detach().view(b, h, w, d).permute(0, 3, 1, 2).to(z_e.dtype)  # (B, D, h, w)
        quantized = StraightThrough.apply(z_e, quantized)
        stats = {
            "perplexity": perplexity(counts),
            "usage": (counts > 0).float().mean(),
            "usage_ema": self.usage_ema.mean(),
            "dead_codes": dead.sum().float(),
        }
        return QuantizerOutput(quantized, indices.view(b, h, w), losses, stats)

    # training-time bookkeeping
    def _kmeans_has_run(self) -> bool:
        """Whether the codebook was k-means initialised; reads the buffer once (a host sync), then caches it."""
        if self._kmeans_done is None:
            self._kmeans_done = bool(self.initialized)
        return self._kmeans_done

    @torch.no_grad()
    def _kmeans_init(self, flat: torch.Tensor) -> None:
        """Set every code to the k-means centroids of flat (N, D); rank 0's centroids win under DDP."""
        centroids = kmeans(flat, self.codebook_size, self.options.kmeans_iters,
                           spherical=self.options.distance == "cosine")  # (K, D)
        if _distributed():
            dist.broadcast(centroids, src=0)
        self._set_codes(torch.ones(self.codebook_size, dtype=torch.bool, device=flat.device), centroids)
        self.initialized.fill_(True)
        self._kmeans_done = True

    def _dead(self, counts: torch.Tensor) -> torch.Tensor:
        """Dead codes (K,) bool: unused for restart_after steps, or (restart off) unused in this batch."""
        if self.options.restart_after is None:
            return counts == 0
        return self.unused_steps >= self.options.restart_after

    @torch.no_grad()
    def _train_step(self, flat: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Usage tracking, codebook update and dead-code restart: flat (N, D), counts (K,) -> dead codes (K,) bool.

        Under torch.distributed the counts are summed over ranks first and the restart vectors come from rank 0,
        so every rank takes the same decisions and keeps an identical codebook.
        """
        global_counts = self._update(flat, indices, counts)  # (K,)
        used = global_counts > 0  # (K,)
        decay = self.options.usage_decay
        self.usage_ema.mul_(decay).add_(used.float(), alpha=1 - decay)
        self.unused_steps.add_(1).masked_fill_(used, 0)
        dead = self._dead(global_counts)  # (K,)
        if self.options.restart_after is not None:
            # one draw per code every step (no host sync to ask whether any is dead); global RNG, so resumable
            picks = torch.randint(flat.shape[0], (self.codebook_size,), device=flat.device)  # (K,)
            vectors = flat[picks]  # (K, D)
            if _distributed():
                dist.broadcast(vectors, src=0)
            self._set_codes(dead, vectors)
            self.unused_steps.masked_fill_(dead, 0)
        return dead


# --- the two quantizers ----------------------------------------------------------------------
class VQ(VectorQuantizer):
    """VQ-VAE quantizer with a learned codebook (van den Oord et al. 2017, eq. 3).

    The codebook is an nn.Parameter (K, D) initialised uniform(-1/K, 1/K) as in the paper's reference code
    (k-means replaces it on the first training batch by default). Losses: `codebook` = mean ||sg[z_e] - e||^2,
    which alone trains the codebook, and `commitment` = beta mean ||z_e - sg[e]||^2, which trains only the encoder;
    means are over all N * D elements. A restarted code's optimizer state (e.g. Adam moments) is left as it is.
    """

    name = "vq"

    def __init__(self, options: QuantizerOptions, embedding_dim: int):
        super().__init__(options, embedding_dim)
        k = self.codebook_size
        self.embedding = nn.Parameter(torch.empty(k, embedding_dim).uniform_(-1.0 / k, 1.0 / k))  # (K, D)

    def _raw_codebook(self) -> torch.Tensor:
        """The parameter (K, D)."""
        return self.embedding

    def _set_codes(self, mask: torch.Tensor, vectors: torch.Tensor) -> None:
        """Copy vectors (K, D) into the parameter's rows where mask (K,) is true."""
        self.embedding.data.copy_(torch.where(mask[:, None], vectors, self.embedding.data))

    def _losses(self, flat: torch.Tensor, codes: torch.Tensor) -> dict[str, torch.Tensor]:
        """codebook: mean ||sg[z_e] - e||^2; commitment: beta mean ||z_e - sg[e]||^2; flat, codes (N, D)."""
        return {
            "codebook": F.mse_loss(codes, flat.detach()),
            "commitment": self.options.commitment * F.mse_loss(flat, codes.detach()),
        }


class EMAOptions(QuantizerOptions):
    """Options of the EMA quantizer: the shared ones plus the moving-average decay and smoothing."""

    decay: float = Field(0.99, gt=0, lt=1, description="gamma, decay of the moving averages of cluster sizes and "
                                                       "sums (appendix A.1 uses 0.99)")
    epsilon: float = Field(1e-5, gt=0, description="Laplace smoothing of the cluster sizes, so no code divides by 0")


class EMAVQ(VectorQuantizer):
    """VQ-VAE quantizer whose codebook is a moving average of its assigned encoder outputs (appendix A.1).

    In training mode, under torch.no_grad: N_i <- gamma N_i + (1 - gamma) n_i, m_i <- gamma m_i + (1 - gamma)
    sum_j z_ij, then N_i is Laplace-smoothed to (N_i + eps) / (n + K eps) n with n = sum_i N_i, and e_i = m_i / N_i.
    The codes start standard normal (Sonnet's initialiser) with N_i = 1 and m_i = e_i, the state a k-means
    initialisation or a dead-code restart also leaves a code in. Only `commitment` is a loss.
    """

    name = "vq-ema"
    Options = EMAOptions

    def __init__(self, options: EMAOptions, embedding_dim: int):
        super().__init__(options, embedding_dim)
        embedding = torch.randn(self.codebook_size, embedding_dim)  # (K, D)
        self.register_buffer("embedding", embedding)  # e_i
        self.register_buffer("cluster_size", torch.ones(self.codebook_size))  # N_i
        self.register_buffer("embed_sum", embedding.clone())  # m_i

    def _raw_codebook(self) -> torch.Tensor:
        """The buffer e (K, D)."""
        return self.embedding

    def _set_codes(self, mask: torch.Tensor, vectors: torch.Tensor) -> None:
        """Where mask (K,): e_i = m_i = the vector, N_i = 1."""
        self.embedding.copy_(torch.where(mask[:, None], vectors, self.embedding))
        self.embed_sum.copy_(torch.where(mask[:, None], vectors, self.embed_sum))
        self.cluster_size.masked_fill_(mask, 1.0)

    def _losses(self, flat: torch.Tensor, codes: torch.Tensor) -> dict[str, torch.Tensor]:
        """commitment: beta mean ||z_e - sg[e]||^2; flat, codes (N, D)."""
        return {"commitment": self.options.commitment * F.mse_loss(flat, codes)}

    @torch.no_grad()
    def _update(self, flat: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The EMA step from flat (N, D), indices (N,), counts (K,) -> the counts summed over ranks (K,)."""
        k, d = self.embedding.shape
        sums = code_sums(indices, flat, k)  # (K, D)
        if _distributed():
            both = torch.cat([sums, counts[:, None]], dim=1)  # (K, D + 1): one collective
            dist.all_reduce(both)
            sums, counts = both[:, :d], both[:, d]
        gamma, eps = self.options.decay, self.options.epsilon
        self.cluster_size.mul_(gamma).add_(counts, alpha=1 - gamma)  # N_i
        self.embed_sum.mul_(gamma).add_(sums, alpha=1 - gamma)  # m_i
        n = self.cluster_size.sum()  # ()
        smoothed = (self.cluster_size + eps) / (n + k * eps) * n  # (K,)
        torch.div(self.embed_sum, smoothed[:, None], out=self.embedding)  # e_i = m_i / N_i
        return counts


@hookimpl
def register_quantizers(register):
    """Register the built-in quantizers: vq and vq-ema."""
    register(VQ)
    register(EMAVQ)

