"""A ``neurolight fit`` from the activation cache killed with SIGKILL at a seeded step (``tests.helpers.kill9``) and
resumed with the same command from its newest step checkpoint ends where an uninterrupted fit ends, bit for bit: the
cached stream continues at the right row."""

from __future__ import annotations

from pathlib import Path

from tests.helpers.kill9 import fit_killed_and_resumed
from tests.helpers.recipes import SAE_EVERY, SAE_STEPS, sae_recipe


def cached_recipe(root: Path, cache: Path) -> dict:
    """tests.helpers.recipes.sae_recipe (TopK on layer 1's MLP activations, a step checkpoint every 4 steps,
    anthropic resampling every 6) reading the tiny cache instead of the LLM."""
    recipe = sae_recipe(root, corpus=Path("unused"), model_dir=Path("unused"))
    recipe["data"] = {
        "class_path": "neurolight.datamodules.CachedActivationDataModule",
        "init_args": {"cache_path": str(cache), "layer_id": 1, "layer_type": "mlp_activations",
                      "batch_size_autoencoder": 64, "shuffle_rows": 512, "block_rows": 15, "val_contexts": 16},
    }  # fmt: skip
    return recipe


def test_kill_9__a_fit_from_the_cache_resumed_from_its_newest_step_checkpoint_ends_like_an_uninterrupted_one(
    tmp_path, tiny_cache, one_torch_thread
):
    # killed after the first step checkpoint, before the end
    got, want, where = fit_killed_and_resumed(
        lambda root: cached_recipe(root, tiny_cache), "sae-cache", tmp_path, SAE_EVERY + 1, SAE_STEPS
    )
    assert got["global_step"] == want["global_step"] == SAE_STEPS
    assert got["CachedActivationDataModule"] == want["CachedActivationDataModule"]
    different = [name for name, value in want["state_dict"].items() if not value.equal(got["state_dict"][name])]
    assert not different, f"{where}: {different} differ"
