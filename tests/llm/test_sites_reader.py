"""Several sites from one truncated forward (``truncated.forward_to_sites``, ``capture.SitesReader``): every site
equals the hooked full forward's value bit for bit, in any order and mix of layers, nothing after the deepest site
runs, and the compiled reader gives the eager activations."""

from __future__ import annotations

import pytest
import torch

from neurolight.datamodules.llm.capture import SitesReader, capture_sites
from neurolight.datamodules.llm.hooked import LAYER_TYPES, resolve_hook_point
from neurolight.datamodules.llm.truncated import causal_mask, forward_to_sites
from tests.llm.test_hooked_llm import manual_layer

ALL = [(layer_type, layer_id) for layer_id in (0, 1) for layer_type in LAYER_TYPES]
MIXES = [
    ALL,
    ALL[::-1],
    [("mlp_activations", 1), ("resid_pre", 0)],
    [("attn_sublayer", 1)],
    [("resid_pre", 1), ("resid_post", 0)],
    [("mlp_sublayer", 0), ("mlp_activations", 0), ("resid_post", 1)],
]


def hooks(model, sites):
    return [resolve_hook_point(model, layer_type, layer_id) for layer_type, layer_id in sites]


def ids_for(model, seed=5):
    return torch.randint(3, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("sites", MIXES, ids=lambda sites: "+".join(f"{t}{i}" for t, i in sites))
def test_forward_to_sites__each_site_equals_the_hooked_forward_bit_for_bit(tiny_model, sites):
    ids = ids_for(tiny_model)
    with torch.no_grad():
        fast = forward_to_sites(tiny_model, sites, ids, causal_mask(tiny_model, ids))
    reference = capture_sites(tiny_model, hooks(tiny_model, sites), ids)
    for site, a, b in zip(sites, fast, reference):
        assert torch.equal(a, b), site


def test_forward_to_sites__layer_0_matches_the_layer_computed_from_its_weights(tiny_model):
    ids = ids_for(tiny_model)
    sites = [(layer_type, 0) for layer_type in LAYER_TYPES]
    with torch.no_grad():
        read = dict(zip(LAYER_TYPES, forward_to_sites(tiny_model, sites, ids, causal_mask(tiny_model, ids))))
        expected = manual_layer(tiny_model, 0, tiny_model.model.embed_tokens(ids))
    for layer_type in LAYER_TYPES:
        torch.testing.assert_close(read[layer_type], expected[layer_type], rtol=1e-4, atol=1e-5, msg=layer_type)


def test_reader__runs_nothing_after_the_deepest_site(tiny_model):
    ran = []
    layer = tiny_model.model.layers[1]
    watched = {"layer1": layer, "mlp1": layer.mlp, "down1": layer.mlp.down_proj}
    handles = [module.register_forward_hook(lambda *_, name=name: ran.append(name)) for name, module in watched.items()]
    try:
        for sites, expected in (([("resid_post", 0), ("mlp_sublayer", 0)], []),
                                ([("attn_sublayer", 1)], []),
                                ([("mlp_activations", 1), ("resid_pre", 0)], [])):  # fmt: skip
            ran.clear()
            reader = SitesReader(tiny_model, sites, hooks(tiny_model, sites))
            assert reader.truncated
            ran.clear()  # the construction's probe ran the hooked forward too
            reader.read(ids_for(tiny_model))
            assert ran == expected, sites
    finally:
        for handle in handles:
            handle.remove()


def test_reader__compiled_with_fixed_shapes_and_its_outputs_copied(tiny_model, monkeypatch):
    seen = {}

    def fake_compile(fn, **kwargs):  # records the call; inductor itself runs in the next test
        seen.update(kwargs)
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    reader = SitesReader(tiny_model, ALL, hooks(tiny_model, ALL), compile=True)
    assert reader.compiled and seen == {"dynamic": False, "mode": None}
    ids = ids_for(tiny_model)
    read = reader.read(ids)
    for site, a, b in zip(ALL, read, capture_sites(tiny_model, hooks(tiny_model, ALL), ids)):
        assert torch.equal(a, b) and not a.is_inference(), site  # ordinary tensors the buffer may write into


def test_reader__inductor_freezing_on_cpu_gives_the_eager_activations(one_torch_thread):
    from tests.conftest import make_llama

    model = make_llama(64, num_layers=1, hidden=32, intermediate=64)  # small: inductor compiles it in seconds
    sites = [("attn_sublayer", 0), ("mlp_activations", 0), ("resid_post", 0)]
    eager = SitesReader(model, sites, hooks(model, sites))
    compiled = SitesReader(model, sites, hooks(model, sites), compile=True)
    generator = torch.Generator().manual_seed(6)
    for _ in range(2):  # the second call replays the compiled graph
        ids = torch.randint(3, 64, (2, 8), generator=generator)
        for a, b in zip(compiled.read(ids), eager.read(ids)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
