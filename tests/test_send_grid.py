"""neurolight-send-grid: the fit and predict commands of every model x dataset pair, run without a keyboard, past
failures, with a summary table and a failing exit code."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lightning_modules.cli import main as neurolight_main

ROOT = Path(__file__).parents[1]


def run_grid(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """The grid runner in a child process whose stdin (fd 0) is closed: reading it would fail at once."""
    return subprocess.run(
        [sys.executable, "-m", "lightning_modules.send_grid", *args],
        cwd=ROOT,
        preexec_fn=lambda: os.close(0),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def commands(stdout: str) -> list[list[str]]:
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("$ ")]


def value(command: list[str], flag: str) -> str | None:
    return command[command.index(flag) + 1] if flag in command else None


def test_dry_run__prints_fit_then_predict_for_2_models_x_2_datasets_without_reading_stdin(tmp_path):
    out = tmp_path / "grid"
    result = run_grid(
        "--dry_run",
        "--models", "smollm2-135m", "org/Tiny-LM",
        "--datasets", "triviaqa", "truthfulqa",
        "--output_dir", str(out),
        "--max_samples", "50", "--num_epochs", "2", "--learning_rate", "5e-05", "--sensitivity_threshold", "0.2",
        "--batch_size", "4", "--max_length", "128", "--device", "cuda",
        "--num_samples", "7", "--max_new_tokens", "16", "--temperature", "0.7", "--num_generations", "5",
        "--trainer.precision", "bf16-true", "--data.init_args.seed", "3",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    printed = commands(result.stdout)
    pairs = [(m, d) for m in ("smollm2-135m", "org/Tiny-LM") for d in ("triviaqa", "truthfulqa")]
    assert len(printed) == 8
    for (model, dataset), fit, predict in zip(pairs, printed[0::2], printed[1::2]):
        name = f"{model.split('/')[-1]}_{dataset}"
        send_dir = str(out / f"{name}_SEND")
        assert fit[fit.index("fit") - 2 :][:2] == ["-m", "lightning_modules"]
        assert value(fit, "--config").endswith("configs/send/demo.yaml")
        assert value(fit, "--model.init_args.model_name") == value(fit, "--data.init_args.model_name") == model
        assert value(fit, "--data.init_args.dataset") == value(predict, "--data.init_args.dataset") == dataset
        assert value(fit, "--model.init_args.output_dir") == str(out)
        assert value(fit, "--model.init_args.run_name") == f"{name}_SEND"
        assert value(fit, "--trainer.max_epochs") == "2" and value(fit, "--model.init_args.learning_rate") == "5e-05"
        callbacks = json.loads(value(fit, "--trainer.callbacks"))
        send = [c for c in callbacks if c["class_path"].endswith("SensitiveNeuronDropout")]
        assert send[0]["init_args"]["sensitivity_threshold"] == 0.2
        assert value(fit, "--trainer.precision") == "bf16-true" and "--trainer.precision" not in predict
        for command in (fit, predict):  # the data split and the device are the same for both
            assert value(command, "--data.init_args.max_samples") == "50"
            assert value(command, "--data.init_args.max_length") == "128"
            assert value(command, "--data.init_args.batch_size") == "4"
            assert value(command, "--data.init_args.seed") == "3"
            assert value(command, "--trainer.accelerator") == "gpu"
        assert predict[predict.index("predict") - 1] == "lightning_modules"
        assert value(predict, "--config").endswith("configs/send/generate.yaml")
        assert value(predict, "--model.init_args.model_name") == value(predict, "--data.init_args.model_name")
        assert value(predict, "--model.init_args.model_name") == send_dir
        assert value(predict, "--trainer.callbacks.init_args.output_file") == str(out / f"predictions_{name}.json")
        assert value(predict, "--data.init_args.num_samples") == "7"
        assert value(predict, "--model.init_args.max_new_tokens") == "16"
        assert value(predict, "--model.init_args.temperature") == "0.7"
        assert value(predict, "--model.init_args.num_generations") == "5"
        assert "--trainer.max_epochs" not in predict and "--model.init_args.learning_rate" not in predict
    assert not out.exists(), "a dry run writes nothing"


def test_dry_run__commands_parse_with_the_neurolight_cli(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["neurolight"])
    result = run_grid(
        "--dry_run", "--models", "smollm2-135m", "--datasets", "truthfulqa", "--output_dir", str(tmp_path),
        "--sensitivity_threshold", "0.25", "--num_epochs", "3", "--num_samples", "4", "--max_samples", "40",
    )  # fmt: skip
    fit, predict = commands(result.stdout)
    configs = {}
    for command in (fit, predict):
        with pytest.raises(SystemExit) as exit_info:
            neurolight_main([*command[command.index("-m") + 2 :], "--print_config"])
        captured = capsys.readouterr().out
        assert exit_info.value.code in (0, None)
        configs[command[3]] = yaml.safe_load(
            "\n".join(line for line in captured.splitlines() if not line.startswith("["))
        )
    fit_config, predict_config = configs["fit"], configs["predict"]
    assert fit_config["trainer"]["max_epochs"] == 3
    assert fit_config["model"]["init_args"]["run_name"] == "smollm2-135m_truthfulqa_SEND"
    thresholds = [c["init_args"].get("sensitivity_threshold") for c in fit_config["trainer"]["callbacks"]]
    assert 0.25 in thresholds
    assert predict_config["model"]["init_args"]["model_name"] == str(tmp_path / "smollm2-135m_truthfulqa_SEND")
    writer = predict_config["trainer"]["callbacks"][-1]
    assert writer["init_args"]["output_file"] == str(tmp_path / "predictions_smollm2-135m_truthfulqa.json")
    assert fit_config["data"]["init_args"]["max_samples"] == predict_config["data"]["init_args"]["max_samples"] == 40
    assert predict_config["data"]["init_args"]["num_samples"] == 4


FAKE_NEUROLIGHT = """
import json, sys, time
from pathlib import Path

