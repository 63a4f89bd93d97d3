"""StochasticRoundingAdamW against float32 AdamW: unbiased rounding, float32 parity, small bf16 updates kept."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch

from neurolight.lightning_modules.send.stochastic_rounding import (
    StochasticRoundingAdamW,
    random_bits,
    stochastic_round_,
    stream_key,
)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_round__lands_on_the_two_neighbours_with_the_mean_of_the_value(dtype):
    base = torch.tensor([1.0, -1.0, 0.05, -300.0], dtype=dtype)
    outward = torch.nextafter(base, torch.sign(base) * torch.full_like(base, float("inf")))
    spacing = (outward.float() - base.float()).abs()
    fraction = torch.tensor([0.3, 0.7, 0.1, 0.5])
    value = base.float() + torch.sign(base.float()) * fraction * spacing  # between base and its outward neighbour
    n = 200_000
    out = torch.empty(n, 4, dtype=dtype)
    bits = random_bits(torch.tensor(stream_key(0, 1, 2)), 0, 4 * n).reshape(n, 4) & 0xFFFF
    stochastic_round_(out, value.expand(n, 4).contiguous(), bits)
    up = (out.float() - base.float()).abs() > 0
    assert torch.all((out.float() - base.float()).abs()[up] == spacing.expand(n, 4)[up])  # only the two neighbours
    # The farther neighbour is taken with probability `fraction`: 5 standard errors of a binomial proportion.
    assert torch.all((up.float().mean(0) - fraction).abs() < 5 * (fraction * (1 - fraction) / n).sqrt())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_round__keeps_representable_values_and_zero_exactly(dtype):
    exact = torch.tensor([0.0, -0.0, 1.0, -2.5, 0.046875, 1024.0], dtype=dtype)
    out = torch.empty_like(exact).fill_(7)
    for seed in range(20):
        bits = random_bits(torch.tensor(stream_key(seed, 1, 0)), 0, exact.numel()) >> 16
        stochastic_round_(out, exact.float(), bits)
        assert torch.equal(out, exact)


def _problem(seed: int = 0, n: int = 4096, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    weights = (0.05 + 0.01 * torch.randn(n, generator=generator)).to(dtype)
    targets = torch.randn(n, generator=generator)
    return torch.nn.Parameter(weights), targets


def _train(optimizer, param, targets, steps, grad=None):
    for step in range(steps):
        optimizer.zero_grad()
        if grad is None:  # a quadratic loss pulling each weight to its target
            param.grad = (param.float() - targets).to(param.dtype)
        else:
            param.grad = grad(step).to(param.dtype)
        optimizer.step()


def test_float32_weights__step_equals_torch_adamw():
    settings = {"lr": 1e-2, "betas": (0.8, 0.99), "weight_decay": 0.1, "eps": 1e-8}
    ours, targets = _problem()
    reference = copy.deepcopy(ours)
    optim_ours = StochasticRoundingAdamW([ours], **settings)
    optim_ref = torch.optim.AdamW([reference], foreach=False, **settings)
    _train(optim_ours, ours, targets, 30)
    _train(optim_ref, reference, targets, 30)
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-7)
    for key in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(optim_ours.state[ours][key], optim_ref.state[reference][key], rtol=1e-6, atol=1e-7)
    assert optim_ours.state[ours]["step"].item() == 30


def test_bf16_weights__updates_below_the_spacing_accumulate_like_float32_where_round_to_nearest_loses_them():
    # lr 1e-5 with a constant-sign gradient moves each weight ~1e-5 per step: 1/24 of bfloat16's spacing at 0.05.
    settings = {"lr": 1e-5, "betas": (0.9, 0.999), "weight_decay": 0.0}
    steps = 300
    start, _ = _problem()

    def constant_grad(_step):
        return torch.ones(start.numel())

    moved = {}
    for name, dtype, make in [
        ("float32", torch.float32, lambda p: torch.optim.AdamW([p], **settings)),
        ("nearest", torch.bfloat16, lambda p: torch.optim.AdamW([p], **settings)),
        ("stochastic", torch.bfloat16, lambda p: StochasticRoundingAdamW([p], **settings)),
    ]:
        param = torch.nn.Parameter(start.detach().clone().to(dtype))
        _train(make(param), param, None, steps, grad=constant_grad)
        moved[name] = (start.detach().to(dtype).float() - param.detach().float()).mean().item()
    assert moved["float32"] == pytest.approx(steps * 1e-5, rel=1e-3)
    assert abs(moved["nearest"]) < 0.05 * moved["float32"]  # bfloat16 with round-to-nearest: the updates are lost
    # Stochastic rounding: the mean over 4096 weights within 2% of float32 (each weight's error is ~1 spacing).
    assert moved["stochastic"] == pytest.approx(moved["float32"], rel=0.02)


def test_bf16_second_moment__decays_like_float32_after_the_gradients_shrink():
    # Large gradients for 200 steps, then 10x smaller: the float32 second moment decays by 0.999 per step.
    n = 4096
    noise = torch.randn(400, n, generator=torch.Generator().manual_seed(1))

    def shrinking(step):
        return noise[step] * (1.0 if step < 200 else 0.1)

    second = {}
    for name, dtype, cls in [
        ("float32", torch.float32, torch.optim.AdamW),
        ("nearest", torch.bfloat16, torch.optim.AdamW),
        ("stochastic", torch.bfloat16, StochasticRoundingAdamW),
    ]:
        param = torch.nn.Parameter(torch.zeros(n, dtype=dtype))
        optimizer = cls([param], lr=1e-6, weight_decay=0.0)
        _train(optimizer, param, None, 400, grad=shrinking)
        second[name] = optimizer.state[param]["exp_avg_sq"].float().mean().item()
    # Round-to-nearest cannot take 0.1% steps down: it stays near its value at step 200 (float32 decays 18% more).
    assert second["nearest"] > 1.2 * second["float32"]
    assert second["stochastic"] == pytest.approx(second["float32"], rel=0.02)


def test_rounding__is_the_same_for_the_same_seed_and_continues_alike_after_a_state_dict_round_trip():
    settings = {"lr": 1e-4, "weight_decay": 0.01, "seed": 7}
    start, targets = _problem(dtype=torch.bfloat16)

    def run(steps, param, optimizer):
        _train(optimizer, param, targets, steps)
        return param

    # Two replicas (DDP ranks) from the same state take bit-identical steps.
    a, b = (torch.nn.Parameter(start.detach().clone()) for _ in range(2))
    run(20, a, StochasticRoundingAdamW([a], **settings))
    run(20, b, StochasticRoundingAdamW([b], **settings))
    assert torch.equal(a, b)
    # 10 steps, save, reload into a fresh optimizer, 10 more: the uninterrupted 20 steps exactly.
    c = torch.nn.Parameter(start.detach().clone())
    first = StochasticRoundingAdamW([c], **settings)
    run(10, c, first)
    resumed = StochasticRoundingAdamW([c], **settings)
    resumed.load_state_dict(copy.deepcopy(first.state_dict()))
    run(10, c, resumed)
    assert torch.equal(c, a)
    # Another seed rounds differently.
    d = torch.nn.Parameter(start.detach().clone())
    run(20, d, StochasticRoundingAdamW([d], **{**settings, "seed": 8}))
    assert not torch.equal(d, a)


def test_chunked_update__equals_the_update_of_the_whole_tensor(monkeypatch):
    import neurolight.lightning_modules.send.stochastic_rounding as module

    start, targets = _problem(n=1000)
    whole = torch.nn.Parameter(start.detach().clone())
    _train(StochasticRoundingAdamW([whole], lr=1e-2), whole, targets, 5)
    monkeypatch.setattr(module, "_CHUNK_EAGER", 64)
    chunked = torch.nn.Parameter(start.detach().clone())
    _train(StochasticRoundingAdamW([chunked], lr=1e-2), chunked, targets, 5)
    assert torch.equal(whole, chunked)


def test_bad_settings__are_refused_with_the_value():
    param = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match=r"betas=\(0.9, 1.0\)"):
        StochasticRoundingAdamW([param], betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="lr=-1"):
        StochasticRoundingAdamW([param], lr=-1)


def test_send_bf16_true__small_adamw_steps_reach_the_weights_as_in_float32(tiny_model_dir, records_path, tmp_path):
    from tests.helpers.send import fit, make_datamodule, make_module

    # lr 1e-5 is ~1/12 of bfloat16's spacing at the tiny Llama's weight scale (std 0.02).
    changes, optimizers = {}, {}
    for name, precision, rounding in [
        ("float32", "32-true", True),
        ("stochastic", "bf16-true", True),
        ("nearest", "bf16-true", False),
    ]:
        module = make_module(
            tiny_model_dir, tmp_path, learning_rate=1e-5, weight_decay=0.0, stochastic_rounding=rounding
        )
        before = {}
        snapshot = pl.callbacks.LambdaCallback(  # the weights as training starts, in the training dtype
            on_train_start=lambda _trainer, m, before=before: before.update(
                {k: v.detach().float().clone() for k, v in m.model.named_parameters() if "mlp" in k}
            )
        )
        trainer = fit(module, make_datamodule(tiny_model_dir, records_path), tmp_path, [snapshot], max_epochs=2,
                      precision=precision)  # fmt: skip
        optimizers[name] = type(trainer.optimizers[0]).__name__
        after = dict(module.model.named_parameters())
        changes[name] = torch.cat([(after[k].detach().float() - before[k]).reshape(-1) for k in before])
    assert optimizers == {"float32": "AdamW", "stochastic": "StochasticRoundingAdamW", "nearest": "AdamW"}
    direction = torch.sign(changes["float32"])
    scale = changes["float32"].abs().sum()
    progress = {name: (change * direction).sum().item() / scale.item() for name, change in changes.items()}
    # Progress along float32's steps: stochastic rounding makes it (1.01 measured), rounding to nearest loses most.
    assert progress["stochastic"] == pytest.approx(1.0, abs=0.15)
    assert progress["nearest"] < 0.3


def test_random_bits__uniform_16_bit_halves_that_differ_between_steps_and_parameters():
    words = random_bits(torch.tensor(stream_key(0, 1, 0)), 0, 1 << 16)
    assert words.min() >= 0 and words.max() < 1 << 32
    for half in (words & 0xFFFF, words >> 16):  # each 16-bit half: mean and spread of a uniform on [0, 2^16)
        assert half.double().mean().item() / 2**16 == pytest.approx(0.5, abs=0.005)
        assert half.double().std().item() / 2**16 == pytest.approx(12**-0.5, abs=0.005)
    others = [random_bits(torch.tensor(stream_key(*k)), 0, 1 << 16) for k in [(0, 2, 0), (0, 1, 1), (1, 1, 0)]]
    for other in others:  # another step, parameter or seed: uncorrelated words
        assert (other == words).float().mean() < 1e-3
        assert abs(torch.corrcoef(torch.stack([other, words]).double())[0, 1].item()) < 0.02


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_compiled_step__equals_the_eager_step(dtype):
    start, targets = _problem(n=3000, dtype=dtype)
    params = {}
    for compiled in (False, True):
        param = torch.nn.Parameter(start.detach().clone())
        _train(StochasticRoundingAdamW([param], lr=1e-3, compile=compiled), param, targets, 4)
        params[compiled] = param.detach()
    torch.testing.assert_close(params[True], params[False], rtol=2e-6, atol=0)


def test_compile_policy__fused_on_cuda_and_for_large_cpu_models_eager_for_small_ones():
    param = torch.nn.Parameter(torch.zeros(3))
    auto = StochasticRoundingAdamW([param])
    assert auto._fused(torch.device("cuda", 0), 10) and auto._fused(torch.device("cpu"), 1 << 22)
    assert not auto._fused(torch.device("cpu"), (1 << 22) - 1)
    assert not StochasticRoundingAdamW([param], compile=False)._fused(torch.device("cuda", 0), 1 << 30)


def test_failed_compilation__warns_why_and_steps_eagerly_with_the_same_result(monkeypatch):
    start, targets = _problem(n=500, dtype=torch.bfloat16)
    eager = torch.nn.Parameter(start.detach().clone())
    _train(StochasticRoundingAdamW([eager], lr=1e-3, compile=False), eager, targets, 3)

    def broken(*_args):
        raise RuntimeError("InductorError: no working C++ compiler found\nmore detail")

    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: broken)
    param = torch.nn.Parameter(start.detach().clone())
    optimizer = StochasticRoundingAdamW([param], lr=1e-3, compile=True)
    with pytest.warns(UserWarning, match="compile of the step failed .RuntimeError: InductorError: no working C"):
        _train(optimizer, param, targets, 3)
    assert optimizer.compile is False and torch.equal(param, eager)
