"""What the latent-store tests write and expect: an SAE's metadata, the interpreter's result for a latent, the
store document it must become, written out field by field, and the data a feature browser page holds."""

from __future__ import annotations

import json
import re
from pathlib import Path

SECRET = "c2VjcmV0LWlkOnRvcC1zZWNyZXQta2V5LTQ3MTE="
"""An API key that must never appear in an error, a log, a repr or a saved config."""
META = {
    "model_name": "codellama/CodeLlama-7b-Instruct-hf",
    "layer_type": "mlp_activations",
    "layer_id": 19,
    "d_in": 11008,
    "d_sae": 44032,
    "learning_rate": 2e-4,
    "l1_coefficient": 0.5,
    "architecture": "relu",
}


def interpretation(latent: int, version: int = 1) -> dict:
    return {
        "latent": latent,
        "explanation": f"tokens about topic {latent} (v{version})",
        "score": float("nan") if latent % 5 == 0 else round(0.1 * (latent % 7) + 0.01 * version, 4),
        "detection_score": 0.5 + 0.01 * latent,
        "detection_auroc": 0.6 + 0.02 * latent,
        "frequency": 10 ** (-2 - latent / 10),
        "max_activation": 1.5 + latent,
        "top_tokens": [" def", f"tok{latent}", "é"],
        "explainer": "smollm2-135m",
        "num_simulated_tokens": 64,
    }


def expected_document(latent: int, index: str, version: int = 1) -> dict:
    """The document, written out field by field, that ``interpretation(latent, version)`` must become."""
    source = interpretation(latent, version)
    return {
        "sae": index,
        "model": "codellama/CodeLlama-7b-Instruct-hf",
        "layer": 19,
        "layer_type": "mlp_activations",
        "latent": latent,
        "explanation": source["explanation"],
        "score": None if latent % 5 == 0 else source["score"],
        "detection_score": source["detection_score"],
        "detection_auroc": source["detection_auroc"],
        "frequency": source["frequency"],
        "max_activation": source["max_activation"],
        "top_tokens": [" def", f"tok{latent}", "é"],
        "explainer": "smollm2-135m",
    }


def without_time(documents: list[dict]) -> list[dict]:
    return [{key: value for key, value in doc.items() if key != "updated_at"} for doc in documents]


def page_data(page: Path) -> dict:
    """The JSON data of a feature browser page."""
    text = page.read_text(encoding="utf-8")
    return json.loads(re.search(r'<script type="application/json" id="browser-data">(.*?)</script>', text, re.S)[1])
