"""``neurolight-harvest`` on a disk that fills (a small tmpfs, ``tests.helpers.full_disk``; root only, as in CI): it
fails in one line that names the shard it could not write; the shards listed until then stay whole and no temporary
file is left; with space freed, the same command completes the cache of an uninterrupted harvest."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from neurolight.cli.harvest import main as neurolight_harvest
from tests.helpers.cache import TINY_SITES, files
from tests.helpers.full_disk import small_tmpfs

PAGE = 4096
SHARD_PAGES = 1 + 76 + 38  # a shard of 40 contexts: token ids, 600 rows x 128 and x 64 float32, .npy headers


def test_full_disk__fails_naming_the_shard_and_a_rerun_with_space_completes_the_cache(
    tmp_path, tiny_cache, cache_corpus, tiny_model_dir
):
    args = ["--dataset_path", str(cache_corpus), "--model_name", str(tiny_model_dir), "--contexts_per_shard", "40"]
    for site in TINY_SITES:
        args += ["--sites+", site]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with small_tmpfs(tmp_path / "disk", (2 * SHARD_PAGES + 50) * PAGE) as disk:  # two shards fit, a third not
            output = disk / "cache"
            with pytest.raises(SystemExit) as error:
                neurolight_harvest(["--output_dir", str(output), *args])
            message = str(error.value.code)
            shard = output / TINY_SITES[0] / "shard_00002.npy"
            assert "\n" not in message and message.startswith(
                f"neurolight-harvest: error: could not write the activation-cache shard (307,200 bytes) {shard} (No "
                f"space left on device); free space on, or fix the permissions of, {shard.parent} and run again"
            ), message
            manifest = json.loads((output / "manifest.json").read_text())
            assert [entry["index"] for entry in manifest["shards"]] == [0, 1] and not manifest["complete"]
            assert not [p for p in output.rglob("*") if p.name.endswith(".tmp")]
            reference = files(tiny_cache)
            for name, data in files(output).items():  # what is there is whole: the reference's bytes
                assert name == "manifest.json" or data == reference[name], name
            subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)
            neurolight_harvest(["--output_dir", str(output), *args])
            assert files(output) == reference
    finally:
        torch.set_num_threads(threads)