args = sys.argv[1:]
def value(flag):
    return args[args.index(flag) + 1]

assert sys.stdin.read() == "", "the runner must give its children no input"
model = value("--model.init_args.model_name")
if "bad-model" in model:
    print("Traceback: model 'bad-model' not found", file=sys.stderr)
    sys.exit(3)
if "slow-model" in model:
    time.sleep(60)
if args[0] == "fit":
    Path(value("--model.init_args.output_dir"), value("--model.init_args.run_name")).mkdir(parents=True)
else:
    out = Path(value("--trainer.callbacks.init_args.output_file"))
    out.write_text(json.dumps({"aggregate": {"exact_match": 0.25, "f1": 0.5, "eigenscore_auroc": None}}))
print(args[0], "done")
"""


def test_grid__a_failed_run_does_not_stop_the_others_and_the_summary_marks_it(tmp_path):
    fake = tmp_path / "fake_neurolight.py"
    fake.write_text(FAKE_NEUROLIGHT)
    out = tmp_path / "grid"
    result = run_grid(
        "--models", "bad-model", "good", "slow-model", "--datasets", "d1", "d2", "--output_dir", str(out),
        "--neurolight_cmd", f"{shlex.quote(sys.executable)} {shlex.quote(str(fake))}", "--timeout_s", "3", "--quiet",
    )  # fmt: skip
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-2000:]
    table = result.stdout[result.stdout.index("pair") :]
    rows = {line.split("  ")[0]: line for line in table.splitlines()[2:] if " x " in line.split("  ")[0]}
    assert set(rows) == {f"{m} x {d}" for m in ("bad-model", "good", "slow-model") for d in ("d1", "d2")}
    for dataset in ("d1", "d2"):
        assert "FAILED (fit, exit 3)" in rows[f"bad-model x {dataset}"]
        cells = rows[f"good x {dataset}"].split()  # pair (3 words), status, wall time (2), EM, F1, AUROC
        assert cells[3] == "ok" and cells[5] == "s" and cells[-3:] == ["0.250", "0.500", "-"]
        assert "FAILED (fit, timeout after 3 s)" in rows[f"slow-model x {dataset}"]
        assert (out / f"predictions_good_{dataset}.json").is_file()
        assert not (out / f"predictions_bad-model_{dataset}.json").exists()  # no predict after a failed fit
    assert "model 'bad-model' not found" in result.stdout  # --quiet shows the failed run's log tail
    summary = json.loads((out / "grid_summary.json").read_text())
    assert [run["status"] for run in summary] == ["FAILED (fit, exit 3)"] * 2 + ["ok"] * 2 + [
        "FAILED (fit, timeout after 3 s)"
    ] * 2
    assert summary[2]["aggregate"]["f1"] == 0.5
    assert (out / "logs" / "bad-model_d1_fit.log").read_text().startswith("$ ")
