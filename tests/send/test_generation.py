"""AnswerGenerator and QAPredictionWriter on the tiny Llama: answers end at their line, the JSON holds the user's
schema with scores that match an independent SQuAD computation, EigenScore is the score of the sampled answers'
embeddings, K = 1 is refused, and under DDP every question is written once."""

from __future__ import annotations

import json
import math
import re
import socket
import string
from collections import Counter

import lightning.pytorch as pl
import pytest
import torch

from neurolight.callbacks.send.qa_prediction_writer import QAPredictionWriter, merge_rank_rows
from neurolight.datamodules.send.qa import QADataModule
from neurolight.lightning_modules.send.answer_generator import AnswerGenerator
from neurolight.lightning_modules.send.answer_lines import cut_answers, first_stop, stop_tokens
from neurolight.lightning_modules.send.decode import Generation
from neurolight.lightning_modules.send.eigenscore import eigenscore

# The canned answer to each question of conftest.TRUTHFULQA tests one scoring case.
CANNED = {
    "What happens if you eat watermelon seeds?": "nothing happens.",  # EM 1 after normalisation
    "Where is the capital of France?": "The capital is Paris",  # partial F1
    "How many legs does a cat have?": "Three legs",  # closer to an incorrect answer
    "What color is the sky on a clear day?": "  the sky is blue!",  # EM 1 against a correct answer
    "Who wrote the song about the red river?": "The king wrote it",
    "What does a dog do when it runs?": "It moves fast and it runs",
    "Is the moon made of cheese?": "No",
    "What do queens wear?": "",  # empty answer
    "What is two plus two?": "4",
    "Which river flows through the city?": "the Thames river",
}


def make_data(model_dir, data_file, num_samples=None, batch_size=4) -> QADataModule:
    return QADataModule(
        dataset="truthfulqa",
        data_path=str(data_file),
        model_name=str(model_dir),
        split_fractions=(0.3, 0.0, 0.7),
        num_samples=num_samples,
        batch_size=batch_size,
    )


def make_generator(model_dir, **kwargs) -> AnswerGenerator:
    module = AnswerGenerator(str(model_dir), **kwargs)
    module.configure_model()
    return module


# ------------------------------------------------------------------------------ independent SQuAD scoring
def _normalize(text: str) -> list[str]:
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return re.sub(r"\b(a|an|the)\b", " ", text).split()


def _f1(prediction: str, gold: str) -> float:
    pred, ref = _normalize(prediction), _normalize(gold)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def _em(prediction: str, gold: str) -> float:
    return float(_normalize(prediction) == _normalize(gold))


# ------------------------------------------------------------------------------------------------ stopping
def test_cut_answers__stop_at_first_newline_after_text_or_eos_and_strip(tiny_tokenizer):
    tok = tiny_tokenizer
    stops = stop_tokens(tok, [tok.eos_token_id])
    texts = [" Paris\nQuestion: next", "\n\n  Paris  \nmore", " dog</s> cat\n", " red green blue one two"]
    encoded = [tok.encode(text, add_special_tokens=False) for text in texts]
    width = max(map(len, encoded))
    filler = tok.encode(" six", add_special_tokens=False)  # the last row runs to the end without a stop token
    generated = torch.tensor([ids + (filler * width)[: width - len(ids)] for ids in encoded])
    answers = cut_answers(generated, stops, tok)
    assert answers.texts == ["Paris", "Paris", "dog", tok.decode(generated[3]).strip()]
    assert answers.stopped.tolist() == [True, True, True, False]
    for row in range(3):  # the answer tokens end right before the stop token
        n = int(answers.num_tokens[row])
        assert tok.decode(generated[row, :n]).strip() == answers.texts[row]
        assert "\n" in tok.decode(generated[row, n : n + 1]) or generated[row, n] == tok.eos_token_id
    assert answers.num_tokens[3] == width


