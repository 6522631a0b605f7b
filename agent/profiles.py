"""Averaging profiles of stored EMAs, and post-hoc synthesis of new ones: pure float64 numpy.

Every average of the weights is a weighted sum of the weights the optimizer went through. This
module computes those weights (the *profile* of an average), the inner products between profiles
in closed form, and the least-squares combination of stored averages that best matches a profile
that was never tracked (post-hoc EMA, Karras et al. 2024, "Analyzing and Improving the Training
Dynamics of Diffusion Models", EDM2, Sec. 3 and App. C). EDM2 stores power-function averages for
this; emascope's bank stores plain fixed-decay EMAs, whose profiles are geometric sequences, so
their inner products are sums of geometric series (Eq. G below) and the whole solve is exact.
No torch, no files: the dashboard uses it too.

Conventions (shared with :mod:`emascope.ema_math` and :mod:`emascope.bank`):

- ``theta_tau`` are the weights after ``tau`` optimizer steps since attach; ``theta_0`` are the
  weights at attach. A *profile* ``p`` gives weight ``p[tau]`` to ``theta_tau``; the average it
  describes is ``sum_tau p[tau] theta_tau``. Profiles of averages sum to 1.
- A *decay* ``d`` is the weight kept per optimizer step (``ema <- d ema + (1 - d) theta``), never
  ``1 - d``. With ``update_every = m`` the bank folds the weights in at steps ``m, 2m, ...`` with
  ``b = d**m`` (Eq. U of :mod:`emascope.ema_math`); after optimizer step ``s`` it has applied
  ``n = s // m`` updates.
- The vectorised form used throughout (:class:`Profiles`): profile ``i`` is a geometric part, weight
  ``c_i b_i**(n_i - k)`` on ``theta_{k m}`` for ``k = 1 .. n_i``, plus one point mass ``w_i`` on
  ``theta_{s_i}``. Every stored average of the bank (an EMA row or the raw weights at a snapshot
  step) has this form; EDM2's power-function target is :class:`PowerProfile`.
- Inner products are the plain (unweighted) sum over optimizer steps, ``<p, q> = sum_tau p q``,
  and the *profile residual* of a synthesis is ``||P c - p*|| / ||p*||`` in that norm.

Equations (one function each, named in its docstring):

- Eq. P   exponential EMA initialised at attach: ``p[0] = b**n``, ``p[k m] = (1 - b) b**(n - k)``.
- Eq. PBC bias-corrected (Adam-style) EMA: ``p[k m] = (1 - b) b**(n - k) / (1 - b**n)``; ``p[0] = 1``
  before the first update.
- Eq. R   raw weights at step ``s``: ``p[s] = 1``.
- Eq. PF  EDM2 power function, updated every ``m`` steps with ``beta_k = (1 - 1/k)**(gamma + 1)``
  at the ``k``-th update: ``p[k m] = (k**(gamma+1) - (k-1)**(gamma+1)) / n**(gamma+1)``.
- Eq. SG  EDM2 Eq. 126 / Algorithm 2: ``gamma`` from ``sigma_rel`` (largest real root of a cubic);
  Eq. GS, EDM2 Eq. 123, the converse.
- Eq. G   inner product of two geometric parts (a geometric series), Eq. GP point x geometric,
  Eq. PP point x point, Eq. GF geometric x power (exact float64 summation), Eq. FF power x power.
- Eq. LS  ``min_c ||P c - p*||^2 + lambda ||c||^2`` subject to ``sum c = 1`` (KKT system).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: Terms of a geometric sequence below this factor of its largest term are left out of the
#: summed inner products (Eq. GF, FF): they are below float64 resolution of any Gram entry.
TAIL = 1e-30
#: Steps summed per numpy chunk in Eq. GF / FF (bounds memory to a few MB per call).
CHUNK = 1 << 20


# ---------------------------------------------------------------------------------------------
# profiles


@dataclass(frozen=True)
class Profiles:
    """A set of profiles, each a geometric part plus one point mass (see the module docstring).

    Arrays have one entry per profile. ``m``: update_every (steps between bank updates, shared);
    geometric part ``c * b**(n - k)`` on step ``k m`` for ``k = 1 .. n`` (``c = 0``: none);
    ``omb = 1 - b`` computed without cancellation; point mass ``w`` on step ``s`` (``w = 0``: none).
    ``labels``: free text per profile (e.g. ``"step 5000 decay 0.999"``), for reports only.
    """

    m: int
    n: np.ndarray
    b: np.ndarray
    omb: np.ndarray
    c: np.ndarray
    s: np.ndarray
    w: np.ndarray

    def __len__(self) -> int:
        return int(self.n.shape[0])

    def take(self, idx: Sequence[int] | np.ndarray) -> Profiles:
        """The profiles at positions ``idx`` (a boolean mask or integer indices)."""
        i = np.asarray(idx)
        return Profiles(self.m, self.n[i], self.b[i], self.omb[i], self.c[i], self.s[i], self.w[i])


def concat(*parts: Profiles) -> Profiles:
    """One :class:`Profiles` holding all profiles of ``parts`` in order (same ``m``)."""
    ms = {p.m for p in parts}
    if len(ms) != 1:
        raise ValueError(f"profiles with different update_every cannot be combined: {sorted(ms)}")
    cat = np.concatenate
    return Profiles(ms.pop(), *(cat([getattr(p, f) for p in parts]) for f in ("n", "b", "omb", "c", "s", "w")))


def one_minus_decay_power(decay: np.ndarray | float, m: int) -> np.ndarray:
    """Eq. U complement: ``1 - d**m`` without cancellation (``-expm1(m log1p(-(1 - d)))``); 1 for d = 0."""
    d = np.asarray(decay, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return np.where(d == 0.0, 1.0, -np.expm1(m * np.log1p(-(1.0 - d))))


def one_minus_power(b: np.ndarray, omb: np.ndarray, n: np.ndarray) -> np.ndarray:
    """``1 - b**n`` without cancellation, elementwise (1 when ``b = 0`` and ``n >= 1``; 0 when ``n = 0``)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        out = -np.expm1(np.asarray(n, dtype=np.float64) * np.log1p(-omb))
    return np.where(np.asarray(n) == 0, 0.0, np.where(b == 0.0, 1.0, out))


