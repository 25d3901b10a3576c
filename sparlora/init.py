"""SPaRLoRA initialization math, in plain torch (no PEFT import).

For a Linear with frozen weight W (d_out x d_in), an even rank r and the LoRA scale s
(lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA):

1. Choose k = r / 2 frequencies from 1 .. ceil(d_in / 2) - 1. DC (f = 0) and, for even
   d_in, Nyquist (f = d_in / 2) have an all-zero sine part, so they are never used.
   `lowest` takes f = 1 .. k; `energy` takes the k frequencies where the rows of W carry
   the most spectral energy, E_f = sum over rows of |rfft(W)[:, f]|^2.
2. A (r x d_in) holds, for each chosen f, the row cos(2 pi f j / d_in) and the row
   -sin(2 pi f j / d_in), j = 0 .. d_in - 1, each scaled to unit norm: the real and
   imaginary parts of DFT basis vectors side by side, so phase is kept. The rows are
   orthonormal. The `dft_real` basis (no phase) takes r cosine rows, f = 1 .. r.
3. B (d_out x r): `lstsq` gives B = W A^T (A A^T)^-1 / s, so s B A = W P_A, the projection
   of W on the row space of A; `dft` projects the output side too, B = F (F^T W A^T) / s
   with F the analogous d_out x r basis, so s B A = P_out W P_A; `zero` gives B = 0.
4. Residual: W <- W - s B A, computed in float32 and cast back to W's dtype, so the
   layer's output at step 0 equals the original layer's.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

BASES = ("dft_complex", "dft_real", "random_orthonormal", "kaiming")
SELECTIONS = ("lowest", "energy")
B_INITS = ("lstsq", "dft", "zero")


@dataclass(frozen=True)
class SparloraConfig:
    """Settings of the SPaRLoRA initialization of one adapter."""

    basis: str = "dft_complex"  # dft_complex (cosine and sine rows), dft_real (cosine rows), random_orthonormal, kaiming
    select: str = "lowest"  # lowest | energy: which DFT frequencies
    b_init: str = "lstsq"  # lstsq | dft | zero
    residual: bool = True  # subtract s B A from the frozen weight
    seed: int = 0  # seed of the random_orthonormal and kaiming bases
    allow_output_change: bool = False  # permit b_init != zero without residual

    def __post_init__(self):
        for field, value, allowed in (("basis", self.basis, BASES), ("select", self.select, SELECTIONS), ("b_init", self.b_init, B_INITS)):
            if value not in allowed:
                raise ValueError(f"invalid SPaRLoRA {field} {value!r}; allowed: {', '.join(allowed)}")
        if self.residual and self.b_init == "zero":
            raise ValueError("residual=true with b_init=zero subtracts nothing; set residual=false or b_init=lstsq")

    @property
    def changes_output(self) -> bool:
        """True when the model's output at step 0 differs from the base model's."""
        return self.b_init != "zero" and not self.residual


class SparloraShapeError(ValueError):
    """A layer whose shape does not admit the requested rank or basis."""


def available_frequencies(size: int) -> int:
    """Return how many frequencies 1 .. ceil(size / 2) - 1 have a nonzero sine part."""
    return max(0, math.ceil(size / 2) - 1)


def check_rank(rank: int, size: int, basis: str, where: str = "layer") -> None:
    """Raise SparloraShapeError when `rank` cannot be built on a `size`-dimensional DFT basis."""
    if rank <= 0:
        raise SparloraShapeError(f"{where}: rank must be positive, got {rank}")
    if basis == "dft_complex":
        if rank % 2:
            raise SparloraShapeError(f"{where}: SPaRLoRA rank must be even (a cosine and a sine row per frequency), got {rank}")
        if rank // 2 > available_frequencies(size):
            raise SparloraShapeError(
                f"{where}: rank {rank} needs {rank // 2} frequencies but size {size} has only "
                f"{available_frequencies(size)} (1 .. ceil({size}/2) - 1); lower the rank"
            )
    elif basis == "dft_real" and rank > available_frequencies(size):
        raise SparloraShapeError(
            f"{where}: rank {rank} needs {rank} cosine frequencies but size {size} has only {available_frequencies(size)}; lower the rank"
        )
    elif rank > size:
        raise SparloraShapeError(f"{where}: rank {rank} exceeds the dimension {size}")


def select_frequencies(weight: torch.Tensor, count: int, select: str) -> tuple[int, ...]:
    """Return `count` frequencies of the input dimension of `weight` (d_out x d_in), ascending."""
    size = weight.shape[1]
    available = available_frequencies(size)
    if count > available:
        raise SparloraShapeError(f"{count} frequencies requested but size {size} has only {available}")
    if select == "lowest":
        return tuple(range(1, count + 1))
    if select == "energy":
        spectrum = torch.fft.rfft(weight.detach().float(), dim=1)
        energy = spectrum.abs().pow(2).sum(dim=0)[1: available + 1]
        top = torch.topk(energy, count).indices + 1
        return tuple(sorted(top.tolist()))
    raise ValueError(f"invalid frequency selection {select!r}; allowed: {', '.join(SELECTIONS)}")


@functools.lru_cache(maxsize=256)
def _dft_rows_cached(size: int, frequencies: tuple[int, ...], phase: bool, dtype: torch.dtype, device: str) -> torch.Tensor:
    position = torch.arange(size, dtype=torch.int64)
    # (f * j) mod size keeps the angle in [0, 2 pi) exactly before the float conversion.
    cycles = torch.outer(torch.tensor(frequencies, dtype=torch.int64), position).remainder_(size)
    angle = cycles.to(torch.float64).mul_(2.0 * math.pi / size)
    rows = torch.stack((torch.cos(angle), -torch.sin(angle)), dim=1).reshape(-1, size) if phase else torch.cos(angle)
    rows = rows / rows.norm(dim=1, keepdim=True)
    return rows.to(dtype=dtype, device=device)


def dft_rows(size: int, frequencies: tuple[int, ...], phase: bool = True, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """Return unit-norm DFT basis rows over `size` points: cos and -sin per frequency (only cos without phase).

    Cached per (size, frequencies, phase, dtype, device); treat the result as read-only.
    """
    return _dft_rows_cached(size, tuple(frequencies), phase, dtype, str(torch.device(device)))


def random_orthonormal_rows(rank: int, size: int, seed: int, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """Return `rank` orthonormal rows of length `size` from a seeded Gaussian matrix (QR)."""
    generator = torch.Generator().manual_seed(seed)
    gaussian = torch.randn(size, rank, generator=generator, dtype=torch.float64)
    q, _ = torch.linalg.qr(gaussian)
    return q.T.contiguous().to(dtype=dtype, device=device)


def kaiming_rows(rank: int, size: int, seed: int, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """Return a Kaiming-uniform A (a = sqrt(5)), as PEFT's default LoRA init draws it."""
    generator = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(size)  # kaiming_uniform_ with a = sqrt(5) on fan_in = size
    rows = (torch.rand(rank, size, generator=generator, dtype=torch.float64) * 2 - 1) * bound
    return rows.to(dtype=dtype, device=device)


