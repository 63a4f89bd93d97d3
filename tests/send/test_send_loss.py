"""SendModule.loss: the LM head on the answer tokens only gives Hugging Face's causal-LM loss and its gradients."""

from __future__ import annotations

import pytest
import torch

from neurolight.lightning_modules.send.module import logits_are_head_of_hidden
from tests.helpers.send import make_datamodule, make_module, write_records


@pytest.fixture(scope="module")
def records_path(tmp_path_factory):
    return write_records(tmp_path_factory.mktemp("send_loss") / "records.jsonl")


def test_loss_and_gradients_equal_hugging_faces(tiny_model_dir, records_path, tmp_path):
    module = make_module(tiny_model_dir, tmp_path, freeze_layers=1)
    module.configure_model()
    assert module.head_on_labels_only
    datamodule = make_datamodule(tiny_model_dir, records_path)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    assert (batch["attention_mask"] == 0).any() and (batch["labels"] == -100).float().mean() > 0.5
    params = [p for p in module.model.parameters() if p.requires_grad]

    ours = module.loss(batch)
    ours_grads = torch.autograd.grad(ours, params)
    reference = module.model(**batch).loss  # Hugging Face: logits at every position, shifted labels inside
    reference_grads = torch.autograd.grad(reference, params)
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)
    for got, expected in zip(ours_grads, reference_grads):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


def test_a_soft_capped_head_keeps_hugging_faces_forward():
    from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    shapes = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    gemma = Gemma2ForCausalLM(Gemma2Config(**shapes, num_key_value_heads=2, head_dim=8, final_logit_softcapping=30.0))
    assert not logits_are_head_of_hidden(gemma)
    assert logits_are_head_of_hidden(LlamaForCausalLM(LlamaConfig(**shapes, num_key_value_heads=2)))