def _check_steps(steps: np.ndarray, m: int) -> None:
    if m < 1 or int(m) != m:
        raise ValueError(f"update_every must be an integer >= 1, got {m!r}")
    if steps.size and int(steps.min()) < 0:
        raise ValueError(f"steps must be >= 0, got {int(steps.min())}")


def exponential_profiles(decays: Sequence[float] | np.ndarray, steps: Sequence[int] | np.ndarray,
                         update_every: int = 1, bias_correction: bool = False) -> Profiles:
    """Eq. P (``bias_correction=False``) or Eq. PBC: the profiles of fixed-decay EMAs read at steps.

    ``decays[i]`` in [0, 1) read at optimizer step ``steps[i]`` (broadcast against each other).
    Eq. P, an EMA initialised to the attach weights: after ``n = s // m`` updates with ``b = d**m``,
    ``p[k m] = (1 - b) b**(n - k)`` for ``k = 1 .. n`` and ``p[0] = b**n`` (the initialisation term:
    an EMA started at ``theta_0`` keeps ``b**n`` of it). Eq. PBC, Adam-style bias correction (a
    zero-initialised EMA divided by ``1 - b**n``): ``p[k m] = (1 - b) b**(n - k) / (1 - b**n)``,
    nothing on ``theta_0``; before the first update (``n = 0``) the average is ``theta_0``.
    """
    d, s = np.broadcast_arrays(np.asarray(decays, dtype=np.float64), np.asarray(steps, dtype=np.int64))
    d, s = d.ravel().copy(), s.ravel().copy()
    _check_steps(s, update_every)
    if d.size and (not np.all(np.isfinite(d)) or d.min() < 0.0 or d.max() >= 1.0):
        raise ValueError(f"decays must lie in [0, 1), got {d.tolist()}")
    m = int(update_every)
    n = s // m
    omb = one_minus_decay_power(d, m)
    b = d ** m
    bn = np.where(n == 0, 1.0, b ** n)  # b**n; 0**0 = 1
    if bias_correction:
        den = one_minus_power(b, omb, n)
        with np.errstate(divide="ignore", invalid="ignore"):
            c = np.where(n > 0, omb / den, 0.0)
        w = np.where(n > 0, 0.0, 1.0)
    else:
        c = np.where(n > 0, omb, 0.0)
        w = bn
    return Profiles(m, n, b, omb, c, np.zeros_like(s), w)


