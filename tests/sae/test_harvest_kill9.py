"""``neurolight-harvest`` killed with SIGKILL at a seeded file write, the file whole under its temporary name
(``tests.helpers.harvest_stop``; a shard's files are written one by one, then the manifest lists it, so the kill may
also leave a shard's files in place but unlisted), then run again with the same command: the cache equals an
uninterrupted harvest file for file, no row duplicated or missing, no temporary file left. While the killed harvest
is stopped, a second one on its folder is refused in one line naming its process."""

from __future__ import annotations

import json

import torch
import yaml

from neurolight.cli.harvest import main as neurolight_harvest
from tests.helpers.cache import TINY_SITES, files
from tests.helpers.kill9 import kill_9_after_a_second_run_is_refused, kill_batch

WRITES = 1 + 5 * 4 + 1  # the manifest, 5 shards of token ids, two sites and the manifest, the final manifest


def test_kill_9__a_rerun_completes_the_cache_of_an_uninterrupted_harvest(tmp_path, tiny_cache, cache_corpus,
                                                                        tiny_model_dir):  # fmt: skip
    output = tmp_path / "cache"
    recipe = tmp_path / "harvest.yaml"
    recipe.write_text(yaml.safe_dump({
        "output_dir": str(output), "dataset_path": str(cache_corpus), "model_name": str(tiny_model_dir),
        "sites": TINY_SITES, "contexts_per_shard": 40,
    }))  # fmt: skip
    stop = kill_batch("harvest", 2, WRITES - 1)
    args = ["--config", str(recipe)]
    kill_9_after_a_second_run_is_refused(
        args, stop, tmp_path / "killed.log", output, module="tests.helpers.harvest_stop", command=neurolight_harvest
    )
    listed = json.loads((output / "manifest.json").read_text())["shards"]
    assert [entry["index"] for entry in listed] == list(range((stop - 2) // 4))  # shards listed before the kill
    assert len(list(output.rglob(".*.tmp"))) == 1  # the killed write's file, complete but never renamed
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        neurolight_harvest(args)
    finally:
        torch.set_num_threads(threads)
    assert files(output) == files(tiny_cache), f"killed at write {stop}"
    assert not list(output.rglob(".*.tmp")), f"killed at write {stop}: its temporary file is left"
