"""How fast the truncated LLM forward of SAE training runs, against the machine's own bf16 matrix-product speed.

    .venv/bin/python bench/forward_speed.py [--model smollm2-135m] [--layer 15] [--batch 16] [--tokens 64]
        [--threads 2] [--repeats 20] [--device cpu|cuda] [--sites layers.5.resid_post,layers.15.mlp_sublayer]

Measured in one run, in this order: a bf16 matrix product of the model's own linear shapes (the ceiling), then the
forward up to the site (``HookedLLM.harvest``, mlp_sublayer of ``--layer``) eager in float32, eager in bfloat16, and
compiled in bfloat16 (``compile_llm``: inductor with frozen weights and merged products on CPU, CUDA graphs on
CUDA). Prints ms per forward, achieved TFLOP/s (2 x multiply-adds of the linear layers plus the attention products)
and that as a fraction of the matmul ceiling, with the machine's load; also as a fraction of a second ceiling, the
products that share an input (q, k, v; gate, up) merged into one, as the compiled forward on CPU runs them. With
``--sites``, the one forward that reads several sites (a sweep over sites) in bfloat16 instead: the hooked forward
stopped after the deepest site (``capture_sites``, what ``ActivationDataModule(sites)`` ran before the truncated
one), the truncated forward (``SitesReader``) and that compiled (``compile_llm``); the FLOPs are those up to the
deepest layer's MLP. Not a test.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch


def linear_flops(model, layer_id: int, tokens: int, seq: int) -> float:
    """Multiply-add FLOPs (x2) of the forward up to the MLP output of ``layer_id``: every Linear of the layers up
    to it, plus QK^T and AV of their attention."""
    layers = model.model.layers[: layer_id + 1]
    weights = sum(m.weight.numel() for layer in layers for m in layer.modules() if isinstance(m, torch.nn.Linear))
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    attention = len(layers) * 2 * 2 * tokens * seq * config.num_attention_heads * head_dim / 2  # causal: half
    return 2.0 * weights * tokens + attention


def time_it(fn, repeats: int, device: str) -> float:
    fn()  # warm-up (and compilation)
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def linear_shapes(model, merged: bool) -> list[tuple[int, int]]:
    """The (out, in) shapes of one decoder layer's linears; ``merged``: those sharing an input (q, k, v; gate, up)
    as one product, as the compiled forward runs them on CPU (``truncated.CPU_INDUCTOR_PATCH``)."""
    layer = model.model.layers[0]
    if not merged:
        return sorted({tuple(m.weight.shape) for m in layer.modules() if isinstance(m, torch.nn.Linear)})
    attn, mlp = layer.self_attn, layer.mlp
    groups = [(attn.q_proj, attn.k_proj, attn.v_proj), (attn.o_proj,), (mlp.gate_proj, mlp.up_proj), (mlp.down_proj,)]
    return [(sum(m.out_features for m in group), group[0].in_features) for group in groups]


def matmul_ceiling(model, tokens: int, repeats: int, device: str, merged: bool = False) -> float:
    """TFLOP/s of bf16 products (tokens x in) @ (in x out) over one decoder layer's linear shapes, each once."""
    flops, seconds = 0.0, 0.0
    for out_features, in_features in linear_shapes(model, merged):
        a = torch.randn(tokens, in_features, dtype=torch.bfloat16, device=device)
        w = torch.randn(out_features, in_features, dtype=torch.bfloat16, device=device)
        seconds += time_it(lambda a=a, w=w: torch.nn.functional.linear(a, w), repeats, device)
        flops += 2.0 * tokens * in_features * out_features
    return flops / seconds / 1e12


def reader(args, model, compiled: bool | None):
    """What reads ``--sites`` in one forward: the hooked forward (``compiled`` None) or ``SitesReader``."""
    from neurolight.datamodules.llm.capture import SitesReader, capture_sites
    from neurolight.datamodules.llm.hooked import resolve_hook_point
    from neurolight.datamodules.sae.activation_cache import parse_site

    sites = [parse_site(site) for site in args.sites.split(",")]
    hooks = [resolve_hook_point(model, *site) for site in sites]
    if compiled is None:
        return lambda ids: capture_sites(model, hooks, ids)
    return SitesReader(model, sites, hooks, compile=compiled).read


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sites", default=None, help="comma-separated sites read in one forward (bfloat16 only)")
    parser.add_argument(
        "--random-weights", action="store_true", help="build --model (a directory with config.json) with random weights"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from neurolight.datamodules.llm.hooked import HookedLLM
    from neurolight.datamodules.llm.models import load_causal_lm

    cpu = platform.processor() or platform.machine()
    flags = ""
    if os.path.exists("/proc/cpuinfo"):
        info = open("/proc/cpuinfo").read()
        flags = " ".join(f for f in ("amx_bf16", "avx512_bf16", "avx512f") if f" {f}" in info)
    print(f"load {os.getloadavg()}, {torch.get_num_threads()} threads, {cpu} [{flags}], torch {torch.__version__}")
    ids = torch.randint(100, 40000, (args.batch, args.tokens), generator=torch.Generator().manual_seed(0))
    ids = ids.to(args.device)
    tokens = args.batch * args.tokens

    def load(dtype):
        if not args.random_weights:
            return load_causal_lm(args.model, dtype=dtype, device=args.device)
        from transformers import AutoConfig, AutoModelForCausalLM

        torch.manual_seed(0)  # the same weights in both dtypes; their values do not change the time
        config = AutoConfig.from_pretrained(args.model)
        return AutoModelForCausalLM.from_config(config).to(args.device, dtype).eval()

    model32 = load(torch.float32)
    flops = linear_flops(model32, args.layer, tokens, args.tokens)
    ceiling = matmul_ceiling(model32, tokens, args.repeats, args.device)
    merged = matmul_ceiling(model32, tokens, args.repeats, args.device, merged=True)
    print(f"bf16 matmul of the model's linear shapes, {tokens} rows: {ceiling:.3f} TFLOP/s (the ceiling)")
    print(f"  the same with the products that share an input merged, as compiled on CPU: {merged:.3f} TFLOP/s")
    model16 = load(torch.bfloat16)
    runs = [("eager float32", model32, False), ("eager bfloat16", model16, False), ("compiled bfloat16", model16, True)]
    if args.sites:
        runs = [("hooked bfloat16", model16, None), ("truncated bfloat16", model16, False), runs[2]]
        from neurolight.datamodules.sae.activation_cache import parse_site

        deepest = max(parse_site(site)[1] for site in args.sites.split(","))
        flops = linear_flops(model32, deepest, tokens, args.tokens)
    baseline = None
    for name, model, compiled in runs:
        if args.sites:
            read = reader(args, model, compiled)
        else:
            read = HookedLLM(model, "mlp_sublayer", args.layer, compile=compiled).harvest
        start = time.perf_counter()
        read(ids)
        first = time.perf_counter() - start
        seconds = time_it(lambda read=read: read(ids), args.repeats, args.device)
        baseline = baseline or seconds
        achieved = flops / seconds / 1e12
        print(
            f"{name:18s} {1000 * seconds:8.1f} ms/forward  {tokens / seconds:9.0f} tokens/s  {achieved:.3f} TFLOP/s "
            f"= {achieved / ceiling:5.1%} of the matmul ceiling ({achieved / merged:5.1%} of the merged one)  "
            f"{baseline / seconds:4.2f}x {runs[0][0]}  "
            f"(first call {first:.1f} s)"
        )
    print(f"load at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()
