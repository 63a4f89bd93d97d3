"""One TopK SAE trained in a plain loop on the activations of ``bench/sae_loop_harvest.py``, by neurolight's rule
(``--side nl``: its SparseAutoencoder, loss, decoder constraint, fused Adam and warm-up) or SAELens's (``--side sl``:
its TopKTrainingSAE and ``training_forward_pass``, dead window in forward passes, gradient norm clipped to 1), one
setting changed at a time; the explained variance on the last 128 contexts (bench/README.md, "4096-token steps on
CPU"). Appends a JSON line per run to WORK/loop.jsonl.

    OMP_NUM_THREADS=1 .venv/bin/python bench/sae_loop.py --side nl --k 16 --d-sae 2304 [--dec-mult 3] [--lr 2.83e-3]
        [--dec-init-norm 0.1] [--arch batchtopk]
"""

import argparse
import json
import math
import time

import torch

from neurolight.lightning_modules import BatchTopK, MatryoshkaBatchTopK, TopK
from neurolight.lightning_modules.sae.metrics import ExplainedVariance
from neurolight.lightning_modules.sae.optim import adam, linear_warmup
from neurolight.lightning_modules.sae.sparse_autoencoder import SparseAutoencoder

p = argparse.ArgumentParser()
p.add_argument("--work", default="/tmp/sae_loop", help="where sae_loop_harvest.py saved acts.pt")
p.add_argument("--k", type=int, default=16)
p.add_argument("--d-sae", type=int, default=2304)
p.add_argument("--side", default="nl")
p.add_argument("--batch", type=int, default=4096)
p.add_argument("--tokens", type=int, default=131072)
p.add_argument("--lr", type=float, default=1e-3)
p.add_argument("--warmup", type=int, default=20)
p.add_argument("--dead-tokens", type=int, default=50000)
p.add_argument("--auxk", type=float, default=None)
p.add_argument(
    "--aux-weight",
    default="none",
    help="nl: none (the module's AuxK, which carries x var_x since session 16) | input (x var_x once more: "
    "session 16's record of the change, made before the module had it); sl: ignored",
)
p.add_argument("--no-norm", action="store_true")
p.add_argument("--sl-norm", action="store_true", help="sl: inputs scaled as neurolight's (E||x|| = sqrt(d_in))")
p.add_argument("--enc-scale", type=float, default=None)
p.add_argument("--clip", type=float, default=0.0)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--sl-rescale", type=int, default=1)
p.add_argument("--sl-dec-norm", type=float, default=0.1)
p.add_argument("--tag", default="")
p.add_argument("--dec-mult", type=float, default=1.0)
p.add_argument("--enc-mult", type=float, default=1.0)
p.add_argument("--arch", default="topk", choices=["topk", "batchtopk", "matryoshka"], help="nl: the architecture")
p.add_argument("--dec-init-norm", type=float, default=None, help="nl: TopK(decoder_init_norm=...), free decoder rows")
args = p.parse_args()
torch.set_num_threads(1)

acts = torch.load(f"{args.work}/acts.pt")  # (contexts, 63, 576)
n_train = len(acts) - 128
order = torch.randperm(n_train, generator=torch.Generator().manual_seed(0))
train = acts[order].reshape(-1, acts.shape[-1])
held = acts[n_train:].reshape(-1, acts.shape[-1])
steps = math.ceil(args.tokens / args.batch)
gen = torch.Generator().manual_seed(1)


def batches():
    while True:
        perm = torch.randperm(len(train), generator=gen)
        for i in range(0, len(perm) - args.batch + 1, args.batch):
            yield train[perm[i : i + args.batch]]


