"""EMABank numbers against independent references: a float64 loop, torch AveragedModel, direct BEMA."""

from __future__ import annotations

import math

import pytest
import torch
from bank_helpers import (
    EPS32,
    ReferenceBEMA,
    ReferenceEMA,
    make_tiny,
    max_abs,
    max_abs_diff,
    random_step,
    trainable,
)
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from emascope.bank import BLOCK, DEFAULT_DECAYS, BEMAConfig, EMABank, variant_name

torch.set_num_threads(1)

STEPS = 301


def _bank_params(bank: EMABank, variant, model) -> dict[str, torch.Tensor]:
    sd = bank.materialize(variant, dtype=torch.float32)
    return {k: sd[k] for k in trainable(model)}


@pytest.mark.parametrize("update_every", [1, 7])
@pytest.mark.parametrize("bias_correction", [False, True])
def test_every_default_decay_matches_float64_reference(update_every, bias_correction):
    model = make_tiny(1)
    bank = EMABank(model, update_every=update_every, bias_correction=bias_correction)
    ref = ReferenceEMA(trainable(model), DEFAULT_DECAYS, update_every, bias_correction)
    theta0 = {k: v.detach().double().clone() for k, v in trainable(model).items()}
    gen = torch.Generator().manual_seed(11)
    checked = 0
    for t in range(1, STEPS + 1):
        random_step(model, gen, scale=0.1)
        bank.update()
        ref.step(trainable(model))
        if t % 50 == 0 or t == STEPS:
            n = t // update_every
            assert bank.step == t and bank.num_updates == n and bank.num_skipped == 0
            for d in DEFAULT_DECAYS:
                want = ref.value(d)
                got = _bank_params(bank, d, model)
                # fp32 lerp: at most ~1 ulp of the magnitude per applied update (worst case)
                tol = 2 * EPS32 * max(n, 1) * max_abs(want) + 1e-7
                err = max_abs_diff(got, want)
                assert err <= tol, (d, t, err, tol)
                if not bias_correction:
                    # sensitivity: the EMA's movement away from theta_0 is resolved to 2 %, so a
                    # wrong per-update decay (d instead of d**m) or a lost update would fail here
                    moved = max_abs_diff(want, theta0)
                    assert err <= 0.02 * moved, (d, t, err, moved)
                checked += 1
    assert checked == len(DEFAULT_DECAYS) * 7


def test_update_every_uses_decay_power_m_window():
    """update_every=m names the same window in optimizer steps: a step change is followed at rate d/step."""
    model = make_tiny(2)
    d, m = 0.99, 10
    bank = EMABank(model, [d], update_every=m)
    start = {k: v.detach().clone() for k, v in trainable(model).items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # a unit step held constant
    for _ in range(100):
        bank.update()
    got = _bank_params(bank, d, model)
    # after 100 optimizer steps the EMA has covered 1 - d**100 of the unit step (~63 %), not 1 - d**10
    for k in got:
        torch.testing.assert_close((got[k] - start[k]).double(),
                                   torch.full_like(got[k], 1 - d ** 100, dtype=torch.float64),
                                   rtol=0, atol=1e-5)


def test_bias_correction_first_update_copies_and_differs_from_default_init():
    model = make_tiny(3)
    gen = torch.Generator().manual_seed(3)
    bc = EMABank(model, [0.999], bias_correction=True)
    plain = EMABank(model, [0.999])
    random_step(model, gen, scale=1.0)
    bc.update()
    plain.update()
    live = trainable(model)
    got_bc = _bank_params(bc, 0.999, model)
    got_plain = _bank_params(plain, 0.999, model)
    for k in live:
        assert torch.equal(got_bc[k], live[k].detach())  # w_1 = 1: the zero-init average is all theta_1
        assert not torch.allclose(got_plain[k], live[k].detach())  # starts from attach weights


@pytest.mark.parametrize("decay", DEFAULT_DECAYS)
def test_each_decay_matches_torch_averaged_model(decay):
    model = make_tiny(4)
    bank = EMABank(model, [decay])
    # AveragedModel copies the weights at its first update_parameters() call: make that the attach step
    swa = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=False)
    swa.update_parameters(model)
    gen = torch.Generator().manual_seed(5)
    for _ in range(STEPS):
        random_step(model, gen, scale=0.1)
        bank.update()
        swa.update_parameters(model)
    got = _bank_params(bank, decay, model)
    theirs = {k: p.detach() for k, p in swa.module.named_parameters()}
    # both are fp32 lerps with weight 1 - d from the same fp32 states: identical up to lerp rounding
    err = max_abs_diff(got, theirs)
    assert err <= 4 * EPS32 * max_abs(theirs) * math.sqrt(STEPS), err