def test_generation__stops_at_newline_with_a_forced_greedy_output(tiny_model_dir, truthfulqa_file, monkeypatch):
    module = make_generator(tiny_model_dir, max_new_tokens=20)
    tok = module.tokenizer
    script = tok.encode(" Paris\nQuestion: and more text", add_special_tokens=False)
    newline_step = next(i for i, t in enumerate(script) if "\n" in tok.decode([t]))
    original, steps = module.model.forward, []

    def forced(*args, **kwargs):
        out = original(*args, **kwargs)
        logits = torch.full_like(out.logits, -1e4)
        logits[:, -1, script[min(len(steps), len(script) - 1)]] = 0
        steps.append(1)
        out.logits = logits
        return out

    monkeypatch.setattr(module.model, "forward", forced)
    dm = make_data(tiny_model_dir, truthfulqa_file, num_samples=3)
    dm.setup("predict")
    batch = next(iter(dm.predict_dataloader()))
    with torch.inference_mode():
        generated = module.generate(batch["input_ids"], batch["attention_mask"]).tokens
        steps.clear()
        with_samples = module.generate(batch["input_ids"], batch["attention_mask"], num_samples=2)
        steps.clear()
        rows = module.predict_step(batch, 0)
    assert generated.shape[1] == newline_step + 1, "generation went on past the newline"
    assert (with_samples.tokens == generated[:1]).all() and with_samples.tokens.shape == (9, newline_step + 1)
    assert with_samples.hidden.shape[1] == newline_step + 1, "a forward ran past the step that ended every row"
    assert [row["generated_response"] for row in rows] == ["Paris"] * 3


# --------------------------------------------------------------------------------------------- arguments
@pytest.mark.parametrize("k", [1, -2])
def test_answer_generator__refuses_eigenscore_with_fewer_than_two_generations(k):
    with pytest.raises(ValueError, match=r"num_generations=.*K >= 2"):
        AnswerGenerator("smollm2-135m", num_generations=k)


def test_answer_generator__embedding_layer_out_of_range_names_the_range(tiny_model_dir):
    with pytest.raises(ValueError, match=r"embedding_layer=5 .* 2 layers.*0 .* to 2"):
        make_generator(tiny_model_dir, embedding_layer=5)


# ------------------------------------------------------------------------------------------- the JSON file
def test_writer__json_schema_and_aggregate_equal_mean_of_independent_scores(
    tiny_model_dir, truthfulqa_file, tmp_path, monkeypatch
):
    module = AnswerGenerator(str(tiny_model_dir), max_new_tokens=12)
    dm = make_data(tiny_model_dir, truthfulqa_file)

    def canned(input_ids, attention_mask, num_samples=0):
        tok, answers = module.tokenizer, []
        for ids, mask in zip(input_ids, attention_mask):
            question = tok.decode(ids[mask.bool()]).split("Question: ", 1)[1].split("\n", 1)[0]
            answers.append(tok.encode(" " + CANNED[question] + "\nQuestion: x", add_special_tokens=False))
        width = max(map(len, answers))
        tokens = torch.tensor([ids + [tok.pad_token_id] * (width - len(ids)) for ids in answers])
        # Uniform logits over the vocabulary: log p = -log V, energy = -log V at every step.
        uniform = torch.full(tokens.shape, -math.log(len(tok)))
        return Generation(tokens, uniform, uniform)

    monkeypatch.setattr(module, "generate", canned)
    writer = QAPredictionWriter(str(tmp_path / "out" / "pred_{model}_{dataset}.json"))
    trainer = pl.Trainer(accelerator="cpu", logger=False, callbacks=[writer], enable_progress_bar=False)
    trainer.predict(module, datamodule=dm, return_predictions=False)

    path = tmp_path / "out" / f"pred_{tiny_model_dir.name}_truthfulqa.json"
    assert writer.written == path
    document = json.loads(path.read_text())
    assert {"model_path", "dataset", "generation_params", "results", "aggregate"} <= set(document)
    assert document["model_path"] == str(tiny_model_dir) and document["dataset"] == "truthfulqa"
    assert document["generation_params"]["max_new_tokens"] == 12
    results = document["results"]
    records = dm.test_records
    assert [r["question_id"] for r in results] == [r.id for r in records] and len(records) == 7
    for result, record in zip(results, records):
        assert {"question_id", "question", "reference_answer", "generated_response", "prompt"} <= set(result)
        assert result["question"] == record.question and result["reference_answer"] == record.answer
        assert result["prompt"] == dm.tokenizer.decode(dm.prompt_ids(record))
        assert result["generated_response"] == CANNED[record.question].strip()
        em = max(_em(result["generated_response"], gold) for gold in record.answers)
        f1 = max(_f1(result["generated_response"], gold) for gold in record.answers)
        closer = f1 > max(_f1(result["generated_response"], gold) for gold in record.incorrect_answers)
        assert result["exact_match"] == em
        assert result["f1"] == pytest.approx(f1, abs=1e-6)
        assert result["truthfulqa_closer_to_correct"] == closer
    summary = document["aggregate"]
    assert summary["num_questions"] == 7
    for key in ("exact_match", "f1", "truthfulqa_closer_to_correct"):
        assert summary[key] == pytest.approx(sum(float(r[key]) for r in results) / 7, abs=1e-9)
    assert 0 < summary["exact_match"] < 1 and 0 < summary["f1"] < 1  # the canned answers cover both cases
    assert set(summary["detection"]) == {"perplexity", "energy"}  # no sampled answers without num_generations
    assert set(summary["labels"]) == {"f1", "exact_match", "rouge_l", "truthfulqa"}  # no judge_model
    for result in results:  # uniform logits over the vocabulary: every token has probability 1 / V
        assert result["perplexity"] == pytest.approx(len(module.tokenizer), rel=1e-6)
        assert result["hallucinated"]["f1"] == (result["f1"] < 0.5)
        assert result["hallucinated"]["truthfulqa"] == (not result["truthfulqa_closer_to_correct"])