torch.manual_seed(args.seed)
dead_hist = []
t0 = time.time()
if args.side == "nl":
    kw = {"k": args.k}
    if args.auxk is not None:
        kw["auxk_coefficient"] = args.auxk
    if args.enc_scale is not None:
        kw["encoder_init_scale"] = args.enc_scale
    if args.dec_init_norm is not None:
        kw["decoder_init_norm"] = args.dec_init_norm
    architecture = {"topk": TopK, "batchtopk": BatchTopK, "matryoshka": MatryoshkaBatchTopK}[args.arch]
    sae = SparseAutoencoder(576, args.d_sae, architecture(**kw))
    scale = 1.0 if args.no_norm else math.sqrt(576) / float(train[:65536].norm(dim=-1).mean())
    groups = [
        {"params": [sae.W_dec], "lr": args.lr * args.dec_mult},
        {"params": [sae.W_enc], "lr": args.lr * args.enc_mult},
        {"params": [sae.b_enc, sae.b_dec], "lr": args.lr},
    ]
    opt = adam(groups, betas=(0.9, 0.999))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, linear_warmup(args.warmup))
    since = torch.zeros(args.d_sae, dtype=torch.long)
    if args.aux_weight == "input":
        arch = sae.architecture
        orig = type(arch).aux_loss

        def aux_loss(self, sae_, x, x_hat, pre_acts, dead):
            return orig(self, sae_, x, x_hat, pre_acts, dead) * (x - x.mean(0)).pow(2).sum(-1).mean().detach()

        arch.aux_loss = aux_loss.__get__(arch)
    it = batches()
    for _step in range(steps):
        x = next(it) * scale
        dead = since >= args.dead_tokens
        out = sae(x, dead_mask=dead)
        out.loss.backward()
        if sae.normalize_decoder:
            sae.remove_parallel_decoder_grad_()
        if args.clip:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), args.clip)
        opt.step()
        sched.step()
        opt.zero_grad()
        if sae.normalize_decoder:
            sae.normalize_decoder_()
        fired = (out.latents > 0).sum(0)
        since += len(x)
        since.masked_fill_(fired > 0, 0)
        dead_hist.append(int(dead.sum()))
    sae.eval()
    ev = ExplainedVariance()
    with torch.no_grad():
        for chunk in held.split(4096):
            ev.update(chunk, sae(chunk * scale).x_hat / scale)
else:
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput

    cfg = TopKTrainingSAEConfig(
        d_in=576,
        d_sae=args.d_sae,
        k=args.k,
        dtype="float32",
        device="cpu",
        normalize_activations="none",
        rescale_acts_by_decoder_norm=bool(args.sl_rescale),
        decoder_init_norm=args.sl_dec_norm if args.sl_dec_norm > 0 else None,
        aux_loss_coefficient=1.0 if args.auxk is None else args.auxk,
    )
    sae = TopKTrainingSAE(cfg)
    scale = math.sqrt(576) / float(train[:65536].norm(dim=-1).mean()) if args.sl_norm else 1.0
    opt = torch.optim.Adam(sae.parameters(), lr=args.lr, betas=(0.9, 0.999))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, linear_warmup(args.warmup))
    passes = torch.zeros(args.d_sae)
    window = max(1, args.dead_tokens // args.batch - 1)
    it = batches()
    for step in range(steps):
        x = next(it) * scale
        dead = passes > window
        out = sae.training_forward_pass(
            TrainStepInput(
                sae_in=x, dead_neuron_mask=dead, coefficients={}, n_training_steps=step, is_logging_step=False
            )
        )
        fired = out.feature_acts.bool().sum(0).bool()
        passes += 1
        passes[fired] = 0
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), args.clip or 1.0)
        opt.step()
        opt.zero_grad()
        sched.step()
        dead_hist.append(int(dead.sum()))
    sae.eval()
    ev = ExplainedVariance()
    with torch.no_grad():
        for chunk in held.split(4096):
            ev.update(chunk, sae.decode(sae.encode(chunk * scale)) / scale)
norms = sae.W_dec.detach().norm(dim=1)
res = {
    **vars(args),
    "decoder_norm_quartiles": [round(float(q), 3) for q in norms.quantile(torch.tensor([0.25, 0.5, 0.75]))],
    "ev": round(float(ev.compute()), 4),
    "dead_end": dead_hist[-1],
    "dead_max": max(dead_hist),
    "s": round(time.time() - t0, 1),
}
print(json.dumps(res), flush=True)
with open(f"{args.work}/loop.jsonl", "a") as f:
    f.write(json.dumps(res) + "\n")
