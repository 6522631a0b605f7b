"""EMABank behaviour: resume, swap, low precision, non-finite steps, layout (frozen/buffers/tied), errors."""

from __future__ import annotations

import io

import pytest
import torch
from bank_helpers import EPS32, ReferenceEMA, TiedNet, TinyNet, make_tiny, random_step, trainable
from torch import nn

from emascope.bank import DEFAULT_DECAYS, BEMAConfig, EMABank
from emascope.snapshot import export_checkpoint

torch.set_num_threads(1)


def _all_variants(bank: EMABank) -> dict[str, dict[str, torch.Tensor]]:
    return {v: bank.materialize(v) for v in bank.variants}


# ---------------------------------------------------------------- resume
@pytest.mark.parametrize("kw", [
    {},
    {"update_every": 7, "bias_correction": True},
    {"update_every": 3, "bema": True, "average_buffers": True},
])
def test_resume_is_bit_identical_to_never_stopping(kw):
    stop, total = 47, 120  # 47 is not a multiple of 3 or 7: resume in the middle of a window
    model = make_tiny(10)
    bank = EMABank(model, **kw)
    gen = torch.Generator().manual_seed(10)
    for t in range(1, stop + 1):
        random_step(model, gen)
        if t == 21:  # a skipped (NaN) update before the stop: the counter must survive the resume
            with torch.no_grad():
                model.fc1.weight[0, 0] = float("nan")
            saved = model.fc1.weight.detach().clone()
        bank.update()
        if t == 21:
            with torch.no_grad():
                model.fc1.weight.copy_(torch.nan_to_num(saved, nan=0.25))
    # checkpoint through a real file round trip (weights_only: no pickle of arbitrary objects)
    buf = io.BytesIO()
    torch.save({"bank": bank.state_dict(), "model": model.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed_model = TinyNet()
    resumed_model.load_state_dict(ckpt["model"])
    resumed = EMABank(resumed_model, **kw)
    resumed.load_state_dict(ckpt["bank"])
    assert resumed.step == bank.step == stop
    gen2 = torch.Generator()
    gen2.set_state(gen.get_state())
    for _ in range(stop, total):
        random_step(model, gen)
        random_step(resumed_model, gen2)
        bank.update()
        resumed.update()
    assert resumed.step == bank.step == total
    assert resumed.num_skipped == bank.num_skipped == (1 if 21 % kw.get("update_every", 1) == 0 else 0)
    assert resumed.num_updates == bank.num_updates
    a, b = _all_variants(bank), _all_variants(resumed)
    for v in bank.variants:
        for k in a[v]:
            assert torch.equal(a[v][k], b[v][k]), (v, k)
    sa, sb = bank.state_dict(), resumed.state_dict()
    for key in sa:
        if isinstance(sa[key], torch.Tensor):
            assert torch.equal(sa[key], sb[key]), key
        else:
            assert sa[key] == sb[key], key


# ---------------------------------------------------------------- swap
def test_swap_loads_the_variant_and_restores_bit_exactly():
    model = make_tiny(11)
    bank = EMABank(model, [0.9, 0.99], bema=True)
    gen = torch.Generator().manual_seed(11)
    for _ in range(30):
        random_step(model, gen)
        bank.update()
    model.bn.train()
    model(torch.randn(16, 6))  # give BatchNorm real running statistics
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params_before = [id(p) for p in model.parameters()]
    for v in ["0.9", "bema", "raw", 0.99]:
        want = bank.materialize(v)
        with bank.swap(model, v) as m:
            assert m is model
            for k, t in model.state_dict().items():
                assert torch.equal(t, want[k]), (v, k)
        for k, t in model.state_dict().items():
            assert torch.equal(t, before[k]), (v, k)
    assert [id(p) for p in model.parameters()] == params_before  # optimizer references stay valid


def test_swap_restores_when_the_body_raises():
    model = make_tiny(12)
    bank = EMABank(model, [0.5])
    gen = torch.Generator().manual_seed(12)
    for _ in range(5):
        random_step(model, gen)
        bank.update()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="sampler failed"):
        with bank.swap(model, "0.5"):
            assert not torch.equal(model.fc1.weight, before["fc1.weight"])
            with torch.no_grad():
                model.fc1.weight.mul_(3.0)  # the body may even write into the weights
            raise RuntimeError("sampler failed")
    for k, t in model.state_dict().items():
        assert torch.equal(t, before[k]), k


def test_swap_into_a_different_model_is_refused():
    bank = EMABank(make_tiny(), [0.9])
    with pytest.raises(ValueError, match="fc1.weight"):
        with bank.swap(TinyNet(d_in=7), "0.9"):
            pass
    extra = TinyNet()
    extra.head = nn.Linear(3, 1)
    with pytest.raises(ValueError, match=r"entries the bank does not hold: \['head.weight', 'head.bias'\]"):
        with bank.swap(extra, "0.9"):
            pass


# ---------------------------------------------------------------- precision
def test_bf16_model_keeps_fp32_banks_that_follow_sub_resolution_updates():
    model = make_tiny(13).to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():  # magnitudes in [1, 2): bf16 resolution 2**-7
            p.copy_(1 + torch.rand(p.shape, generator=torch.Generator().manual_seed(13)))
    d = 0.999
    bank = EMABank(model, [d, 0.9999])
    assert bank.state_dict()["bank"].dtype == torch.float32
    start = {k: v.detach().double().clone() for k, v in trainable(model).items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(2 ** -5)  # a step of 2 to 4 bf16 ulps, then held
    live = {k: v.detach().double().clone() for k, v in trainable(model).items()}
    steps = 50
    for _ in range(steps):
        bank.update()
    # each update moves the average by 0.1 % of the step (~1e-4 here), far below half a bf16 ulp
    frac = 1 - d ** steps
    got = bank.materialize(d, dtype=torch.float32)
    for k in live:
        want = start[k] + frac * (live[k] - start[k])
        torch.testing.assert_close(got[k].double(), want, rtol=0, atol=64 * EPS32 * float(want.abs().max()))
        assert not torch.equal(got[k].double(), start[k])  # it moved
        # a bf16 EMA would not have: every single update is below half a bf16 ulp
        naive = start[k].to(torch.bfloat16)
        for _ in range(steps):
            naive = naive.lerp(live[k].to(torch.bfloat16), 1 - d)
        assert torch.equal(naive.double(), start[k])
    # read-out in the model's dtype by default
    assert bank.materialize(d)["fc1.weight"].dtype == torch.bfloat16
    assert bank.materialize(d, dtype=torch.float32)["fc1.weight"].dtype == torch.float32
    assert bank.materialize(d, dtype=torch.float32)["bn.num_batches_tracked"].dtype == torch.int64


# ---------------------------------------------------------------- non-finite weights
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("kw", [{}, {"bias_correction": True, "bema": True}])
def test_non_finite_step_is_skipped_counted_and_banks_untouched(bad, kw):
    model = make_tiny(14)
    bank = EMABank(model, DEFAULT_DECAYS, **kw)
    ref = ReferenceEMA(trainable(model), DEFAULT_DECAYS, 1, kw.get("bias_correction", False))
    gen = torch.Generator().manual_seed(14)
    for t in range(1, 31):
        random_step(model, gen)
        if t == 10:
            saved = model.fc2.bias.detach().clone()
            with torch.no_grad():
                model.fc2.bias[1] = bad
            before = bank.state_dict()["bank"].clone()
            bank.update()
            ref.step(trainable(model), finite=False)
            assert torch.equal(bank.state_dict()["bank"], before)
            assert bank.num_skipped == 1 and bank.step == 10 and bank.num_updates == 9
            with torch.no_grad():
                model.fc2.bias.copy_(saved)
            continue
        bank.update()
        ref.step(trainable(model))
    assert bank.num_skipped == 1 and bank.num_updates == 29
    assert torch.isfinite(bank.state_dict()["bank"]).all()
    for d in DEFAULT_DECAYS:
        got = bank.materialize(d, dtype=torch.float32)
        for k, want in ref.value(d).items():
            torch.testing.assert_close(got[k].double(), want, rtol=0, atol=1e-5)


def test_device_side_flag_path_matches_host_check():
    """The sync-free path (used on GPUs) computed on CPU gives the same banks, skips and counters."""
    models = [make_tiny(15), make_tiny(15)]
    banks = [EMABank(m, [0.5, 0.99], bias_correction=True, bema=True) for m in models]
    banks[1]._sync_free = True
    gens = [torch.Generator().manual_seed(15) for _ in models]
    for t in range(1, 25):
        for m, b, g in zip(models, banks, gens, strict=True):
            random_step(m, g)
            if t in (5, 6, 17):
                saved = m.fc1.weight.detach().clone()
                with torch.no_grad():
                    m.fc1.weight[2, 3] = float("nan") if t != 6 else float("inf")
            b.update()
            if t in (5, 6, 17):
                with torch.no_grad():
                    m.fc1.weight.copy_(saved)
    assert banks[0].num_skipped == banks[1].num_skipped == 3
    assert banks[0].num_updates == banks[1].num_updates == 21
    for v in banks[0].variants:
        a, b = banks[0].materialize(v), banks[1].materialize(v)
        for k in a:
            assert torch.equal(a[k], b[k]), (v, k)


# ---------------------------------------------------------------- layout: frozen, buffers, tied
def test_frozen_parameters_are_not_duplicated():
    model = make_tiny(16)
    model.fc1.requires_grad_(False)
    bank = EMABank(model, DEFAULT_DECAYS)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert bank.numel == n_trainable
    assert tuple(bank.state_dict()["bank"].shape) == (len(DEFAULT_DECAYS), n_trainable)
    gen = torch.Generator().manual_seed(16)
    for _ in range(3):
        random_step(model, gen)
        bank.update()
    with torch.no_grad():
        model.fc1.weight.add_(1.0)  # a frozen tensor changed by hand: read live at materialize time
    sd = bank.materialize("0.9")
    assert torch.equal(sd["fc1.weight"], model.fc1.weight.detach())
    assert set(sd) == set(model.state_dict())


def test_buffers_live_by_default_int_buffers_always_copied():
    model = make_tiny(17)
    bank = EMABank(model, [0.5])
    assert bank.numel == sum(p.numel() for p in model.parameters())  # buffers are not in the bank
    model.train()
    for _ in range(4):
        model(torch.randn(8, 6))
        bank.update()
    sd = bank.materialize("0.5")
    assert torch.equal(sd["bn.running_mean"], model.bn.running_mean)
    assert torch.equal(sd["bn.running_var"], model.bn.running_var)
    assert sd["bn.num_batches_tracked"].dtype == torch.int64
    assert int(sd["bn.num_batches_tracked"]) == 4


def test_average_buffers_averages_float_buffers_only():
    model = make_tiny(18)
    bank = EMABank(model, [0.5, 0.9], average_buffers=True)
    n_params = sum(p.numel() for p in model.parameters())
    assert bank.numel == n_params + 2 * model.bn.num_features  # running_mean + running_var
    tracked = {"bn.running_mean": model.bn.running_mean, "bn.running_var": model.bn.running_var}
    ref = ReferenceEMA(tracked, [0.5, 0.9])
    model.train()
    gen = torch.Generator().manual_seed(18)
    for _ in range(12):
        model(torch.randn(8, 6, generator=gen) * 3 + 1)
        bank.update()
        ref.step(tracked)
    for d in (0.5, 0.9):
        sd = bank.materialize(d)
        for k, want in ref.value(d).items():
            torch.testing.assert_close(sd[k].double(), want, rtol=0, atol=1e-5)
            assert not torch.allclose(sd[k], tracked[k])
        assert int(sd["bn.num_batches_tracked"]) == 12  # copied, never averaged


def test_tied_parameters_are_stored_once_and_exported_under_every_name(tmp_path):
    torch.manual_seed(19)
    model = TiedNet()
    assert model.out.weight is model.emb.weight
    bank = EMABank(model, [0.9])
    assert bank.numel == sum(p.numel() for p in model.parameters())  # parameters() deduplicates
    gen = torch.Generator().manual_seed(19)
    for _ in range(6):
        random_step(model, gen)
        bank.update()
    sd = bank.materialize("0.9")
    assert set(sd) == {"emb.weight", "mid.weight", "mid.bias", "out.weight"}
    assert torch.equal(sd["emb.weight"], sd["out.weight"])
    path = export_checkpoint(bank, "0.9", tmp_path / "tied.safetensors")
    from safetensors.torch import load_file

    fresh = TiedNet()
    fresh.load_state_dict(load_file(path))
    assert fresh.out.weight is fresh.emb.weight
    assert torch.equal(fresh.emb.weight, sd["emb.weight"])
    with bank.swap(model, "0.9"):
        assert torch.equal(model.out.weight, sd["out.weight"])


def test_ddp_wrapped_model_is_unwrapped(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model = make_tiny(20)
        ddp = nn.parallel.DistributedDataParallel(model)
        bank = EMABank(ddp, [0.9])
        assert set(bank.materialize("0.9")) == set(model.state_dict())  # no "module." prefix
        with bank.swap(ddp, "0.9"):
            pass
    finally:
        dist.destroy_process_group()


def test_compiled_and_data_parallel_models_are_unwrapped():
    model = make_tiny(23)
    keys = set(model.state_dict())
    for wrapped in (torch.compile(model), nn.DataParallel(model)):
        bank = EMABank(wrapped, [0.9])
        assert set(bank.materialize("0.9")) == keys
        with bank.swap(wrapped, "0.9"):
            pass


def test_device_cpu_bank_works_and_matches_default():
    model = make_tiny(21)
    a = EMABank(model, [0.9, 0.999], device="cpu")
    b = EMABank(model, [0.9, 0.999])
    assert a.device == torch.device("cpu") and a.state_dict()["bank"].device.type == "cpu"
    gen = torch.Generator().manual_seed(21)
    for _ in range(10):
        random_step(model, gen)
        a.update()
        b.update()
    assert torch.equal(a.state_dict()["bank"], b.state_dict()["bank"])
    with pytest.raises(ValueError, match="bad device"):
        EMABank(model, [0.9], device="not-a-device")


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize("decays,match", [
    ([0.9, 1.0], "1.0"),
    ([1.5], "1.5"),
    ([-0.1], "-0.1"),
    ([float("nan")], "nan"),
    ([0.9, 0.99, 0.9], "0.9.*twice"),
    ([], "at least one"),
    (["0.9"], "'0.9' is not a number"),
    ([None], "None"),
    ([True], "True"),
    (0.9, "sequence"),
])
def test_bad_decays_name_the_bad_value(decays, match):
    with pytest.raises(ValueError, match=match):
        EMABank(make_tiny(), decays)


@pytest.mark.parametrize("kw,match", [
    ({"update_every": 0}, "update_every"),
    ({"update_every": 2.0}, "update_every"),
    ({"update_every": True}, "update_every"),
    ({"bias_correction": 1}, "bias_correction"),
    ({"average_buffers": "yes"}, "average_buffers"),
    ({"bema": "yes"}, "bema"),
])
def test_bad_options_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        EMABank(make_tiny(), [0.9], **kw)


@pytest.mark.parametrize("kw,match", [
    ({"kappa": -1.0}, "kappa"), ({"eta": float("nan")}, "eta"), ({"rho": 0.0}, "rho"),
    ({"gamma": -1.0}, "gamma"), ({"beta_min": 1.5}, "beta_min"),
])
def test_bad_bema_config_is_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        BEMAConfig(**kw)


def test_model_errors():
    with pytest.raises(ValueError, match="nn.Module"):
        EMABank({"w": torch.zeros(3)}, [0.9])  # type: ignore[arg-type]
    frozen = make_tiny()
    frozen.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        EMABank(frozen, [0.9])


def test_unknown_variant_lists_the_available_ones():
    bank = EMABank(make_tiny(), [0.9, 0.99])
    with pytest.raises(ValueError, match=r"unknown variant '0.999'.*raw, 0.9, 0.99"):
        bank.materialize("0.999")
    with pytest.raises(ValueError, match="bema"):
        bank.materialize("bema")  # only with bema=True
    with pytest.raises(ValueError, match="'ema'"):
        bank.materialize("ema")
    with pytest.raises(ValueError, match="dtype"):
        bank.materialize("0.9", dtype=torch.int32)


def test_load_state_dict_names_what_differs():
    model = make_tiny()
    sd = EMABank(model, [0.9, 0.99]).state_dict()
    with pytest.raises(ValueError, match=r"decays differ.*0\.99.*0\.999"):
        EMABank(model, [0.9, 0.999]).load_state_dict(sd)
    with pytest.raises(ValueError, match="update_every differs"):
        EMABank(model, [0.9, 0.99], update_every=2).load_state_dict(sd)
    with pytest.raises(ValueError, match="bias_correction differs"):
        EMABank(model, [0.9, 0.99], bias_correction=True).load_state_dict(sd)
    with pytest.raises(ValueError, match="bema differs"):
        EMABank(model, [0.9, 0.99], bema=True).load_state_dict(sd)
    with pytest.raises(ValueError, match=r"'fc1.weight' has shape \(12, 6\) in the checkpoint but \(12, 7\)"):
        EMABank(TinyNet(d_in=7), [0.9, 0.99]).load_state_dict(sd)
    bigger = nn.Sequential()
    bigger.add_module("fc1", nn.Linear(6, 12))
    with pytest.raises(ValueError, match="'bn.weight' is in the checkpoint but not in the model"):
        EMABank(bigger, [0.9, 0.99]).load_state_dict(sd)
    frozen = make_tiny()
    frozen.fc2.requires_grad_(False)
    with pytest.raises(ValueError, match="'fc2.weight' is in the checkpoint but not in the model|"
                                         "'fc2.weight' is 'avg' in the checkpoint but 'frozen'"):
        EMABank(frozen, [0.9, 0.99]).load_state_dict(sd)
    with pytest.raises(ValueError, match="not an EMABank state dict"):
        EMABank(model, [0.9, 0.99]).load_state_dict({"bank": torch.zeros(2, 3)})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_model_with_pinned_host_bank_matches_device_bank():
    model = make_tiny(22).cuda()
    host = EMABank(model, [0.9, 0.999], device="cpu", bema=True, bias_correction=True)
    dev = EMABank(model, [0.9, 0.999], bema=True, bias_correction=True)
    assert host._blocks.is_pinned() and host._staging.is_pinned()
    assert dev.state_dict()["bank"].is_cuda
    gen = torch.Generator().manual_seed(22)
    for t in range(1, 21):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen).cuda() * 0.1)
            if t == 7:
                model.fc1.weight[0, 0] = float("nan")
        host.update()
        dev.update()
        if t == 7:
            with torch.no_grad():
                model.fc1.weight[0, 0] = 0.0
    assert host.num_skipped == dev.num_skipped == 1
    for v in host.variants:
        a, b = host.materialize(v, device="cpu"), dev.materialize(v, device="cpu")
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)  # CPU vs GPU lerp rounding
