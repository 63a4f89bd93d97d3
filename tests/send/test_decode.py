"""The decoding loop against independent computations: its candidate distributions equal Hugging Face's warpers,
its greedy rows equal ``model.generate``, and every sampled token is a candidate of the logits an unpadded forward
gives for its prefix."""

from __future__ import annotations

import pytest
import torch
from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from neurolight.lightning_modules.send.answer_lines import first_stop
from neurolight.lightning_modules.send.decode import Sampler, candidates, choose_tokens, decode
from tests.send.test_generation import make_data, make_generator

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize(
    "sampler", [Sampler(0.5, 0.99, 10), Sampler(0.7, 0.9, 0), Sampler(1.3, 0.5, 20), Sampler(0.5, 1.0, 10)]
)
def test_candidates__same_distribution_as_hugging_face_warpers(sampler):
    torch.manual_seed(0)
    logits = torch.randn(6, 300) * 3
    warped = TemperatureLogitsWarper(sampler.temperature)(None, logits.clone())
    if sampler.top_k:
        warped = TopKLogitsWarper(sampler.top_k)(None, warped)
    if sampler.top_p < 1:
        warped = TopPLogitsWarper(sampler.top_p)(None, warped)
    expected = warped.softmax(-1)
    ids, probs = candidates(logits, sampler)
    ours = torch.zeros_like(logits).scatter(1, ids, probs)
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-5)
    # And the draws follow it: 20,000 draws of one row, against its probabilities.
    torch.manual_seed(1)
    row = logits[:1].expand(20_000, -1)
    counts = torch.bincount(choose_tokens(row, sampler), minlength=300).float() / 20_000
    assert (counts - expected[0]).abs().max() < 0.015
    assert counts[expected[0] == 0].sum() == 0


def test_candidates__greedy_sampler_is_refused():
    with pytest.raises(ValueError, match="argmax"):
        candidates(torch.zeros(1, 5), Sampler())


@pytest.mark.parametrize("frequent_stops", [False, True], ids=["answer-lines", "rows-end-at-different-steps"])
def test_decode__greedy_rows_equal_generate_and_sampled_tokens_are_candidates(
    tiny_model_dir, truthfulqa_file, frequent_stops
):
    module = make_generator(tiny_model_dir, max_new_tokens=6)
    model, tok = module.model, module.tokenizer
    stops = module.stops
    if frequent_stops:  # a quarter of the vocabulary ends a row: rows end at different steps and leave the batch
        stops = stops._replace(eos=torch.arange(len(stops.eos)) % 4 == 1)
    dm = make_data(tiny_model_dir, truthfulqa_file, num_samples=3)
    dm.setup("predict")
    batch = next(iter(dm.predict_dataloader()))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert mask.min() == 0, "the test needs prompts of different lengths (left padding)"
    sampler = Sampler(0.8, 0.9, 3)
    batch_rows = []  # rows of every decoding step's forward
    handle = model.register_forward_pre_hook(lambda _, args, kwargs: batch_rows.append(len(kwargs["input_ids"])),
                                             with_kwargs=True)  # fmt: skip
    with torch.inference_mode():
        torch.manual_seed(0)
        out = decode(model, ids, mask, [Sampler(), sampler, sampler], 6, stops, tok.pad_token_id, 1.0, 1)
        handle.remove()
        reference = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id
        )[:, ids.shape[1] :]
    stop, stopped = first_stop(out.tokens, stops)
    if frequent_stops:
        assert 0 < stopped.sum() < 9 and min(batch_rows) < 9, "no row left the running batch"
    steps = out.tokens.shape[1]
    assert out.logprob.shape == out.energy.shape == (9, steps) and out.hidden.shape[:2] in {(9, steps), (9, steps + 1)}
    for q in range(3):
        prompt = ids[q][mask[q].bool()].tolist()
        for copy in range(3):
            row = 3 * q + copy
            n = int(stop[row]) + 1 if stopped[row] else steps  # tokens up to and including the stop token
            tokens = out.tokens[row, :n].tolist()
            if copy == 0:
                assert tokens == reference[q, :n].tolist()
            with torch.inference_mode():  # one unpadded sequence, no cache
                full = model(torch.tensor([prompt + tokens]), output_hidden_states=True)
            logits = full.logits[0, len(prompt) - 1 : len(prompt) - 1 + n]
            logprob = logits.log_softmax(-1).gather(1, torch.tensor(tokens)[:, None]).squeeze(1)
            torch.testing.assert_close(out.logprob[row, :n], logprob, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(out.energy[row, :n], -logits.logsumexp(-1), atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(
                out.hidden[row, :n],
                full.hidden_states[1][0, len(prompt) - 1 : len(prompt) - 1 + n],
                atol=1e-4,
                rtol=1e-4,
            )
            if copy > 0:
                cand_ids, cand_probs = candidates(logits, sampler)
                allowed = cand_ids.masked_fill(cand_probs == 0, -1)
                assert all(t in allowed[i].tolist() for i, t in enumerate(tokens)), "drew a token outside top-k/p"
            if stopped[row]:
                assert (out.tokens[row, n:] == tok.pad_token_id).all()  # padded after its stop token
