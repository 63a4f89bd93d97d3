"""The sublayer sites read what enters the residual stream, in the Llama layout and in Gemma-2's, whose layers
normalise each sublayer's output before the residual add: on both, resid_pre + attn_sublayer + mlp_sublayer equals
resid_post of the same layer (docs/sae.md, Sites)."""

from __future__ import annotations

import pytest
import torch

from neurolight.datamodules.llm.hooked import HOOK_POINTS, HookedLLM, model_hook_points, resolve_hook_point
from tests.conftest import make_llama

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_gemma2():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=64, attn_implementation="eager",
    )  # fmt: skip
    model = Gemma2ForCausalLM(config).eval()
    with torch.no_grad():  # random norm weights, so that a missed norm shows (Gemma's start at 0, i.e. scale 1)
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_sublayer_sites__add_up_to_the_layer_output(family):
    model = make_llama(100, num_layers=2) if family == "llama" else make_gemma2()
    ids = torch.randint(3, 100, (2, 8), generator=torch.Generator().manual_seed(1))
    read = {site: HookedLLM(model, site, 1).harvest(ids) for site in ("resid_pre", "attn_sublayer", "mlp_sublayer")}
    resid_post = HookedLLM(model, "resid_post", 1).harvest(ids)
    torch.testing.assert_close(read["resid_pre"] + read["attn_sublayer"] + read["mlp_sublayer"], resid_post)


def test_gemma2_sites_default_to_the_output_norms_and_keep_explicit_templates():
    model = make_gemma2()
    assert model_hook_points(make_llama(100, num_layers=2)) is HOOK_POINTS
    # The data modules pass the Llama defaults along: they mean the site, wherever this layout has it.
    point = resolve_hook_point(model, "mlp_sublayer", 1, dict(HOOK_POINTS))
    assert point.name == "model.layers.1.post_feedforward_layernorm" and not point.reads_input
    assert resolve_hook_point(model, "attn_sublayer", 0).name == "model.layers.0.post_attention_layernorm"
    assert resolve_hook_point(model, "mlp_activations", 1).name == "model.layers.1.mlp.down_proj"
    # A template of the user's own still wins (here the MLP's normalised input).
    own = {"mlp_sublayer": "model.layers.{}.pre_feedforward_layernorm"}
    assert resolve_hook_point(model, "mlp_sublayer", 1, own).name == "model.layers.1.pre_feedforward_layernorm"
    assert not HookedLLM(model, "mlp_sublayer", 1).truncated  # the truncated forward runs Llama's layout only
