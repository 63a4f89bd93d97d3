import pytest
import torch

from neurolight.datamodules.llm.models import MODELS, cache_argument, load_causal_lm, load_tokenizer, resolve_model


def test_resolve_model__names_ids_and_dirs(tiny_model_dir):
    assert resolve_model("llama3.1-8b") == MODELS["llama3.1-8b"]
    assert resolve_model("org/some-model") == "org/some-model"
    assert resolve_model(str(tiny_model_dir)) == str(tiny_model_dir)


def test_resolve_model__unknown_name_lists_choices():
    with pytest.raises(ValueError, match="llama2-7b"):
        resolve_model("not-a-model")


def test_load_from_local_dir__same_logits_as_saved(tiny_model_dir, tiny_model):
    model = load_causal_lm(str(tiny_model_dir))
    tokenizer = load_tokenizer(str(tiny_model_dir))
    ids = tokenizer("the cat runs", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, tiny_model(ids).logits)


@pytest.mark.parametrize("name", ["runs/demo/send/missing_SEND", "./missing", "~/no/such/model", "{tmp}/missing"])
def test_resolve_model__a_missing_local_path_fails_at_once_and_never_reaches_a_hub(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()

    def no_hub(*args, **kwargs):
        raise AssertionError("a hub was contacted for a local path")

    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", no_hub)
    with pytest.raises(FileNotFoundError, match=r"does not exist .*smollm2-135m.*'org/name'"):
        load_causal_lm(name.format(tmp=tmp_path))


def test_resolve_model__org_name_is_a_hub_id_unless_org_is_a_local_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_model("runs/model") == "runs/model"  # no folder 'runs' here: a Hugging Face id
    (tmp_path / "runs").mkdir()
    with pytest.raises(FileNotFoundError, match="'runs/model' does not exist"):
        resolve_model("runs/model")


def test_cache_argument__either_name_transformers_gave_it(tiny_model):
    def up_to_5_17(input_ids=None, past_key_values=None, use_cache=None): ...

    def current(input_ids=None, cache=None, use_cache=None): ...

    assert (cache_argument(up_to_5_17), cache_argument(current)) == ("past_key_values", "cache")
    assert cache_argument(type(tiny_model).forward) in ("cache", "past_key_values")
