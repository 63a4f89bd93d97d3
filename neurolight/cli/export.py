"""neurolight-export SOURCE OUTPUT_DIR --format saelens|sparsify|neurolight

Converts an SAE between neurolight's checkpoints and directories and SAELens's and sparsify's directories
(docs/sae.md, Formats); the written SAE works on raw activations, its training normalisation folded in.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

EXAMPLES = """examples:
  neurolight-export runs/demo/sae/smollm2-135m_l15_mlp_sublayer/version_0/checkpoints/last.ckpt runs/demo/saelens \\
      --format saelens
  neurolight-export runs/demo/sae/smollm2-135m_l15_mlp_sublayer/version_0/checkpoints/last.ckpt runs/demo/saelens \\
      --format saelens --samples runs/demo/interpret/samples   # + sparsity.safetensors from the firing counts
  neurolight-export SWEEP_CKPT runs/sweep/k32_w2304 --format saelens --name k32_w2304   # one SAE of a sweep
  neurolight-export path/to/sparsify_run/layers.15.mlp runs/imported/l15 --format neurolight
"""


def main(argv: Sequence[str] | None = None) -> None:
    import argparse

    from neurolight.cli.errors import debug_requested, exit_with

    debug, argv = debug_requested(list(sys.argv[1:] if argv is None else argv))
    parser = argparse.ArgumentParser(
        prog="neurolight-export",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Write an SAE in another format. SOURCE: a neurolight checkpoint (.ckpt of `neurolight fit`), or a\n"
            "neurolight, SAELens (cfg.json + sae_weights.safetensors) or sparsify (cfg.json + sae.safetensors)\n"
            "directory. The model, site and data settings travel with it."
        ),
        epilog=EXAMPLES,
    )
    parser.add_argument("source", metavar="SOURCE", help="the SAE to convert")
    parser.add_argument("output_dir", metavar="OUTPUT_DIR", help="directory to write (created; files replaced)")
    parser.add_argument("--format", required=True, choices=("saelens", "sparsify", "neurolight"), help="target format")
    parser.add_argument(
        "--samples",
        metavar="DIR",
        help="interpretation samples of this SAE (`neurolight predict --config configs/interpret/sample.yaml`): "
        "their firing frequencies become SAELens's sparsity.safetensors / neurolight's firing_frequency.safetensors",
    )
    parser.add_argument("--name", help="the SAE of a sweep's checkpoint to export, by its name")
    parser.add_argument("--model_name", help="override the LLM recorded in the SAE's metadata")
    parser.add_argument(
        "--hook_name",
        help="override the site: a TransformerLens name (blocks.15.hook_mlp_out) or module path (model.layers.15)",
    )
    args = parser.parse_args(argv)
    try:
        written = export(
            args.source, args.output_dir, args.format, args.samples, args.model_name, args.hook_name, args.name
        )
    except (OSError, ValueError) as error:
        exit_with(error, debug, prefix="neurolight-export")
    print(f"wrote {args.format} SAE to {args.output_dir}: {', '.join(path.name for path in written)}")


def export(
    source: str,
    output_dir: str,
    format: str,
    samples: str | None = None,
    model_name: str | None = None,
    hook_name: str | None = None,
    name: str | None = None,
) -> list[Path]:
    from neurolight.lightning_modules import SparseAutoencoder

    sae = SparseAutoencoder.from_pretrained(source, name)
    apply_overrides(sae, model_name, hook_name)
    frequency = None if samples is None else firing_frequency(samples, sae.d_sae)
    return sae.save_pretrained(output_dir, format=format, firing_frequency=frequency)


def apply_overrides(sae, model_name: str | None, hook_name: str | None) -> None:
    """Set the LLM and the site of an SAE whose source does not record them (or records another library's name
    that does not map)."""
    from neurolight.datamodules.llm.hook_names import site_of_hook_name

    if model_name is not None:
        sae.metadata.model_name = model_name
    if hook_name is not None:
        sae.metadata.layer_type, sae.metadata.layer_id = site_of_hook_name(hook_name)
        sae.metadata.hook_name = hook_name


def firing_frequency(samples: str, d_sae: int):
    from neurolight.datamodules.interpret.samples import InterpretationSamples

    frequency = InterpretationSamples(samples).tensors["frequency"]
    if frequency.shape != (d_sae,):
        raise ValueError(f"the samples in {samples} count {frequency.shape[0]} latents, this SAE has {d_sae}")
    return frequency


if __name__ == "__main__":
    main()
