"""The activation cache (issue 13, part 2): a harvest of two sites of the tiny Llama from one forward pass equals the
direct harvest of each site bit for bit, records what sampling needs (token ids, row -> context and position, norm
statistics), resumes after an interruption to the same files, and bad input fails in one line that names the fix:
a tiny_cache of another model, site or width, a truncated or corrupted shard (repaired by a rerun that keeps the rest),
a rerun with other settings, an unfinished tiny_cache."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from neurolight.datamodules import CachedActivationDataModule
from neurolight.datamodules.llm.hooked import HookedLLM
from neurolight.datamodules.sae.activation_cache import MANIFEST_FILE, ActivationCache
from neurolight.datamodules.sae.tokenized_corpus import TokenizedCorpus
from tests.helpers.cache import TINY_SITES, files, harvest_tiny

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CONTEXTS, ROWS_PER_CONTEXT = 192, 15  # the tiny cache_corpus: 192 contexts of 16 tokens, position 0 left out


def direct_harvest(model, site: str, ids: torch.Tensor) -> torch.Tensor:
    _, layer_id, layer_type = site.split(".")
    return HookedLLM(model, layer_type, int(layer_id)).harvest(ids)[:, 1:].reshape(-1, ids.shape[1] - 1, 1)


def test_harvest__rows_equal_the_direct_harvest_of_each_site_bit_for_bit(
    tiny_cache, cache_corpus, tiny_model, tiny_model_dir
):
    reader = ActivationCache(tiny_cache)
    ids = TokenizedCorpus(cache_corpus).batch(range(CONTEXTS))
    assert np.array_equal(reader.tokens(np.arange(CONTEXTS)), ids.numpy())
    for site, d_in in zip(TINY_SITES, (128, 64)):
        reader.open(site)
        rows = torch.from_numpy(reader.read(site, 0, reader.num_rows))
        expected = torch.cat([direct_harvest(tiny_model, site, ids[i : i + 8]) for i in range(0, CONTEXTS, 8)])
        expected = expected.reshape(-1, d_in)
        assert rows.shape == (CONTEXTS * ROWS_PER_CONTEXT, d_in) and torch.equal(rows, expected)
        mean_norm = expected.double().norm(dim=1).mean().item()
        assert reader.mean_norm(site) == pytest.approx(mean_norm, rel=1e-12)
    # Row r is position 1 + r % 15 of context r // 15.
    context, position = reader.row_location(np.array([0, 14, 15, 2879]))
    assert context.tolist() == [0, 0, 1, 191] and position.tolist() == [1, 15, 1, 15]
    manifest = reader.manifest
    assert (manifest["num_shards"], manifest["contexts_per_shard"], len(manifest["shards"])) == (5, 40, 5)
    assert manifest["model"] == str(tiny_model_dir.absolute()) and manifest["corpus"]["path"] == str(cache_corpus)
    assert manifest["sites"]["layers.1.mlp_activations"]["hook_point"] == "model.layers.1.mlp.down_proj"


def test_harvest__bfloat16_rows_are_the_direct_harvest_rounded(tmp_path, cache_corpus, tiny_model_dir, tiny_model):
    out = harvest_tiny(tmp_path / "bf16", cache_corpus, tiny_model_dir, sites=TINY_SITES[:1], dtype="bfloat16",
                       num_contexts=50)  # fmt: skip
    reader = ActivationCache(out)
    reader.open(TINY_SITES[0])
    stored = torch.from_numpy(reader.read(TINY_SITES[0], 0, reader.num_rows)).view(torch.bfloat16)
    ids = TokenizedCorpus(cache_corpus).batch(range(50))
    expected = direct_harvest(tiny_model, TINY_SITES[0], ids).reshape(-1, 128).to(torch.bfloat16)
    assert reader.num_rows == 50 * ROWS_PER_CONTEXT and torch.equal(stored, expected)
    assert (out / TINY_SITES[0] / "shard_00001.npy").stat().st_size == 10 * 15 * 128 * 2 + 128  # + .npy header


def test_harvest__interrupted_then_rerun_writes_the_uninterrupted_files(
    tmp_path, tiny_cache, cache_corpus, tiny_model_dir
):
    class Interrupt(Exception):
        pass

    def stop_after_two(done: int, total: int) -> None:
        if done == 80:
            raise Interrupt

    with pytest.raises(Interrupt):
        harvest_tiny(tmp_path / "cache", cache_corpus, tiny_model_dir, on_shard=stop_after_two)
    manifest = json.loads((tmp_path / "cache" / MANIFEST_FILE).read_text())
    assert [e["index"] for e in manifest["shards"]] == [0, 1] and not manifest["complete"]
    with pytest.raises(ValueError, match=r"unfinished \(2 of 5 shards\); continue the harvest with: neurolight-harv"):
        ActivationCache(tmp_path / "cache")
    harvest_tiny(tmp_path / "cache", cache_corpus, tiny_model_dir)  # the same command again
    assert files(tmp_path / "cache") == files(tiny_cache)


def test_harvest__compiled_forward_gets_full_batches_and_writes_the_eager_files(
    tmp_path, tiny_cache, cache_corpus, tiny_model_dir, monkeypatch
):
    shapes = []

    def fake_compile(fn, **kwargs):  # records the calls' shapes; inductor itself runs in tests/llm/test_sites_reader
        def recorded(input_ids, *context):
            shapes.append(tuple(input_ids.shape))
            return fn(input_ids, *context)

        return recorded

    monkeypatch.setattr(torch, "compile", fake_compile)
    harvest_tiny(tmp_path / "cache", cache_corpus, tiny_model_dir, compile_llm=True)
    # 192 contexts, shards of 40, batches of 16: the third batch of shards 0-3 (8 contexts) is padded to 16; shard 4
    # holds 32 contexts, two full batches.
    assert shapes == [(16, 16)] * (4 * 3 + 2)
    assert files(tmp_path / "cache") == files(tiny_cache)


def test_damaged_shards__named_with_the_fix_and_a_rerun_rewrites_only_them(
    tmp_path, tiny_cache, cache_corpus, tiny_model_dir
):
    copy = shutil.copytree(tiny_cache, tmp_path / "cache")
    site = TINY_SITES[1]
    flipped, truncated = copy / site / "shard_00002.npy", copy / TINY_SITES[0] / "shard_00004.npy"
    data = bytearray(flipped.read_bytes())
    data[-5] ^= 0x40
    flipped.write_bytes(bytes(data))
    truncated.write_bytes(truncated.read_bytes()[:-100])
    (copy / "tokens" / "shard_00001.npy").unlink()
    with pytest.raises(ValueError) as error:
        CachedActivationDataModule(str(copy), layer_id=0, layer_type="attn_sublayer").setup("fit")
    assert str(error.value) == (
        f"shard {flipped} is corrupted (its checksum differs from the manifest's); rewrite it with: neurolight-harvest "
        f"--output_dir {copy} (it keeps the shards that are whole)"
    )
    with pytest.raises(ValueError, match=rf"shard {truncated} is truncated or corrupted \(.*\); rewrite it with"):
        CachedActivationDataModule(str(copy), layer_id=1, layer_type="mlp_activations").setup("fit")
    kept = {p: p.stat().st_ino for p in copy.rglob("shard_0000[03].npy")}  # shards 1, 2 and 4 are damaged
    with pytest.warns(UserWarning, match="truncated or corrupted: harvesting its shard again"):
        harvest_tiny(copy, cache_corpus, tiny_model_dir)
    assert files(copy) == files(tiny_cache)
    assert {p: p.stat().st_ino for p in kept} == kept  # the whole shards were not written again


def test_rerun__of_a_whole_cache_verifies_it_and_loads_no_llm(
    tmp_path, tiny_cache, cache_corpus, tiny_model_dir, monkeypatch
):
    import neurolight.datamodules.llm.models as models

    copy = shutil.copytree(tiny_cache, tmp_path / "cache")
    before = files(copy)
    monkeypatch.setattr(models, "load_causal_lm", lambda *args, **kwargs: pytest.fail("loaded the LLM"))
    progress = []
    harvest_tiny(copy, cache_corpus, tiny_model_dir, on_shard=lambda done, total: progress.append((done, total)))
    assert files(copy) == before and progress == [(progress[0][1], progress[0][1])]


def test_mismatches__of_model_site_and_width_are_refused_naming_the_fix(tmp_path, tiny_cache):
    with pytest.raises(ValueError, match=r"harvested from .*but the recipe names model_name smollm2-135m; set data"):
        CachedActivationDataModule(str(tiny_cache), layer_id=1, layer_type="mlp_activations",
                                   model_name="smollm2-135m").setup("fit")  # fmt: skip
    with pytest.raises(ValueError, match=r"holds no site layers\.1\.mlp_sublayer \(it holds layers\.1\.mlp_activat"):
        CachedActivationDataModule(str(tiny_cache), layer_id=1, layer_type="mlp_sublayer").setup("fit")
    with pytest.raises(ValueError, match=r"holds the sites layers\.1\.mlp_activations, layers\.0\.attn_sublayer; set"):
        CachedActivationDataModule(str(tiny_cache)).setup("fit")
    from tests.helpers.sae import make_module, make_trainer

    datamodule = CachedActivationDataModule(str(tiny_cache), layer_id=0, layer_type="attn_sublayer")
    expected = r"serves at layers.0.attn_sublayer have d_in=64, but the SAE expects act_vec_size=128; set model.init_"
    with pytest.raises(ValueError, match=expected + r"args.act_vec_size: 64"):
        make_trainer(tmp_path, max_steps=1).fit(make_module(act_vec_size=128), datamodule)


def test_rerun__with_other_settings_or_into_a_foreign_folder_is_refused(
    tmp_path, tiny_cache, cache_corpus, tiny_model_dir
):
    with pytest.raises(ValueError, match=r"other settings: dtype='bfloat16' \(the cache has 'float32'\)"):
        harvest_tiny(tiny_cache, cache_corpus, tiny_model_dir, dtype="bfloat16")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty and holds no activation cache; choose another"):
        harvest_tiny(tmp_path, cache_corpus, tiny_model_dir)
    with pytest.raises(ValueError, match=r"a new activation cache in .* needs --sites"):
        harvest_tiny(tmp_path / "new", cache_corpus, tiny_model_dir, sites=None)
    with pytest.raises(ValueError, match=r"site 'mlp\.3' is not of the form layers\.<layer_id>\.<layer_type>"):
        harvest_tiny(tmp_path / "new", cache_corpus, tiny_model_dir, sites=["mlp.3"])
    with pytest.raises(ValueError, match=r"layer_id 7 is out of range: the model has 2 layers"):
        harvest_tiny(tmp_path / "new", cache_corpus, tiny_model_dir, sites=["layers.7.mlp_sublayer"])


def test_harvest__with_position_0_kept_every_position_is_a_row(tmp_path, cache_corpus, tiny_model_dir, tiny_model):
    out = harvest_tiny(tmp_path / "all", cache_corpus, tiny_model_dir, sites=TINY_SITES[1:], num_contexts=12,
                       num_tokens=10, exclude_first_position=False)  # fmt: skip
    reader = ActivationCache(out)
    reader.open(TINY_SITES[1])
    ids = TokenizedCorpus(cache_corpus).batch(range(12))[:, :10]
    expected = HookedLLM(tiny_model, "attn_sublayer", 0).harvest(ids).reshape(-1, 64)
    assert torch.equal(torch.from_numpy(reader.read(TINY_SITES[1], 0, reader.num_rows)), expected)
    context, position = reader.row_location(np.array([0, 9, 10, 119]))
    assert context.tolist() == [0, 0, 1, 11] and position.tolist() == [0, 9, 0, 9]


def test_harvest__residual_stream_sites_equal_the_direct_harvest(tmp_path, cache_corpus, tiny_model_dir, tiny_model):
    sites = ["layers.1.resid_pre", "layers.0.resid_post", "layers.1.resid_post"]
    out = harvest_tiny(tmp_path / "resid", cache_corpus, tiny_model_dir, sites=sites, num_contexts=16)
    reader = ActivationCache(out)
    ids = TokenizedCorpus(cache_corpus).batch(range(16))
    for site in sites:
        reader.open(site)
        rows = torch.from_numpy(reader.read(site, 0, reader.num_rows))
        assert torch.equal(rows, direct_harvest(tiny_model, site, ids).reshape(-1, 64)), site
    # The residual stream entering layer 1 is the one leaving layer 0.
    assert torch.equal(torch.from_numpy(reader.read(sites[0], 0, 30)), torch.from_numpy(reader.read(sites[1], 0, 30)))