def raw_profiles(steps: Sequence[int] | np.ndarray, update_every: int = 1) -> Profiles:
    """Eq. R: the raw weights at step ``s`` are the profile ``p[s] = 1`` (a point mass)."""
    s = np.asarray(steps, dtype=np.int64).ravel().copy()
    _check_steps(s, update_every)
    z = np.zeros(s.shape, dtype=np.float64)
    return Profiles(int(update_every), np.zeros_like(s), z.copy(), np.ones_like(z), z.copy(), s, np.ones_like(z))


@dataclass(frozen=True)
class PowerProfile:
    """EDM2's power-function average (Eq. PF) read at optimizer step ``step``, ``m = update_every``.

    ``gamma`` is the power-function exponent (from ``sigma_rel`` by :func:`sigma_rel_to_gamma`).
    """

    gamma: float
    step: int
    m: int = 1

    @property
    def n(self) -> int:
        """Updates applied at ``step``: ``step // m``."""
        return int(self.step) // int(self.m)


def power_weights(k: np.ndarray, n: int, gamma: float) -> np.ndarray:
    """Eq. PF: weight of the ``k``-th update's weights (``theta_{k m}``) in the power-function EMA
    after ``n`` updates, ``(k**(g+1) - (k-1)**(g+1)) / n**(g+1)``, ``k = 1 .. n``.

    It is the profile of ``ema <- beta_k ema + (1 - beta_k) theta_{k m}`` with
    ``beta_k = (1 - 1/k)**(gamma + 1)`` (EDM2's ``power_function_beta`` with ``t = k m`` steps and
    ``t_delta = m``): ``prod_{j>k} beta_j = (k/n)**(g+1)``. Computed as
    ``((k-1)/n)**(g+1) expm1((g+1) log1p(1/(k-1)))`` (no cancellation for large ``k``).
    """
    a = float(gamma) + 1.0
    k = np.asarray(k, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        rest = ((k - 1.0) / n) ** a * np.expm1(a * np.log1p(1.0 / (k - 1.0)))
    return np.where(k <= 1.0, (1.0 / n) ** a, rest)


def gamma_to_sigma_rel(gamma: float) -> float:
    """Eq. GS (EDM2 Eq. 123): the relative standard deviation of a power-function profile,
    ``sqrt((g+1) / ((g+2)**2 (g+3)))``."""
    g = float(gamma)
    return math.sqrt((g + 1.0) / ((g + 2.0) ** 2 * (g + 3.0)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """Eq. SG (EDM2 Eq. 126, Algorithm 2): ``gamma`` with :func:`gamma_to_sigma_rel` = ``sigma_rel``,
    the largest real root of ``g**3 + 7 g**2 + (16 - t) g + (12 - t)``, ``t = sigma_rel**-2``.

    ``sigma_rel`` must lie in (0, sqrt(1/12)) ~ (0, 0.2887): ``gamma`` must be > -1 (EDM2 uses
    0.05 .. 0.2). ``ValueError`` otherwise.
    """
    sr = float(sigma_rel)
    if not math.isfinite(sr) or not 0.0 < sr < math.sqrt(1.0 / 12.0):
        raise ValueError(f"sigma_rel must lie in (0, {math.sqrt(1 / 12):.4f}) (EDM2 uses 0.05 .. 0.2), "
                         f"got {sigma_rel!r}")
    t = sr ** -2
    roots = np.roots([1.0, 7.0, 16.0 - t, 12.0 - t])
    return float(roots.real[np.abs(roots.imag) < 1e-9 * max(1.0, t)].max())


# ---------------------------------------------------------------------------------------------
# inner products


def geometric_at(p: Profiles, steps: np.ndarray) -> np.ndarray:
    """Eq. P evaluated: the geometric part of profile ``i`` at step ``steps[..., i]`` (broadcast),
    ``c b**(n - k)`` when ``step = k m`` with ``1 <= k <= n``, else 0."""
    steps = np.asarray(steps, dtype=np.int64)
    k = steps // p.m
    on = (steps % p.m == 0) & (k >= 1) & (k <= p.n)
    e = np.where(on, p.n - k, 0)
    with np.errstate(under="ignore"):
        return np.where(on, p.c * p.b ** e, 0.0)


def geometric_inner(a: Profiles, b: Profiles) -> np.ndarray:
    """Eq. G: ``<geometric_a_i, geometric_b_j>`` for all pairs, a sum of a geometric series.

    With ``N = min(n_i, n_j)`` and ``q = b_i b_j``: ``c_i c_j b_i**(n_i - N) b_j**(n_j - N)
    (1 - q**N) / (1 - q)``; ``1 - q`` is formed from ``1 - b`` (``omb_i + omb_j - omb_i omb_j``),
    ``1 - q**N`` by ``expm1``, so decays near 1 lose no digits.
    """
    ni, nj = a.n[:, None], b.n[None, :]
    nlo = np.minimum(ni, nj)
    bi, bj = a.b[:, None], b.b[None, :]
    oi, oj = a.omb[:, None], b.omb[None, :]
    omq = oi + oj - oi * oj
    q = bi * bj
    with np.errstate(divide="ignore", invalid="ignore", under="ignore"):
        series = np.where(q == 0.0, 1.0, -np.expm1(nlo * np.log1p(-omq))) / omq
        lead = bi ** (ni - nlo) * bj ** (nj - nlo)
        out = a.c[:, None] * b.c[None, :] * lead * series
    return np.where(nlo > 0, out, 0.0)


def gram(p: Profiles, q: Profiles | None = None) -> np.ndarray:
    """``<p_i, q_j>`` for all pairs (``q = p``: the Gram matrix): Eq. G + Eq. GP both ways + Eq. PP.

    Eq. GP: the point mass of one profile picks the other's geometric weight at its step; Eq. PP:
    two point masses meet only on the same step, ``w_i w_j [s_i = s_j]``.
    """
    q = p if q is None else q
    if p.m != q.m:
        raise ValueError(f"profiles with different update_every: {p.m} and {q.m}")
    gg = geometric_inner(p, q)
    gp = geometric_at(p, np.broadcast_to(q.s[:, None], (len(q), len(p)))).T * q.w[None, :]  # geom_i at s_j
    pg = geometric_at(q, np.broadcast_to(p.s[:, None], (len(p), len(q)))) * p.w[:, None]  # geom_j at s_i
    pp = p.w[:, None] * q.w[None, :] * (p.s[:, None] == q.s[None, :])
    return gg + gp + pg + pp


def _geometric_power_one(n: int, b: float, c: float, m: int, target: PowerProfile) -> float:
    """Eq. GF for one geometric part (``c b**(n-k)`` on steps ``k m``) and a power profile: the exact
    float64 sum over the common updates ``k <= min(n, n*)``, leaving out ``b**(n-k) < TAIL``."""
    if c == 0.0 or n == 0 or target.n == 0:
        return 0.0
    hi = min(n, target.n)
    if b == 0.0:
        return c * float(power_weights(np.array([n]), target.n, target.gamma)[0]) if n <= target.n else 0.0
    depth = int(math.ceil(math.log(TAIL) / math.log(b))) if b < 1.0 else hi
    lo = max(1, n - depth)
    total = 0.0
    for start in range(hi, lo - 1, -CHUNK):
        k = np.arange(max(lo, start - CHUNK + 1), start + 1, dtype=np.float64)
        with np.errstate(under="ignore"):
            total += float(np.dot(b ** (n - k), power_weights(k, target.n, target.gamma)))
    return c * total


def power_cross(p: Profiles, target: PowerProfile) -> np.ndarray:
    """``<p_i, power target>`` for every profile: Eq. GF (summed) + the point masses (Eq. PF at ``s_i``).

    Power-function profiles are not geometric, so their inner products with exponentials have no
    geometric closed form; they are summed exactly in float64 over the steps both profiles cover.
    """
    if p.m != target.m:
        raise ValueError(f"the power target updates every {target.m} steps, the profiles every {p.m}")
    out = np.array([_geometric_power_one(int(n), float(b), float(c), p.m, target)
                    for n, b, c in zip(p.n, p.b, p.c, strict=True)], dtype=np.float64)
    k = p.s // p.m
    on = (p.s % p.m == 0) & (k >= 1) & (k <= target.n) & (p.w != 0.0)
    if np.any(on):
        out[on] += p.w[on] * power_weights(k[on], target.n, target.gamma)
    return out


def power_norm2(target: PowerProfile) -> float:
    """Eq. FF: ``||p*||^2`` of a power profile, the exact float64 sum of its squared weights."""
    total = 0.0
    for start in range(1, target.n + 1, CHUNK):
        k = np.arange(start, min(target.n, start + CHUNK - 1) + 1, dtype=np.float64)
        total += float(np.sum(power_weights(k, target.n, target.gamma) ** 2))
    return total


def dense(p: Profiles, length: int) -> np.ndarray:
    """Profiles as explicit ``[len(p), length]`` arrays over steps ``0 .. length - 1`` (for plots;
    memory grows with ``length``, the closed forms above never build these)."""
    tau = np.arange(length, dtype=np.int64)
    out = geometric_at(p, np.broadcast_to(tau[:, None], (length, len(p)))).T.copy()
    hit = p.s < length
    out[np.nonzero(hit)[0], p.s[hit]] += p.w[hit]
    return out


def dense_power(target: PowerProfile, length: int) -> np.ndarray:
    """Eq. PF as an explicit array over steps ``0 .. length - 1`` (for plots)."""
    out = np.zeros(length, dtype=np.float64)
    k = np.arange(1, target.n + 1)
    keep = k * target.m < length
    out[k[keep] * target.m] = power_weights(k[keep], target.n, target.gamma)
    return out


# ---------------------------------------------------------------------------------------------
# least squares


@dataclass(frozen=True)
class Solution:
    """Coefficients of a synthesis and how well they match the target profile.

    ``coef`` sums to one; ``residual`` is the relative profile residual ``||P c - p*|| / ||p*||``
    (0 = exact); ``cond`` is the condition number of the regularised Gram matrix that was solved
    and ``cond_gram`` that of the plain Gram matrix (how ill-posed the problem is); ``ridge`` the
    lambda used, in units of ``||p*||^2``.
    """

    coef: np.ndarray
    residual: float
    cond: float
    cond_gram: float
    ridge: float


def relative_residual(g: np.ndarray, cross: np.ndarray, norm2: float, coef: np.ndarray) -> float:
    """``||P c - p*|| / ||p*||`` from inner products only: ``sqrt(c'Gc - 2 c'b + ||p*||^2) / ||p*||``
    (rounding limits it to >= ~1e-7)."""
    sq = float(coef @ g @ coef - 2.0 * coef @ cross + norm2)
    return math.sqrt(max(sq, 0.0) / norm2) if norm2 > 0 else math.inf


def solve(g: np.ndarray, cross: np.ndarray, norm2: float, ridge: float) -> Solution:
    """Eq. LS: ``min_c ||P c - p*||^2 + lambda ||c||^2`` subject to ``sum_i c_i = 1``.

    ``g`` is the Gram matrix of the stored profiles, ``cross[i] = <p_i, p*>``, ``norm2 = ||p*||^2``,
    ``lambda = ridge * norm2``. The KKT system ``[[G + lambda I, 1], [1', 0]] [c; mu] = [cross; 1]``
    is solved in float64 (least squares when it is singular). The sum-to-one constraint makes the
    synthesis an affine combination: a constant offset of all weights passes through unchanged.
    """
    k = len(cross)
    if k == 0:
        raise ValueError("no stored averages to synthesise from")
    lam = float(ridge) * float(norm2)
    reg = g + lam * np.eye(k)
    kkt = np.zeros((k + 1, k + 1))
    kkt[:k, :k] = reg
    kkt[:k, k] = kkt[k, :k] = 1.0
    rhs = np.append(cross, 1.0)
    try:
        sol = np.linalg.solve(kkt, rhs)
        if not np.all(np.isfinite(sol)):
            raise np.linalg.LinAlgError("non-finite solution")
    except np.linalg.LinAlgError:
        sol = np.linalg.lstsq(kkt, rhs, rcond=None)[0]
    coef = sol[:k]
    coef = coef / coef.sum() if abs(coef.sum() - 1.0) > 1e-12 and coef.sum() != 0 else coef
    return Solution(coef=coef, residual=relative_residual(g, cross, norm2, coef),
                    cond=float(np.linalg.cond(reg)), cond_gram=float(np.linalg.cond(g)), ridge=float(ridge))