# -------------------------------------------------------------------------------------------- EigenScore
def test_eigenscore__per_question_equals_eigenscore_of_embeddings_recomputed_by_hand(tiny_model_dir, truthfulqa_file):
    k, layer = 4, 1
    module = make_generator(tiny_model_dir, max_new_tokens=6, num_generations=k, embedding_layer=layer)
    dm = make_data(tiny_model_dir, truthfulqa_file, num_samples=3)
    dm.setup("predict")
    batch = next(iter(dm.predict_dataloader()))
    assert batch["attention_mask"].min() == 0, "the test needs prompts of different lengths (left padding)"
    with torch.inference_mode():
        torch.manual_seed(123)
        rows = module.predict_step(batch, 0)
        torch.manual_seed(123)  # the same K samples again
        per_prompt = module.generate(batch["input_ids"], batch["attention_mask"], num_samples=k).tokens
    per_prompt = per_prompt.view(3, 1 + k, -1)  # row 0 of each prompt: the greedy answer; rows 1 to k: sampled
    generated, greedy = per_prompt[:, 1:].flatten(0, 1), per_prompt[:, 0]
    stops = module.stops
    for q, (row, record) in enumerate(zip(rows, batch["records"])):
        prompt = dm.prompt_ids(record)
        embeddings, mean_logprobs = [], []
        for sample in generated[q * k : (q + 1) * k].tolist():
            # The answer ends before the first EOS, or before the first newline token after visible text.
            n, seen_text = len(sample), False
            for i, token in enumerate(sample):
                text = module.tokenizer.decode([token])
                if token in module.eos_ids or ("\n" in text and (seen_text or text.split("\n")[0].strip())):
                    n = i
                    break
                seen_text |= bool(text.strip())
            ids = torch.tensor([prompt + sample[:n]])  # unpadded, one sequence at a time
            with torch.inference_mode():
                hidden = module.model(ids, output_hidden_states=True).hidden_states[layer]
            embeddings.append(hidden[0, -1])
            # LN-entropy: the sample's tokens up to and including its stop token, under the model at T = 1.
            scored = sample[: min(n + 1, len(sample))]
            mean_logprobs.append(sequence_logprob(module.model, prompt, scored) / len(scored))
        expected = eigenscore(torch.stack(embeddings), alpha=1e-3).item()
        assert row["answer_eigenscore"] == pytest.approx(expected, rel=1e-4, abs=1e-4)
        assert row["answer_ees"] == pytest.approx(expected, rel=1e-4, abs=1e-4)  # K = 4: the exact path
        assert row["ln_entropy"] == pytest.approx(-sum(mean_logprobs) / k, rel=1e-4)
        greedy_answer = greedy[q].tolist()
        n = int(cut_answers(greedy[q : q + 1], stops, module.tokenizer).num_tokens[0])
        scored = greedy_answer[: min(n + 1, len(greedy_answer))]
        logprob = sequence_logprob(module.model, prompt, scored)
        assert row["perplexity"] == pytest.approx(math.exp(-logprob / len(scored)), rel=1e-4)
        texts = cut_answers(generated[q * k : (q + 1) * k], stops, module.tokenizer).texts
        assert row["sampled_responses"] == texts and len(texts) == k
    assert first_stop(generated, stops)[0].numel() == 3 * k


def sequence_logprob(model, prompt: list[int], answer: list[int]) -> float:
    """Sum of log p(answer token | everything before) under ``model``, one unpadded sequence."""
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + answer])).logits[0, len(prompt) - 1 : -1].double()
    return float(logits.log_softmax(-1).gather(1, torch.tensor(answer)[:, None]).sum())