@pytest.mark.parametrize("cfg,update_every", [
    (BEMAConfig(), 1),
    (BEMAConfig(kappa=0.7, eta=0.4, rho=3.0, gamma=2.0, beta_min=0.02), 1),
    (BEMAConfig(), 4),
    (BEMAConfig(tau=7, phi=3), 1),         # TRL's update_after / update_freq
    (BEMAConfig(tau=20, phi=8, rho=4.0), 4),
    (BEMAConfig.from_trl(update_freq=5), 1),
])
def test_bema_matches_direct_formulas(cfg, update_every):
    model = make_tiny(6)
    bank = EMABank(model, [0.9, 0.999], bema=cfg, update_every=update_every)
    assert bank.variants[-1] == "bema"
    ref = ReferenceBEMA(trainable(model), update_every=update_every, **cfg.as_dict())
    gen = torch.Generator().manual_seed(6)
    for t in range(1, STEPS + 1):
        random_step(model, gen, scale=0.1)
        bank.update()
        ref.step(trainable(model))
        if t % 60 == 0 or t in (1, 5, 6, 7, 8, 10, 20, 21, 28):
            want = ref.value(trainable(model))
            got = _bank_params(bank, "bema", model)
            err = max_abs_diff(got, want)
            assert err <= 4 * EPS32 * t * max_abs(want) + 1e-6, (t, err)


def test_bema_true_uses_reference_defaults():
    assert BEMAConfig().as_dict() == {"kappa": 0.5, "eta": 0.2, "rho": 10.0, "gamma": 1.0, "beta_min": 0.0,
                                      "tau": 0, "phi": None}
    bank = EMABank(make_tiny(), [0.9], bema=True)
    assert bank.bema == BEMAConfig()


def test_bema_schedule_is_checked_against_update_every():
    with pytest.raises(ValueError, match="phi=6 must be a multiple of update_every=4"):
        EMABank(make_tiny(), [0.9], bema=BEMAConfig(phi=6), update_every=4)
    with pytest.raises(ValueError, match="tau=3 must be a multiple"):
        EMABank(make_tiny(), [0.9], bema=BEMAConfig(tau=3), update_every=2)
    with pytest.raises(ValueError, match="update_after"):
        BEMAConfig(tau=-1)
    with pytest.raises(ValueError, match="update_freq"):
        BEMAConfig(phi=0)
    assert BEMAConfig.from_trl() == BEMAConfig(phi=400)  # TRL's defaults: the paper's, every 400 steps


def test_bema_at_attach_is_the_attach_weights():
    model = make_tiny(7)
    bank = EMABank(model, [0.9], bema=True)
    got = _bank_params(bank, "bema", model)
    for k, v in trainable(model).items():
        assert torch.equal(got[k], v.detach())


def test_decay_zero_follows_the_live_weights():
    model = make_tiny(8)
    bank = EMABank(model, [0.0, 0.5])
    gen = torch.Generator().manual_seed(8)
    for _ in range(5):
        random_step(model, gen)
        bank.update()
    got = _bank_params(bank, 0.0, model)
    for k, v in trainable(model).items():
        assert torch.equal(got[k], v.detach())


def test_variant_names_and_parsing():
    from emascope.bank import parse_variant

    assert variant_name(0.9999) == "0.9999"
    assert parse_variant("0.99990") == "0.9999"
    assert parse_variant(0.9999) == "0.9999"
    assert parse_variant(" RAW ") == "raw"
    assert parse_variant("bema") == "bema"
    bank = EMABank(make_tiny())
    assert bank.variants == ["raw", *[repr(float(d)) for d in DEFAULT_DECAYS]]
    assert bank.decays == DEFAULT_DECAYS
    assert bank.resolve("0.999990") == "0.99999"


class _Vectors(torch.nn.Module):
    """Parameters of given sizes: puts the bank's block boundaries (emascope.bank.BLOCK) where we want."""

    def __init__(self, sizes: list[int]) -> None:
        super().__init__()
        self.ps = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(n)) for n in sizes)


