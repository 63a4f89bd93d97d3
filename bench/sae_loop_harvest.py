"""Activations for ``bench/sae_loop.py``: the random-weight SmolLM2-135M and the pydoc corpus exactly as
``sae_sweep.py --random-weights`` builds them, and the output of ``model.layers.15.mlp`` on every context (position 0
left out), float32, saved as WORK/acts.pt (contexts, 63, 576).

    OMP_NUM_THREADS=1 .venv/bin/python bench/sae_loop_harvest.py [WORK]      # default /tmp/sae_loop; ~3 min, 1 core
"""

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import sae_runs  # noqa: E402

torch.set_num_threads(1)
work = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/sae_loop")
work.mkdir(parents=True, exist_ok=True)
recipe = sae_runs.load_recipe(str(ROOT / "configs/sae/sweep-demo.yaml"))
model = sae_runs.prepare_model(None, recipe, True, work)
corpus_dir = sae_runs.prepare_corpus(recipe, None, model, work)
from neurolight.datamodules.llm.hooked import HookedLLM  # noqa: E402
from neurolight.datamodules.llm.models import load_causal_lm  # noqa: E402
from neurolight.datamodules.sae.tokenized_corpus import TokenizedCorpus  # noqa: E402

corpus = TokenizedCorpus(corpus_dir)
hooked = HookedLLM(load_causal_lm(model, dtype=torch.float32, device="cpu"), "mlp_sublayer", 15)
ids = torch.as_tensor(corpus.batch(list(range(len(corpus))))[:, :64])
acts = []
with torch.no_grad():
    for i in range(0, len(ids), 64):
        acts.append(hooked.harvest(ids[i : i + 64])[:, 1:].float().clone())
        print(i, flush=True)
acts = torch.cat(acts)
torch.save(acts, work / "acts.pt")
print(acts.shape, acts.norm(dim=-1).mean())
