"""A sweep over two sites, trained from the LLM's one truncated forward per batch, killed with SIGKILL at a seeded
step (``tests.helpers.kill9``) and resumed with the same command from its newest step checkpoint, ends where an
uninterrupted sweep ends, bit for bit: every member's weights, buffers and resampler state, and the data module's
stream."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.helpers.cache import TINY_SITES
from tests.helpers.kill9 import fit_killed_and_resumed
from tests.helpers.recipes import SAE_EVERY, SAE_STEPS, sae_recipe

MLP, ATTN = TINY_SITES  # layers.1.mlp_activations (128 wide), layers.0.attn_sublayer (64 wide)


def sweep_recipe(root: Path, corpus: Path, model_dir: Path) -> dict:
    """tests.helpers.recipes.sae_recipe with a sweep of three members over both sites (TopK at the TopK family's
    decoder multiplier, ReLU at 1, BatchTopK at its own 3) read from one forward per batch."""
    recipe = sae_recipe(root, corpus, model_dir)
    topk = {"class_path": "neurolight.lightning_modules.TopK", "init_args": {"k": 4, "k_aux": 8}}
    relu = {"class_path": "neurolight.lightning_modules.ReLU", "init_args": {"l1_coefficient": 1e-3}}
    batch_topk = {"class_path": "neurolight.lightning_modules.BatchTopK", "init_args": {"k": 6, "k_aux": 8}}
    recipe["model"] = {
        "class_path": "neurolight.lightning_modules.SparseAutoencoderSweep",
        "init_args": {
            "act_vec_size": None, "learning_rate": 0.003, "lr_warmup_steps": 2, "dead_tokens_threshold": 256,
            "metrics_every_n_steps": 2,
            "saes": [
                {"name": "mlp_k4", "site": MLP, "act_vec_size": 128, "dict_vec_size": 192, "architecture": topk},
                {"name": "attn_relu", "site": ATTN, "act_vec_size": 64, "dict_vec_size": 96, "architecture": relu,
                 "learning_rate": 0.001},
                {"name": "attn_b6", "site": ATTN, "act_vec_size": 64, "dict_vec_size": 128,
                 "architecture": batch_topk, "decoder_lr_multiplier": 3.0},
            ],
        },
    }  # fmt: skip
    data = recipe["data"]["init_args"]
    del data["layer_id"], data["layer_type"]
    data["sites"] = list(TINY_SITES)
    return recipe


def test_kill_9__a_sweep_over_sites_resumed_from_its_newest_step_checkpoint_ends_like_an_uninterrupted_one(
    tmp_path, cache_corpus, tiny_model_dir, one_torch_thread
):
    # killed after the first step checkpoint, before the end
    got, want, where = fit_killed_and_resumed(
        lambda root: sweep_recipe(root, cache_corpus, tiny_model_dir), "sae-sweep-sites", tmp_path, SAE_EVERY + 1,
        SAE_STEPS,
    )  # fmt: skip
    assert got["global_step"] == want["global_step"] == SAE_STEPS
    assert [m["decoder_lr_multiplier"] for m in got["hyper_parameters"]["saes"]] == [2.0, 1.0, 3.0]
    # the stream: corpus position, shuffle buffer and in-flight batches, exactly
    torch.testing.assert_close(got["ActivationDataModule"], want["ActivationDataModule"], rtol=0, atol=0)
    different = [name for name, value in want["state_dict"].items() if not value.equal(got["state_dict"][name])]
    assert not different, f"{where}: {different} differ"
    assert {name.split(".")[1] for name in want["state_dict"]} == {"mlp_k4", "attn_relu", "attn_b6"}