@pytest.mark.parametrize("sizes", [[BLOCK * 3], [BLOCK * 2 + 5, 7], [BLOCK - 1], [3, BLOCK, BLOCK + 1]])
def test_block_boundaries(sizes):
    torch.manual_seed(sum(sizes))
    model = _Vectors(sizes)
    decays = [0.5, 0.9, 0.999]
    bank = EMABank(model, decays, bema=True)
    ref = ReferenceEMA(trainable(model), decays)
    gen = torch.Generator().manual_seed(1)
    for _ in range(40):
        random_step(model, gen, scale=0.5)
        bank.update()
        ref.step(trainable(model))
    rows = bank.state_dict()["bank"]
    assert tuple(rows.shape) == (len(decays) + 1, sum(sizes))
    for i, d in enumerate(decays):
        flat = torch.cat([v.reshape(-1) for v in ref.value(d).values()])
        torch.testing.assert_close(rows[i].double(), flat, rtol=0, atol=1e-5)
        got = _bank_params(bank, d, model)
        assert torch.equal(torch.cat([v.reshape(-1) for v in got.values()]), rows[i])
    # round trip through the row-major form is exact, padding included
    other = EMABank(model, decays, bema=True)
    other.load_state_dict(bank.state_dict())
    assert torch.equal(other._blocks, bank._blocks)
    n_pad = bank._blocks.shape[0] * BLOCK - sum(sizes)
    if n_pad:
        assert torch.count_nonzero(bank._blocks[-1, :, BLOCK - n_pad:]) == 0


def test_ema_math_bias_corrected_weight_equals_zero_init_division():
    """Eq. BC' (the running lerp weight the bank uses) == Eq. BC (zero-init EMA / (1 - b**n))."""
    from emascope.ema_math import bias_corrected_weight, bias_correction_denominator, effective_decay

    gen = torch.Generator().manual_seed(0)
    xs = torch.randn(200, generator=gen, dtype=torch.float64).tolist()
    for d, m in [(0.9, 1), (0.999, 7), (0.5, 3)]:
        b = d ** m
        assert effective_decay(d, m) == b
        z, ema = 0.0, 123.0  # the running form ignores its start value: w_1 = 1
        for n, x in enumerate(xs, start=1):
            z = b * z + (1 - b) * x
            ema = ema + bias_corrected_weight(d, m, n) * (x - ema)
            assert ema == pytest.approx(z / bias_correction_denominator(d, m, n), rel=1e-12, abs=1e-12)
    with pytest.raises(ValueError, match="num_updates"):
        bias_corrected_weight(0.9, 1, 0)


@pytest.mark.parametrize("kw", [{}, {"bias_correction": True, "bema": True, "update_every": 2}])
def test_direct_cpu_path_is_bit_identical_to_staging_path(kw):
    """Large fp32 parameters are lerped in place on CPU (emascope.bank.DIRECT_MIN); same bits as staging."""
    from emascope.bank import DIRECT_MIN

    sizes = [5, DIRECT_MIN + 3 * BLOCK + 17, 7, DIRECT_MIN, 3 * BLOCK]
    torch.manual_seed(3)
    model = _Vectors(sizes)
    fast = EMABank(model, [0.5, 0.99, 0.9999], **kw)
    plain = EMABank(model, [0.5, 0.99, 0.9999], **kw)
    plain._direct = None  # force the full-staging path
    assert fast._direct is not None and len(fast._direct) == 2
    ref = ReferenceEMA(trainable(model), [0.5, 0.99, 0.9999], kw.get("update_every", 1),
                       kw.get("bias_correction", False))
    gen = torch.Generator().manual_seed(4)
    for t in range(1, 13):
        random_step(model, gen, scale=0.3)
        bad = t in (4, 9)
        if bad:  # non-finite inside a directly-read parameter, then inside a staged one
            p = model.ps[1] if t == 4 else model.ps[2]
            saved = p.detach().clone()
            with torch.no_grad():
                p[len(p) // 2] = float("nan") if t == 4 else float("inf")
        fast.update()
        plain.update()
        ref.step(trainable(model), finite=not bad)
        if bad:
            with torch.no_grad():
                p.copy_(saved)
    assert torch.equal(fast._blocks, plain._blocks)
    assert fast.num_skipped == plain.num_skipped == (2 if kw.get("update_every", 1) == 1 else 1)
    for d in (0.5, 0.99, 0.9999):
        got = _bank_params(fast, d, model)
        assert max_abs_diff(got, ref.value(d)) <= 1e-5
