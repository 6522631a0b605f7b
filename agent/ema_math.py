"""Pure EMA equations used by the bank: no tensors, no state, float64 Python arithmetic.

Conventions (shared with :mod:`emascope.bank`):

- ``decay`` (``d``, also called beta in ema-pytorch) is the weight kept from the old average per
  optimizer step; ``1 - d`` is the weight given to the new weights. The averaging window of a decay
  is about ``1 / (1 - d)`` optimizer steps (0.999 -> ~1000 steps).
- ``update_every = m``: the bank reads the weights only every ``m`` optimizer steps and then applies
  the decay ``d**m`` (Eq. U below), so a decay names the same window in optimizer steps whatever
  ``m`` is.
- ``t`` counts optimizer steps after attach (1, 2, ...); ``n`` counts *applied* bank updates.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from emascope.runformat import MAX_DECAYS, check_decay

#: The default decay sweep: from a few steps (0.5) to a million steps (0.999999) of averaging window,
#: dense around the community default 0.9999 where the field's sweeps find the cliff.
DEFAULT_DECAYS: tuple[float, ...] = (0.5, 0.9, 0.99, 0.999, 0.9993, 0.9995, 0.9997, 0.9999, 0.99999, 0.999999)


def effective_decay(decay: float, update_every: int) -> float:
    """Eq. U: the decay applied per bank update when updating every ``update_every`` steps: ``d**m``."""
    return float(decay) ** int(update_every)


def update_weight(decay: float, update_every: int) -> float:
    """Eq. L: the lerp weight of the new weights per bank update, ``1 - d**m`` (the "1 - decay" side)."""
    return 1.0 - effective_decay(decay, update_every)


def bias_correction_denominator(decay: float, update_every: int, num_updates: int) -> float:
    """Eq. BC (Adam-style): ``1 - (d**m)**n`` for a zero-initialised EMA after ``n`` applied updates.

    The bias-corrected average is ``EMA_zero_init / (1 - (d**m)**n)``; 0 when ``n == 0``.
    """
    return 1.0 - effective_decay(decay, update_every) ** int(num_updates)


def bias_corrected_weight(decay: float, update_every: int, num_updates: int) -> float:
    """Eq. BC': the lerp weight at the ``n``-th applied update (``n >= 1``) of the bias-corrected EMA.

    ``EMA_n = EMA_{n-1} + w_n (theta - EMA_{n-1})`` with ``w_n = (1 - b) / (1 - b**n)``, ``b = d**m``,
    equals the zero-initialised EMA divided by ``1 - b**n`` (Eq. BC) exactly in exact arithmetic;
    ``w_1 = 1`` (the first update copies the weights).
    """
    if num_updates < 1:
        raise ValueError(f"num_updates must be >= 1, got {num_updates!r}")
    return update_weight(decay, update_every) / bias_correction_denominator(decay, update_every, num_updates)


@dataclass(frozen=True)
class BEMAConfig:
    """BEMA (bias-corrected EMA, arXiv 2508.00180 "EMA Without the Lag") hyperparameters.

    ``beta_t = max((rho + gamma t)**-kappa, beta_min)`` (EMA weight of the new weights, i.e. the
    "1 - decay" side) and ``alpha_t = (rho + gamma t)**-eta`` (weight of the bias correction).
    ``t`` counts optimizer steps since attach. Schedule (:func:`bema_weight`):

    - ``tau`` (burn-in, TRL's ``update_after``): before step ``tau`` the ``"bema"`` variant is the
      live weights; at step ``tau`` (when > 0) ``theta_0`` and the EMA are reset to the live
      weights (with ``tau = 0`` they are the weights at attach);
    - ``phi`` (update frequency, TRL's ``update_freq``): the EMA is updated at steps
      ``tau + k phi`` (k >= 1) with ``beta_t`` of that step (no ``**phi`` adjustment, as in the
      authors' reference implementation and TRL). ``None``: at every bank update (every
      ``update_every`` steps). ``tau`` and ``phi`` must be multiples of the bank's ``update_every``.

    The correction always uses the current step: between EMA updates the variant is
    ``EMA + alpha_t (theta_t - theta_0)`` with the last EMA and the live ``theta_t`` (TRL keeps the
    model of its last update step instead; both agree at update steps). Defaults are those of the
    authors' reference implementation with an update at every step; :meth:`from_trl` maps TRL's
    ``BEMACallback`` arguments (and defaults) onto these names.
    """

    kappa: float = 0.5
    eta: float = 0.2
    rho: float = 10.0
    gamma: float = 1.0
    beta_min: float = 0.0
    tau: int = 0
    phi: int | None = None

    def __post_init__(self) -> None:
        for name in ("kappa", "eta", "rho", "gamma", "beta_min"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"BEMAConfig.{name} must be a finite number, got {value!r}")
        if self.kappa < 0:
            raise ValueError(f"BEMAConfig.kappa must be >= 0, got {self.kappa!r}")
        if self.eta < 0:
            raise ValueError(f"BEMAConfig.eta must be >= 0, got {self.eta!r}")
        if self.rho <= 0:
            raise ValueError(f"BEMAConfig.rho must be > 0, got {self.rho!r}")
        if self.gamma < 0:
            raise ValueError(f"BEMAConfig.gamma must be >= 0, got {self.gamma!r}")
        if not 0.0 <= self.beta_min <= 1.0:
            raise ValueError(f"BEMAConfig.beta_min must be in [0, 1], got {self.beta_min!r}")
        if isinstance(self.tau, bool) or not isinstance(self.tau, int) or self.tau < 0:
            raise ValueError(f"BEMAConfig.tau (TRL's update_after) must be an int >= 0, got {self.tau!r}")
        if self.phi is not None and (isinstance(self.phi, bool) or not isinstance(self.phi, int) or self.phi < 1):
            raise ValueError(f"BEMAConfig.phi (TRL's update_freq) must be an int >= 1 or None, got {self.phi!r}")

    @classmethod
    def from_trl(cls, *, update_freq: int = 400, ema_power: float = 0.5, bias_power: float = 0.2,
                 lag: float = 10, update_after: int = 0, multiplier: float = 1.0,
                 min_ema_multiplier: float = 0.0) -> BEMAConfig:
        """The config equal to TRL's ``BEMACallback(**same arguments)`` (TRL's defaults included):
        ``phi = update_freq``, ``kappa = ema_power``, ``eta = bias_power``, ``rho = lag``,
        ``tau = update_after``, ``gamma = multiplier``, ``beta_min = min_ema_multiplier``."""
        return cls(kappa=float(ema_power), eta=float(bias_power), rho=float(lag), gamma=float(multiplier),
                   beta_min=float(min_ema_multiplier), tau=int(update_after), phi=int(update_freq))

    def as_dict(self) -> dict[str, float | int | None]:
        out: dict[str, float | int | None] = {k: float(getattr(self, k))
                                              for k in ("kappa", "eta", "rho", "gamma", "beta_min")}
        out["tau"], out["phi"] = int(self.tau), self.phi
        return out


def bema_beta(t: int, cfg: BEMAConfig) -> float:
    """BEMA Eq. beta: ``beta_t = max((rho + gamma t)**-kappa, beta_min)``, capped at 1."""
    return min(1.0, max((cfg.rho + cfg.gamma * t) ** (-cfg.kappa), cfg.beta_min))


def bema_alpha(t: int, cfg: BEMAConfig) -> float:
    """BEMA Eq. alpha: ``alpha_t = (rho + gamma t)**-eta``."""
    return (cfg.rho + cfg.gamma * t) ** (-cfg.eta)


def bema_weight(t: int, cfg: BEMAConfig, update_every: int) -> float:
    """BEMA's schedule as the lerp weight of its EMA row at a bank update at step ``t`` (>= 1):
    ``1`` at ``t == tau`` (the start: the EMA is reset to the live weights), ``beta_t`` at
    ``t = tau + k phi`` (k >= 1, ``phi`` defaults to ``update_every``), else ``0`` (unchanged)."""
    phi = cfg.phi or update_every
    if t < cfg.tau:
        return 0.0
    if t == cfg.tau:
        return 1.0
    return bema_beta(t, cfg) if (t - cfg.tau) % phi == 0 else 0.0


def validate_bema_schedule(cfg: BEMAConfig | None, update_every: int) -> None:
    """``tau`` and ``phi`` must be multiples of ``update_every`` (the bank only sees those steps)."""
    if cfg is None:
        return
    for name, value in (("tau", cfg.tau), ("phi", cfg.phi)):
        if value is not None and value % update_every:
            raise ValueError(f"BEMAConfig.{name}={value} must be a multiple of update_every={update_every}: "
                             "the bank reads the weights only every update_every steps")


def validate_decays(decays: Sequence[float]) -> tuple[float, ...]:
    """Check a decay set: 1 to :data:`~emascope.runformat.MAX_DECAYS` decays, each a real number in
    [0, 1), no duplicates. Returns floats."""
    if isinstance(decays, (str, bytes)) or not isinstance(decays, Sequence):
        try:
            decays = list(decays)  # type: ignore[arg-type]
        except TypeError:
            raise ValueError(f"decays must be a sequence of floats, got {decays!r}") from None
    if len(decays) == 0:
        raise ValueError("decays must hold at least one decay, got an empty sequence")
    if len(decays) > MAX_DECAYS:
        raise ValueError(f"decays holds {len(decays)} decays; at most {MAX_DECAYS} are supported")
    out: list[float] = []
    seen: set[float] = set()
    for d in decays:
        f = check_decay(d)
        if f in seen:
            raise ValueError(f"decay {d!r} is given twice")
        seen.add(f)
        out.append(f)
    return tuple(out)


def validate_update_every(update_every: int) -> int:
    """``update_every`` must be an int >= 1 (bools refused)."""
    if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
        raise ValueError(f"update_every must be an int >= 1, got {update_every!r}")
    return update_every
