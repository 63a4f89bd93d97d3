import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from neurolight.datamodules.llm.hooked import HookedLLM, resolve_hook_point


def rms_norm(x, norm):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon) * norm.weight


def manual_layer(model, layer_id, hidden):
    """Attention output, MLP activation and MLP output of one decoder layer, from its weights."""
    layer = model.model.layers[layer_id]
    attn, mlp, cfg = layer.self_attn, layer.mlp, model.config
    batch, seq, _ = hidden.shape
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = cfg.hidden_size // heads
    x = rms_norm(hidden, layer.input_layernorm)
    q = F.linear(x, attn.q_proj.weight).view(batch, seq, heads, head_dim).transpose(1, 2)
    k = F.linear(x, attn.k_proj.weight).view(batch, seq, kv_heads, head_dim).transpose(1, 2)
    v = F.linear(x, attn.v_proj.weight).view(batch, seq, kv_heads, head_dim).transpose(1, 2)
    positions = torch.arange(seq).unsqueeze(0)
    cos, sin = model.model.rotary_emb(hidden, positions)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k = k.repeat_interleave(heads // kv_heads, dim=1)
    v = v.repeat_interleave(heads // kv_heads, dim=1)
    scores = q @ k.transpose(-1, -2) / head_dim**0.5
    scores = scores.masked_fill(torch.ones(seq, seq, dtype=torch.bool).triu(1), float("-inf"))
    attended = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, seq, -1)
    attn_out = F.linear(attended, attn.o_proj.weight)
    middle = hidden + attn_out
    y = rms_norm(middle, layer.post_attention_layernorm)
    mlp_act = F.silu(F.linear(y, mlp.gate_proj.weight)) * F.linear(y, mlp.up_proj.weight)
    mlp_out = F.linear(mlp_act, mlp.down_proj.weight)
    return {
        "resid_pre": hidden,
        "attn_sublayer": attn_out,
        "mlp_activations": mlp_act,
        "mlp_sublayer": mlp_out,
        "resid_post": middle + mlp_out,
        "next": middle + mlp_out,
    }


ALL_SITES = ["resid_pre", "attn_sublayer", "mlp_sublayer", "mlp_activations", "resid_post"]


@pytest.mark.parametrize("layer_type", ALL_SITES)
@pytest.mark.parametrize("layer_id", [0, 1])
def test_harvest__equals_manual_computation_from_weights(tiny_model, layer_type, layer_id):
    ids = torch.randint(3, tiny_model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # The residual entering layer 0 is the token embedding; each later one is the manual layer's output.
        hidden = F.embedding(ids, tiny_model.model.embed_tokens.weight)
        for earlier in range(layer_id):
            hidden = manual_layer(tiny_model, earlier, hidden)["next"]
        manual = manual_layer(tiny_model, layer_id, hidden)
        hf_hidden = tiny_model(ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(hidden, hf_hidden[layer_id], atol=1e-5, rtol=1e-4)
    hidden = hf_hidden
    if layer_id + 1 < len(hidden) - 1:  # the last entry is after the final norm
        torch.testing.assert_close(manual["next"], hidden[layer_id + 1], atol=1e-5, rtol=1e-4)
    harvested = HookedLLM(tiny_model, layer_type, layer_id).harvest(ids)
    torch.testing.assert_close(harvested, manual[layer_type], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("layer_type", ALL_SITES)
@pytest.mark.parametrize("layer_id", [0, 1])
def test_truncated_harvest__bit_identical_to_hooked_full_forward(tiny_model, layer_type, layer_id, attn_implementation):
    tiny_model.config._attn_implementation = attn_implementation  # eager needs an explicit causal mask
    try:
        hooked = HookedLLM(tiny_model, layer_type, layer_id)
        ids = torch.randint(3, tiny_model.config.vocab_size, (3, 11), generator=torch.Generator().manual_seed(3))
        assert hooked.truncated
        assert torch.equal(hooked.harvest(ids), hooked._harvest_hooked(ids, None))
    finally:
        tiny_model.config._attn_implementation = "sdpa"


def test_truncated_harvest__runs_no_hooks_and_no_full_model_forward(tiny_model):
    calls = []
    handles = [
        tiny_model.model.register_forward_pre_hook(lambda *a: calls.append("model")),
        tiny_model.model.layers[0].mlp.register_forward_hook(lambda *a: calls.append("mlp")),
    ]
    try:
        hooked = HookedLLM(tiny_model, "mlp_sublayer", 0)
        assert "model" in calls  # once at construction, to check the truncated forward against it
        calls.clear()
        hooked.harvest(torch.ones(1, 4, dtype=torch.long))
    finally:
        for handle in handles:
            handle.remove()
    assert calls == ["mlp"]


def test_custom_hook_point__falls_back_to_the_hooked_forward(tiny_model):
    with pytest.warns(UserWarning, match="custom hook point 'model.layers.1.mlp.act_fn'"):
        hooked = HookedLLM(tiny_model, "mlp_sublayer", 1, {"mlp_sublayer": "model.layers.{}.mlp.act_fn"})
    assert not hooked.truncated
    ids = torch.randint(3, tiny_model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(4))
    gate = tiny_model.model.layers[1].mlp.gate_proj
    handle = gate.register_forward_hook(lambda m, a, out: captured.append(out))
    captured = []
    try:
        harvested = hooked.harvest(ids)
    finally:
        handle.remove()
    torch.testing.assert_close(harvested, F.silu(captured[0]))


def test_compile__wraps_the_truncated_forward_with_fixed_shapes_and_copies_outputs(tiny_model, monkeypatch):
    seen = {}

    def fake_compile(fn, **kwargs):  # records the call; running inductor here would take half a minute
        seen.update(kwargs)
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    hooked = HookedLLM(tiny_model, "mlp_sublayer", 1, compile=True)
    # On CPU: inductor's settings go in as a config patch around the call (test_compile__freezes_the_weights_on_cpu).
    assert hooked.compiled and seen == {"dynamic": False, "mode": None}
    ids = torch.randint(3, tiny_model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(5))
    first = hooked.harvest(ids)
    assert torch.equal(first, hooked._harvest_hooked(ids, None))
    assert first.data_ptr() != hooked._forward_to_site(ids, None).data_ptr()
    assert not first.is_inference()  # an ordinary tensor: the buffer and the SAE may write into it
    seen.clear()
    HookedLLM(tiny_model, "mlp_sublayer", 1, compile=True, compile_mode="max-autotune-no-cudagraphs")
    assert seen == {"dynamic": False, "mode": "max-autotune-no-cudagraphs"}


def test_compile__inductor_freezing_on_cpu_gives_the_eager_activations(one_torch_thread):
    from tests.conftest import make_llama

    model = make_llama(64, num_layers=1, hidden=32, intermediate=64)  # small: inductor compiles it in seconds
    eager = HookedLLM(model, "mlp_activations", 0)
    compiled = HookedLLM(model, "mlp_activations", 0, compile=True)
    generator = torch.Generator().manual_seed(6)
    for _ in range(2):  # the second call replays the compiled graph
        ids = torch.randint(3, 64, (2, 8), generator=generator)
        torch.testing.assert_close(compiled.harvest(ids), eager.harvest(ids), atol=1e-5, rtol=1e-5)


def test_compile__freezes_the_weights_on_cpu(one_torch_thread):
    # Frozen: the compiled forward keeps the q, k, v products merged into one constant at its compilation, so a
    # later change of q_proj's weight does not reach it, where the eager forward sees it. Freezing asked for through
    # torch.compile's options would leave the weights as inputs, and this would fail.
    from tests.conftest import make_llama

    model = make_llama(64, num_layers=1, hidden=32, intermediate=64)
    compiled = HookedLLM(model, "mlp_sublayer", 0, compile=True)
    ids = torch.randint(3, 64, (2, 8), generator=torch.Generator().manual_seed(6))
    before = compiled.harvest(ids)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.mul_(2)
    torch.testing.assert_close(compiled.harvest(ids), before, atol=0, rtol=0)
    assert not torch.allclose(HookedLLM(model, "mlp_sublayer", 0).harvest(ids), before)


def test_harvest__does_not_run_layers_after_the_hook(tiny_model):
    calls = []
    handle = tiny_model.model.layers[1].register_forward_hook(lambda *a: calls.append(1))
    try:
        HookedLLM(tiny_model, "mlp_sublayer", 0).harvest(torch.ones(1, 4, dtype=torch.long))
    finally:
        handle.remove()
    assert calls == []
    assert not tiny_model.model.layers[0].mlp.down_proj._forward_pre_hooks


def test_d_in__matches_site_width(tiny_model):
    assert HookedLLM(tiny_model, "mlp_activations", 1).d_in == tiny_model.config.intermediate_size
    assert HookedLLM(tiny_model, "attn_sublayer", 1).d_in == tiny_model.config.hidden_size


def test_splice_metrics__identity_recovers_everything_and_zero_ablation_matches(tiny_model):
    ids = torch.randint(3, tiny_model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(1))
    hooked = HookedLLM(tiny_model, "mlp_sublayer", 0)
    metrics = hooked.splice_metrics(ids, lambda a: a)
    torch.testing.assert_close(metrics["ce_spliced"], metrics["ce_clean"])
    assert metrics["kl"].abs() < 1e-6
    torch.testing.assert_close(metrics["ce_loss_recovered"], torch.tensor(1.0))
    zeroed = hooked.splice_metrics(ids, torch.zeros_like)
    torch.testing.assert_close(zeroed["ce_spliced"], zeroed["ce_zero"])
    # Zero ablation by hand: the MLP output of layer 0 replaced by zeros.
    handle = tiny_model.model.layers[0].mlp.register_forward_hook(lambda m, a, out: torch.zeros_like(out))
    try:
        with torch.no_grad():
            logits = tiny_model(ids).logits[:, :-1]
    finally:
        handle.remove()
    expected = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(zeroed["ce_zero"], expected)


def test_splice_metrics__skip_first_position_keeps_position_zero_clean(tiny_model):
    ids = torch.randint(3, tiny_model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(2))
    hooked = HookedLLM(tiny_model, "attn_sublayer", 1)
    seen = []
    hooked.splice_metrics(ids, lambda a: seen.append(a.shape) or a, skip_first_position=True)
    assert seen[0] == (1, 5, tiny_model.config.hidden_size)


def test_bad_hook_points__name_the_fix(tiny_model):
    with pytest.raises(ValueError, match=r"2 layers \(0-1\)"):
        resolve_hook_point(tiny_model, "mlp_sublayer", 5)
    with pytest.raises(ValueError, match="attn_sublayer, mlp_sublayer, mlp_activations"):
        resolve_hook_point(tiny_model, "residual", 0)
    with pytest.raises(ValueError, match=r"closest module paths: model\.layers\.0\.mlp"):
        resolve_hook_point(tiny_model, "mlp_sublayer", 0, {"mlp_sublayer": "model.layers.{}.mlpp"})


@pytest.mark.parametrize("layer_type", ["resid_pre", "resid_post"])
def test_residual_sites__splice_replaces_the_layer_input_or_output(tiny_model, layer_type):
    ids = torch.randint(3, tiny_model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(6))
    hooked = HookedLLM(tiny_model, layer_type, 1)
    assert hooked.truncated and hooked.d_in == tiny_model.config.hidden_size
    metrics = hooked.splice_metrics(ids, lambda a: a)
    torch.testing.assert_close(metrics["ce_spliced"], metrics["ce_clean"])
    assert metrics["kl"].abs() < 1e-6
    # Halving the residual by hand, at the layer's input (pre-hook) or output (hook), gives the spliced logits.
    layer = tiny_model.model.layers[1]
    if layer_type == "resid_pre":
        handle = layer.register_forward_pre_hook(lambda m, args: (args[0] * 0.5, *args[1:]))
    else:
        handle = layer.register_forward_hook(lambda m, a, out: out * 0.5 if torch.is_tensor(out) else (out[0] * 0.5,))
    try:
        with torch.no_grad():
            expected = tiny_model(ids).logits
    finally:
        handle.remove()
    torch.testing.assert_close(hooked.logits_with(ids, lambda a: a * 0.5), expected)


def test_template_override_naming_another_site__refused_with_the_real_site(tiny_model):
    with pytest.raises(
        ValueError, match=r"names the resid_post site's module 'model.layers.1'; set layer_type: resid_post"
    ):
        resolve_hook_point(tiny_model, "mlp_sublayer", 1, {"mlp_sublayer": "model.layers.{}"})