def build_a(weight: torch.Tensor, rank: int, cfg: SparloraConfig, where: str = "layer") -> torch.Tensor:
    """Return the float32 A factor (rank x d_in) for `weight` (d_out x d_in)."""
    size = weight.shape[1]
    check_rank(rank, size, cfg.basis, where)
    device = weight.device
    if cfg.basis == "dft_complex":
        return dft_rows(size, select_frequencies(weight, rank // 2, cfg.select), phase=True, device=device)
    if cfg.basis == "dft_real":
        return dft_rows(size, select_frequencies(weight, rank, cfg.select), phase=False, device=device)
    if cfg.basis == "random_orthonormal":
        return random_orthonormal_rows(rank, size, cfg.seed, device=device)
    return kaiming_rows(rank, size, cfg.seed, device=device)


def output_basis(d_out: int, rank: int, cfg: SparloraConfig, device, where: str = "layer") -> torch.Tensor:
    """Return F (d_out x rank), the output-side basis of b_init=dft, with the lowest frequencies."""
    phase = cfg.basis != "dft_real"
    check_rank(rank, d_out, "dft_complex" if phase else "dft_real", f"{where} (output side)")
    count = rank // 2 if phase else rank
    return dft_rows(d_out, tuple(range(1, count + 1)), phase=phase, device=device).T


def build_b(weight: torch.Tensor, a: torch.Tensor, scale: float, cfg: SparloraConfig, where: str = "layer") -> torch.Tensor:
    """Return the float32 B factor (d_out x rank) for `weight` and the A factor `a`."""
    rank = a.shape[0]
    if cfg.b_init == "zero":
        return torch.zeros(weight.shape[0], rank, dtype=torch.float32, device=weight.device)
    w = weight.detach().float()
    # B = W A^T (A A^T)^-1 / s; A A^T is the identity for the orthonormal bases.
    wa = w @ a.T
    if cfg.basis == "kaiming":
        wa = torch.linalg.solve(a @ a.T, wa.T).T
    if cfg.b_init == "dft":
        f_out = output_basis(weight.shape[0], rank, cfg, weight.device, where)
        wa = f_out @ (f_out.T @ wa)
    return wa.mul_(1.0 / scale)


def sparlora_factors(weight: torch.Tensor, rank: int, scale: float, cfg: SparloraConfig, where: str = "layer") -> tuple[torch.Tensor, torch.Tensor]:
    """Return (A, B) in float32 for a Linear weight (d_out x d_in)."""
    a = build_a(weight, rank, cfg, where)
    return a, build_b(weight, a, scale, cfg, where)


def residualize(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """Return W - s B A, computed in float32 and cast back to W's dtype and device."""
    update = (b.float() @ a.float()) * scale
    return (weight.detach().float() - update.to(weight.device)).to(weight.dtype)