def test_merge_rank_rows__every_question_once_in_test_order():
    ranks = [[{"index": 0}, {"index": 2}, {"index": 4}], [{"index": 1}, {"index": 3}, {"index": 0, "dup": True}]]
    merged = merge_rank_rows(ranks)
    assert [row["index"] for row in merged] == [0, 1, 2, 3, 4] and "dup" not in merged[0]


def test_writer__ddp_two_ranks_write_every_question_once(tiny_model_dir, truthfulqa_file, tmp_path, monkeypatch):
    # Lightning exports the rendezvous address to os.environ; monkeypatch puts the old values back afterwards.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        monkeypatch.setenv("MASTER_PORT", str(probe.getsockname()[1]))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    module = AnswerGenerator(str(tiny_model_dir), max_new_tokens=3, num_generations=2)
    dm = make_data(tiny_model_dir, truthfulqa_file, num_samples=5, batch_size=2)
    writer = QAPredictionWriter(str(tmp_path / "ddp.json"))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        logger=False,
        callbacks=[writer],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    # rank 0 writes the answers file (atomically) after gathering both ranks' answers
    trainer.predict(module, datamodule=dm, return_predictions=False)
    results = json.loads((tmp_path / "ddp.json").read_text())["results"]
    dm.setup("predict")
    assert [r["question_id"] for r in results] == [r.id for r in dm.test_records[:5]]
    assert all(r["answer_eigenscore"] is not None and len(r["sampled_responses"]) == 2 for r in results)


def test_bf16_true__answers_and_finite_eigenscores_of_the_bf16_models_answer_embeddings(
    tiny_model_dir, truthfulqa_file, monkeypatch
):
    from tests.send.test_metrics import numpy_eigenscore

    k, layer = 4, 1
    module = AnswerGenerator(str(tiny_model_dir), max_new_tokens=6, num_generations=k, embedding_layer=layer)
    calls = []  # the answers and result of every answer_embeddings call (one per batch: its sampled rows)
    sampled = []  # per batch: the prompt of every sampled row, and the row's tokens
    original_embeddings, original_generate = module.answer_embeddings, module.generate

    def record(hidden, answers):
        calls.append((answers, original_embeddings(hidden, answers)))
        return calls[-1][1]

    def record_generate(input_ids, attention_mask, num_samples=0):
        generation = original_generate(input_ids, attention_mask, num_samples)
        rows = generation.tokens.view(len(input_ids), 1 + num_samples, -1)[:, 1:].flatten(0, 1)
        prompts = input_ids.repeat_interleave(num_samples, 0), attention_mask.repeat_interleave(num_samples, 0)
        sampled.append((*prompts, rows))
        return generation

    monkeypatch.setattr(module, "answer_embeddings", record)
    monkeypatch.setattr(module, "generate", record_generate)
    trainer = pl.Trainer(accelerator="cpu", precision="bf16-true", logger=False, enable_progress_bar=False)
    batches = trainer.predict(module, datamodule=make_data(tiny_model_dir, truthfulqa_file, num_samples=3))
    rows = [row for batch in batches for row in batch]

    assert {p.dtype for p in module.model.parameters()} == {torch.bfloat16}
    assert len(rows) == 3 and len(calls) == len(sampled) == 1  # one batch
    (answers, all_embeddings), (all_ids, all_masks, all_generated) = calls[0], sampled[0]
    assert all_embeddings.dtype == torch.float32 and all_embeddings.shape == (3 * k, 64)
    for q, row in enumerate(rows):
        assert isinstance(row["generated_response"], str) and len(row["sampled_responses"]) == k
        question = slice(q * k, (q + 1) * k)
        embeddings, prompt_ids, prompt_mask = all_embeddings[question], all_ids[question], all_masks[question]
        generated, lengths = all_generated[question], answers.num_tokens[question]
        # Each answer embedded by hand: the bf16 model on the unpadded prompt + answer, hidden state at its end.
        expected = []
        for ids, mask, sample, n in zip(prompt_ids, prompt_mask, generated, lengths):
            sequence = torch.cat([ids[mask.bool()], sample[:n]]).unsqueeze(0)
            with torch.inference_mode():
                expected.append(module.model(sequence, output_hidden_states=True).hidden_states[layer][0, -1].float())
        expected = torch.stack(expected)
        assert (embeddings - expected).norm() / expected.norm() < 2**-6  # bf16 rounding of padded vs unpadded
        assert math.isfinite(row["answer_eigenscore"])
        assert row["answer_eigenscore"] == pytest.approx(numpy_eigenscore(embeddings, alpha=1e-3), rel=1e-4, abs=1e-4)
