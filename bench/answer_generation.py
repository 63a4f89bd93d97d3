"""Answer generation for hallucination detection: neurolight's decoding loop against Hugging Face ``generate``.

    .venv/bin/python bench/answer_generation.py [--model smollm2-135m] [--questions 16] [--batch-size 8] [--k 10]
                                                [--max-new-tokens 16] [--dtype bfloat16] [--threads 2]
                                                [--sides neurolight,hf] [--repeats 1]

Both sides answer the same FanOutQA test prompts (chat template, as ``make demo-send``) with the same settings:
the greedy answer and K sampled ones per question (temperature 0.5, top-p 0.99, top-k 10, as INSIDE), stopping
each row at the end of its answer line, with the per-step logits and the hidden states the scores need.

- ``neurolight``: ``AnswerGenerator.generate``, one decoding loop for the greedy and the K sampled rows of a batch
  (``lightning_modules/send/decode.py``).
- ``hf``: two ``model.generate`` calls per batch, greedy and ``num_return_sequences=K`` with
  ``output_hidden_states`` and ``output_logits``, stopped by the same answer-line rule.

Printed per side: seconds per batch (the median over batches and repeats), questions per second, and the
machine load before and after; then the ratio, measured in the same run. The greedy answers of both sides are
compared too (they must agree: greedy decoding draws no random numbers).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers import StoppingCriteria, StoppingCriteriaList  # noqa: E402

from neurolight.datamodules.send.qa import QADataModule  # noqa: E402
from neurolight.lightning_modules.send.answer_generator import AnswerGenerator  # noqa: E402
from neurolight.lightning_modules.send.answer_lines import first_stop  # noqa: E402


def load() -> str:
    return "/".join(f"{value:.2f}" for value in os.getloadavg())


class AnswerLineStop(StoppingCriteria):
    """Hugging Face's stopping hook with neurolight's answer-line rule, for the ``hf`` side."""

    def __init__(self, stops, prompt_width: int) -> None:
        self.stops, self.prompt_width = stops, prompt_width

    def __call__(self, input_ids, scores, **kwargs):
        return first_stop(input_ids[:, self.prompt_width :], self.stops)[1]


def hf_generate(module: AnswerGenerator, input_ids, attention_mask, k: int):
    """The greedy answers, then K sampled answers per prompt, the way ``generate`` is usually called."""
    hp = module.hparams
    common = dict(
        attention_mask=attention_mask,
        max_new_tokens=hp.max_new_tokens,
        eos_token_id=module.eos_ids,
        pad_token_id=module.tokenizer.pad_token_id,
        stopping_criteria=StoppingCriteriaList([AnswerLineStop(module.stops, input_ids.shape[1])]),
        return_dict_in_generate=True,
        output_logits=True,
    )
    greedy = module.model.generate(input_ids=input_ids, do_sample=False, **common)
    sampled = module.model.generate(
        input_ids=input_ids, do_sample=True, temperature=hp.hd_temperature, top_p=hp.hd_top_p, top_k=hp.hd_top_k,
        num_return_sequences=k, output_hidden_states=True, **common,
    )  # fmt: skip
    return greedy.sequences[:, input_ids.shape[1] :], sampled


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--questions", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--k", type=int, default=10, help="sampled answers per question")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sides", default="neurolight,hf")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    torch.set_default_dtype(dtype)  # as the Trainer's bf16-true precision does around configure_model
    module = AnswerGenerator(args.model, max_new_tokens=args.max_new_tokens, num_generations=args.k)
    module.configure_model()
    torch.set_default_dtype(torch.float32)
    data = QADataModule(dataset="fanoutqa", model_name=args.model, num_samples=args.questions,
                        batch_size=args.batch_size, seed=0, split_fractions=(0.8, 0.1, 0.1))  # fmt: skip
    data.prepare_data()
    data.setup("predict")
    batches = list(data.predict_dataloader())
    settings = f"{args.questions} questions in batches of {args.batch_size}, K = {args.k}"
    print(f"{args.model} {args.dtype}, {settings}, {args.max_new_tokens} new tokens, {args.threads} threads")

    sides = args.sides.split(",")
    seconds: dict[str, list[float]] = {side: [] for side in sides}
    cpu: dict[str, list[float]] = {side: [] for side in sides}  # this process's CPU time: steadier under load
    greedy: dict[str, list] = {side: [] for side in sides}
    with torch.inference_mode():
        for repeat in range(args.repeats):
            for side in sides if repeat % 2 == 0 else reversed(sides):  # alternate, so load hits both alike
                before = load()
                torch.manual_seed(0)
                for batch in batches:
                    ids, mask = batch["input_ids"], batch["attention_mask"]
                    start, start_cpu = time.perf_counter(), time.process_time()
                    if side == "neurolight":
                        tokens = module.generate(ids, mask, num_samples=args.k).tokens[:: 1 + args.k]
                    else:
                        tokens = hf_generate(module, ids, mask, args.k)[0]
                    seconds[side].append(time.perf_counter() - start)
                    cpu[side].append(time.process_time() - start_cpu)
                    if repeat == 0:
                        greedy[side].append(tokens)
                print(f"  {side:<10} repeat {repeat}: {sum(seconds[side][-len(batches) :]):7.1f} s   "
                      f"load {before} -> {load()}")  # fmt: skip

    print(f"\n{'side':<12} {'s / batch (median)':>20} {'CPU s / batch':>14} {'questions / s':>14}")
    median = {side: statistics.median(values) for side, values in seconds.items()}
    for side in sides:
        cpu_median = statistics.median(cpu[side])
        print(f"{side:<12} {median[side]:>20.2f} {cpu_median:>14.2f} {args.batch_size / median[side]:>14.2f}")
    if {"neurolight", "hf"} <= set(sides):
        print(f"\nneurolight / hf: {median['hf'] / median['neurolight']:.2f}x faster (median batch)")
        same = 0
        for ours, theirs in zip(greedy["neurolight"], greedy["hf"]):
            stop_ours = first_stop(ours, module.stops)[0]
            for row in range(len(ours)):
                n = int(stop_ours[row]) + 1
                same += ours[row, :n].tolist() == theirs[row, :n].tolist()
        print(f"greedy answers equal on both sides: {same} of {args.questions}")


if __name__ == "__main__":
    main()
