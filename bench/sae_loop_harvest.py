"""Activations for ``bench/sae_loop.py``: the output of ``model.layers.15.mlp`` of SmolLM2-135M (or ``--site``, e.g.
``layers.8.resid_post``) on every context (position 0 left out), float32, saved as WORK/acts.pt (contexts, 63, 576).

By default the model has random weights and the corpus is the pydoc one, exactly as ``sae_sweep.py --random-weights``
builds them. ``--real --corpus DIR`` takes the converted SmolLM2-135M-Instruct and a tokenized corpus of 64-token
contexts instead, its contexts shuffled once (seed 0) so that the last 128, which sae_loop.py holds out, are a random
sample rather than the end of the last document.

    OMP_NUM_THREADS=1 .venv/bin/python bench/sae_loop_harvest.py [WORK]      # default /tmp/sae_loop; ~3 min, 1 core
    OMP_NUM_THREADS=1 .venv/bin/python bench/sae_loop_harvest.py /tmp/sae_real --real --corpus /tmp/realtext/corpus
"""

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import sae_runs  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("work", nargs="?", default="/tmp/sae_loop")
p.add_argument("--real", action="store_true", help="the converted SmolLM2-135M-Instruct, not random weights")
p.add_argument("--corpus", default=None, help="a tokenized corpus of 64-token contexts (default: the pydoc one)")
p.add_argument("--site", default="layers.15.mlp_sublayer", help="layers.<layer_id>.<layer_type>")
args = p.parse_args()
torch.set_num_threads(1)
work = Path(args.work)
work.mkdir(parents=True, exist_ok=True)
recipe = sae_runs.load_recipe(str(ROOT / "configs/sae/sweep-demo.yaml"))
model = sae_runs.prepare_model(None, recipe, not args.real, work)
corpus_dir = sae_runs.prepare_corpus(recipe, args.corpus, model, work)
from neurolight.datamodules.llm.hooked import HookedLLM  # noqa: E402
from neurolight.datamodules.llm.models import load_causal_lm  # noqa: E402
from neurolight.datamodules.sae.tokenized_corpus import TokenizedCorpus  # noqa: E402

corpus = TokenizedCorpus(corpus_dir)
_, layer_id, layer_type = args.site.split(".")
hooked = HookedLLM(load_causal_lm(model, dtype=torch.float32, device="cpu"), layer_type, int(layer_id))
ids = torch.as_tensor(corpus.batch(list(range(len(corpus))))[:, :64])
if args.corpus:
    ids = ids[torch.randperm(len(ids), generator=torch.Generator().manual_seed(0))]
acts = []
start = time.time()
with torch.no_grad():
    for i in range(0, len(ids), 64):
        acts.append(hooked.harvest(ids[i : i + 64])[:, 1:].float().clone())
        print(f"{i + 64}/{len(ids)} contexts, {time.time() - start:.0f} s", flush=True)
acts = torch.cat(acts)
torch.save(acts, work / "acts.pt")
print(acts.shape, acts.norm(dim=-1).mean())
