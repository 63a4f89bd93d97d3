"""Shared test fixtures: tiny random-init Llama models and tokenizers built on the spot (no network), a small
TriviaQA-schema question file, and an Elasticsearch-compatible server on loopback."""

from __future__ import annotations

import os
import random

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")

_WORDS = (
    "the a neuron layer model token feature sparse dictionary activation residual stream attention head "
    "question answer river mountain city king queen paris france capital music cat dog runs jumps quickly "
    "slowly red green blue one two three four five six seven eight nine ten"
).split()


def make_sentences(n: int, seed: int = 0, min_words: int = 4, max_words: int = 40) -> list[str]:
    rng = random.Random(seed)
    return [
        " ".join(rng.choice(_WORDS) for _ in range(rng.randint(min_words, max_words))).capitalize() + "."
        for _ in range(n)
    ]


def make_tokenizer(vocab_size: int = 300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token=None))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    core.train_from_iterator(make_sentences(400), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", model_max_length=512
    )


def make_llama(vocab_size: int, seed: int = 0, num_layers: int = 2, hidden: int = 64, intermediate: int = 128):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """A saved tiny Llama (2 layers, hidden 64, MLP 128) plus its tokenizer, loadable by path."""
    path = tmp_path_factory.mktemp("tiny-llama")
    model = make_llama(len(tiny_tokenizer))
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


@pytest.fixture
def records_path(tmp_path):
    """48 TriviaQA-schema questions of 3-9 words (``tests.helpers.send.write_records``), for SEND runs."""
    from tests.helpers.send import write_records

    return write_records(tmp_path / "tqa.jsonl")


@pytest.fixture
def single_process_group(monkeypatch):
    """Rendezvous variables for a one-process group on a free port (DeepSpeed on CPU); torn down afterwards."""
    import importlib
    import socket

    deepspeed = pytest.importorskip("deepspeed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Lightning writes these into os.environ; setting them first lets monkeypatch restore the originals.
    rendezvous = {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
    }
    for name, value in rendezvous.items():
        monkeypatch.setenv(name, value)
    # DeepSpeed's shared-memory allreduce kernel speeds up multi-process CPU groups; one process never uses it,
    # and building it is a C++ compile (30-90 s on a cold ~/.cache/torch_extensions).
    # (deepspeed.comm.torch is shadowed by the torch module as an attribute of deepspeed.comm, hence importlib.)
    monkeypatch.setattr(importlib.import_module("deepspeed.comm.torch"), "build_shm_op", lambda: None)
    yield
    if torch.distributed.is_initialized():
        deepspeed.comm.destroy_process_group()  # also drops DeepSpeed's cached groups, so a later run starts clean


@pytest.fixture
def one_torch_thread():
    """Tiny models and matrices gain nothing from a second thread, and on shared cores OpenMP waits cost more than
    the arithmetic; torch's thread count is restored afterwards, so other tests keep theirs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def es_address(tmp_path_factory):
    """Address (``http://127.0.0.1:PORT``) of a noida-db server that serves the test module using it, then stops."""
    from tests.helpers.noida import noida_elasticsearch

    with noida_elasticsearch(tmp_path_factory.mktemp("noida")) as address:
        yield address
