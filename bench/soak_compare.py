"""What bench/soak.py compares after a killed and resumed run, per job, against the uninterrupted reference; and how a
user resumes each job (``resume_arguments``). Each comparison returns ``identical``, what was ``lost`` and
``duplicated`` (in ``unit``), the ``max_abs_diff`` of the weights or tensors, and a short ``detail``."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import torch


def run_folder(folder: Path) -> Path:
    """``<save_dir>/<name>/version_0`` of a fit recipe whose logger saves to ``folder``."""
    return next(folder.glob("*/version_0"))


def resume_arguments(job: str, folder: Path, inputs: dict) -> tuple[list[str], str]:
    """The extra arguments of the resumed run, and what it resumes from (what the killed run left)."""
    if job == "sample":
        snapshot = folder / "samples" / ".resume" / "rank0.pt"
        if not snapshot.is_file():
            return [], "start"
        state = torch.load(snapshot, map_location="cpu", weights_only=True)
        return [], f"pass {state['pass']} snapshot"
    if job.startswith("interpret"):
        try:
            store = _store(job, folder, inputs)
        except Exception:  # no store or index yet
            return [], "0 stored"
        try:
            return [], f"{len(store.stored_latents())} stored"
        finally:
            store.close()
    checkpoints = next(folder.glob("*/version_0/checkpoints"), None)
    found = sorted(checkpoints.glob("*.ckpt")) if checkpoints else []
    if job == "send":
        found = [p for p in found if p.name == "last.ckpt"]  # mid_epoch.ckpt is only written on a clean stop
    else:  # last.ckpt only at the end; else the newest step checkpoint
        found = [p for p in found if p.name == "last.ckpt"] or sorted(p for p in found if p.name.startswith("step_"))
    if not found:
        return [], "start"
    return ["--ckpt_path", str(found[-1])], found[-1].name


def _tensors_diff(got: dict, want: dict) -> tuple[bool, float, list[str]]:
    """Whether all tensors are equal, the largest difference of a floating-point one (weights; counters and indices
    are only named), and the names of those that differ."""
    differ, largest = [], 0.0
    for name, value in want.items():
        other = got.get(name)
        if other is None or other.shape != value.shape:
            differ.append(name)
            largest = float("inf")
        elif not torch.equal(other, value):
            differ.append(name)
            if value.is_floating_point():
                largest = max(largest, (other.double() - value.double()).abs().max().item())
    return not differ and got.keys() == want.keys(), largest, differ


def _metric_rows(path: Path, columns: tuple[str, ...]) -> dict[tuple, list[tuple]]:
    """The values of ``columns`` per (step, which of them the row has); more than one entry: a duplicated row."""
    rows: dict[tuple, list[tuple]] = {}
    if path.is_file():
        with path.open(newline="") as file:
            for row in csv.DictReader(file):
                present = tuple(c for c in columns if row.get(c))
                if present:
                    rows.setdefault((int(row["step"]), present), []).append(tuple(row[c] for c in present))
    return rows


def _rows_compare(got: dict, want: dict) -> tuple[int, int, int]:
    """Reference rows missing, rows written more often than in the reference, rows with other values."""
    lost = sum(len(values) for key, values in want.items() if key not in got)
    duplicated = sum(max(0, len(values) - len(want.get(key, [None]))) for key, values in got.items())
    differ = sum(got[key][:1] != values[:1] for key, values in want.items() if key in got)
    return lost, duplicated, differ


def compare_send(folder: Path, reference: Path, inputs: dict) -> dict:
    from safetensors.torch import load_file

    model = next((folder / "model").glob("*/model.safetensors"), None)
    if model is None:
        return {"identical": False, "failed": "no model.safetensors written"}
    same, largest, differ = _tensors_diff(
        load_file(model), load_file(next((reference / "model").glob("*/model.safetensors")))
    )
    return _with_metrics(folder, reference, ("train/loss", "val/loss"), same, largest, differ)


def _with_metrics(folder, reference, columns, same: bool, largest: float, differ: list[str]) -> dict:
    lost, duplicated, values = _rows_compare(
        _metric_rows(run_folder(folder) / "metrics.csv", columns),
        _metric_rows(run_folder(reference) / "metrics.csv", columns),
    )
    detail = f"{len(differ)} tensors differ ({', '.join(differ[:4])}{', ...' if len(differ) > 4 else ''})"
    return {
        "identical": same and lost == duplicated == values == 0,
        "max_abs_diff": largest,
        "lost": lost,
        "duplicated": duplicated,
        "unit": "metric rows",
        "detail": (detail if differ else "") + (f"; {values} metric rows with other values" if values else ""),
    }


def compare_sae(folder: Path, reference: Path, inputs: dict) -> dict:
    def state(root):
        return torch.load(run_folder(root) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)

    if not (run_folder(folder) / "checkpoints" / "last.ckpt").is_file():
        return {"identical": False, "failed": f"the resumed run left no last.ckpt in {run_folder(folder)}"}
    got, want = state(folder), state(reference)
    same, largest, differ = _tensors_diff(got["state_dict"], want["state_dict"])
    # The step's own metrics: Lightning repeats the window metrics on the rows in between, which a resumed process
    # has not computed yet.
    return _with_metrics(folder, reference, ("train/loss", "train/mse"), same, largest, differ)


def compare_sample(folder: Path, reference: Path, inputs: dict) -> dict:
    from safetensors.torch import load_file

    got, want = folder / "samples", reference / "samples"
    files = ("samples.safetensors", "metadata.json")
    if not all((got / name).is_file() for name in files):
        return {"identical": False, "failed": f"no samples in {got}"}
    same = all((got / name).read_bytes() == (want / name).read_bytes() for name in files)
    _, largest, differ = _tensors_diff(load_file(got / files[0]), load_file(want / files[0]))
    latents_got, latents_want = (set(load_file(p / files[0])["latents"].tolist()) for p in (got, want))
    return {"identical": same, "max_abs_diff": largest, "lost": len(latents_want - latents_got),
            "duplicated": 0, "unit": "latents", "detail": f"differ: {', '.join(differ)}" if differ else ""}  # fmt: skip


def _store(job: str, folder: Path, inputs: dict):
    """The run's store, open for reading (its index is named after the run's folder, see soak.write_recipe)."""
    from neurolight.callbacks.interpret.stores import SQLiteStore
    from neurolight.callbacks.interpret.stores.elasticsearch import ElasticsearchStore

    if job == "interpret-sqlite":
        store = SQLiteStore(str(folder / "store.sqlite"))
    else:
        store = ElasticsearchStore(inputs["es"], api_key_env=None)
    store.open(f"soak-{folder.parent.name}-{folder.name}", {}, create=False)
    return store


def _documents(job: str, folder: Path, inputs: dict) -> list[dict]:
    store = _store(job, folder, inputs)
    try:
        return [{k: v for k, v in doc.items() if k not in ("sae", "updated_at")} for doc in store.documents()]
    finally:
        store.close()


def compare_interpret(job: str):
    def compare(folder: Path, reference: Path, inputs: dict) -> dict:
        got, want = _documents(job, folder, inputs), _documents(job, reference, inputs)
        latents = Counter(doc["latent"] for doc in got)
        by_latent = {doc["latent"]: json.dumps(doc, sort_keys=True, default=str) for doc in got}
        different = [
            d["latent"] for d in want if by_latent.get(d["latent"], "") != json.dumps(d, sort_keys=True, default=str)
        ]
        lost = len({d["latent"] for d in want} - set(latents))
        duplicated = sum(n - 1 for n in latents.values())
        return {
            "identical": got == want,
            "max_abs_diff": 0.0,
            "lost": lost,
            "duplicated": duplicated,
            "unit": "latents",
            "detail": f"documents differ for latents {different}" if different else "",
        }

    return compare


COMPARE = {
    "send": compare_send,
    "sae": compare_sae,
    "sample": compare_sample,
    "interpret-sqlite": compare_interpret("interpret-sqlite"),
    "interpret-es": compare_interpret("interpret-es"),
}
