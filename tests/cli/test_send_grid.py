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

from neurolight.cli.main import main as neurolight_main
from neurolight.cli.send_grid import main as grid_main

ROOT = Path(__file__).parents[2]


def run_grid(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """The grid runner in a child process whose stdin (fd 0) is closed: reading it would fail at once."""
    return subprocess.run(
        [sys.executable, "-m", "neurolight.cli.send_grid", *args],
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


def repo_path(path: str) -> str:
    """``path`` relative to the repository when it lies inside it (the runner may print either form)."""
    return str(Path(path).relative_to(ROOT)) if Path(path).is_relative_to(ROOT) else path


def configs(command: list[str]) -> list[str]:
    """The ``--config`` files of a command, in order."""
    return [repo_path(command[i + 1]) for i, item in enumerate(command) if item == "--config"]


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
        "--trainer.precision", "bf16-true", "--data.init_args.seed", "3", "--arms", "send",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    printed = commands(result.stdout)
    pairs = [(m, d) for m in ("smollm2-135m", "org/Tiny-LM") for d in ("triviaqa", "truthfulqa")]
    assert len(printed) == 8
    for (model, dataset), fit, predict in zip(pairs, printed[0::2], printed[1::2]):
        name = f"{model.split('/')[-1]}_{dataset}"
        send_dir = str(out / f"{name}_SEND")
        assert fit[fit.index("fit") - 2 :][:2] == ["-m", "neurolight"]
        assert configs(fit) == [f"configs/send/{dataset}.yaml"]  # no overlay for these two models
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
        assert predict[predict.index("predict") - 1] == "neurolight"
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


def test_dry_run__base_plain_control_and_send_with_the_same_recipe_seed_and_data(tmp_path):
    out = tmp_path / "grid"
    result = run_grid(
        "--dry_run", "--models", "smollm2-135m", "--datasets", "fanoutqa", "--output_dir", str(out),
        "--sensitivity_threshold", "0.2", "--data.init_args.seed", "3",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    by_stage = {}
    for command in commands(result.stdout):
        name = stage(command)
        model = Path(value(command, "--model.init_args.run_name") or value(command, "--model.init_args.model_name"))
        arm = {"smollm2-135m": "base", "smollm2-135m_fanoutqa_plain": "plain"}.get(model.name, "send")
        by_stage[(name, arm)] = command
    assert list(by_stage) == [("fit", "plain"), ("fit", "send"), ("predict", "base"), ("predict", "plain"),
                              ("predict", "send")]  # fmt: skip
    plain, send = by_stage[("fit", "plain")], by_stage[("fit", "send")]
    assert value(plain, "--model.init_args.run_name") == "smollm2-135m_fanoutqa_plain"
    send_callbacks = json.loads(value(send, "--trainer.callbacks"))
    plain_callbacks = json.loads(value(plain, "--trainer.callbacks"))
    assert [c for c in send_callbacks if not c["class_path"].endswith("SensitiveNeuronDropout")] == plain_callbacks
    assert len(plain_callbacks) == len(send_callbacks) - 1
    differ = {"--model.init_args.run_name", "--trainer.default_root_dir", "--trainer.callbacks"}
    differ |= {"--trainer.logger.init_args.name"}
    for flag in {item for item in send if item.startswith("--")} - differ:  # same recipe, seed, data, options
        assert value(plain, flag) == value(send, flag), flag
    assert configs(plain) == configs(send) == ["configs/send/demo.yaml"]
    assert value(by_stage[("predict", "base")], "--model.init_args.model_name") == "smollm2-135m"
    assert value(by_stage[("predict", "plain")], "--model.init_args.model_name") == str(
        out / "smollm2-135m_fanoutqa_plain"
    )
    outputs = {arm: value(by_stage[("predict", arm)], "--trainer.callbacks.init_args.output_file") for arm in
               ("base", "plain", "send")}  # fmt: skip
    assert outputs == {
        "base": str(out / "predictions_smollm2-135m_fanoutqa_base.json"),
        "plain": str(out / "predictions_smollm2-135m_fanoutqa_plain.json"),
        "send": str(out / "predictions_smollm2-135m_fanoutqa.json"),
    }


def test_dry_run__commands_parse_with_the_neurolight_cli(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["neurolight"])
    result = run_grid(
        "--dry_run", "--models", "smollm2-135m", "--datasets", "truthfulqa", "--output_dir", str(tmp_path),
        "--sensitivity_threshold", "0.25", "--num_epochs", "3", "--num_samples", "4", "--max_samples", "40",
        "--arms", "send",
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


def stage(command: list[str]) -> str:
    return command[command.index("-m") + 2]


def test_default_fit_recipe__the_datasets_recipe_then_the_models_overlay_where_one_exists(tmp_path):
    result = run_grid(
        "--dry_run", "--models", "llama2-7b", "smollm2-135m", "org/vicuna-7b",
        "--datasets", "fanoutqa", "coqa", "tydiqa", "--output_dir", str(tmp_path),
        "--arms", "send",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    fits = [command for command in commands(result.stdout) if stage(command) == "fit"]
    recipes = {
        "fanoutqa": "configs/send/demo.yaml",
        "coqa": "configs/send/coqa.yaml",
        "tydiqa": "configs/send/tydiqa.yaml",
    }
    # Only short names have an overlay: smollm2-135m has none, and an HF id is not a short name.
    overlays = {"llama2-7b": ["configs/send/models/llama2-7b.yaml"], "smollm2-135m": [], "org/vicuna-7b": []}
    expected = [[recipes[d], *overlays[m]] for m in overlays for d in recipes]
    assert [configs(fit) for fit in fits] == expected
    shown = [line.split("fit recipe: ")[1] for line in result.stdout.splitlines() if "fit recipe: " in line]
    assert [[repo_path(p) for p in line.split(" + ")] for line in shown] == expected


def test_fit_config__replaces_the_default_for_every_pair_and_composes_in_order(tmp_path):
    one = run_grid(
        "--dry_run", "--models", "llama2-7b", "smollm2-135m", "--datasets", "coqa", "fanoutqa",
        "--fit_config", "configs/send/triviaqa.yaml", "--output_dir", str(tmp_path),
        "--arms", "send",
    )  # fmt: skip
    assert [configs(c) for c in commands(one.stdout) if stage(c) == "fit"] == [["configs/send/triviaqa.yaml"]] * 4
    two = run_grid(
        "--dry_run", "--models", "vicuna-7b", "--datasets", "coqa", "tydiqa",
        "--fit_config", "configs/send/demo.yaml", "configs/trainer/debug.yaml", "--output_dir", str(tmp_path),
        "--arms", "send",
    )  # fmt: skip
    fits = [c for c in commands(two.stdout) if stage(c) == "fit"]
    assert [configs(fit) for fit in fits] == [["configs/send/demo.yaml", "configs/trainer/debug.yaml"]] * 2
    for fit in fits:  # debug.yaml's logger (save_dir runs/debug) is moved into the grid's folder
        assert value(fit, "--trainer.logger.init_args.save_dir") == str(tmp_path / "logs")


def test_sensitivity_threshold__sets_the_callbacks_of_each_pairs_own_recipe(tmp_path):
    result = run_grid(
        "--dry_run", "--models", "smollm2-135m", "vicuna-7b", "--datasets", "fanoutqa", "tydiqa",
        "--sensitivity_threshold", "0.1", "--output_dir", str(tmp_path),
        "--arms", "send",
    )  # fmt: skip
    fits = [c for c in commands(result.stdout) if stage(c) == "fit"]
    for fit, dataset in zip(fits, ["fanoutqa", "tydiqa"] * 2):
        recipe = yaml.safe_load(
            (ROOT / ("configs/send/demo.yaml" if dataset == "fanoutqa" else f"configs/send/{dataset}.yaml")).read_text()
        )
        expected = recipe["trainer"]["callbacks"]
        expected[-1]["init_args"]["sensitivity_threshold"] = 0.1
        assert json.loads(value(fit, "--trainer.callbacks")) == expected  # the demo's has a progress bar, tydiqa's not
        assert value(fit, "--trainer.logger.init_args.save_dir") == str(tmp_path / "logs")


def test_composed_recipes__a_later_file_replaces_the_callbacks_and_merges_a_same_class_logger(tmp_path):
    from neurolight.cli.send_grid_recipes import logger_args, sensitivity_callbacks

    recipe, same_logger, no_logger, other_callbacks = (tmp_path / f"{n}.yaml" for n in "abcd")
    csv = "lightning.pytorch.loggers.CSVLogger"
    recipe.write_text(yaml.safe_dump({"trainer": {
        "logger": {"class_path": csv, "init_args": {"save_dir": "runs/x", "name": "x"}},
        "callbacks": [
            {"class_path": "neurolight.callbacks.SensitiveNeuronDropout", "init_args": {"sensitivity_threshold": 0.3}}
        ],
    }}))  # fmt: skip
    same_logger.write_text(yaml.safe_dump({"trainer": {"logger": {"class_path": csv, "init_args": {"name": "y"}}}}))
    no_logger.write_text(yaml.safe_dump({"trainer": {"logger": False}}))
    other_callbacks.write_text(yaml.safe_dump({"trainer": {"callbacks": [{"class_path": "x.Y"}]}}))
    assert logger_args([recipe, same_logger]) == {"save_dir": "runs/x", "name": "y"}
    assert logger_args([recipe, no_logger]) == {}
    assert logger_args([no_logger, recipe]) == {"save_dir": "runs/x", "name": "x"}
    assert json.loads(sensitivity_callbacks([recipe, same_logger], 0.2))[0]["init_args"]["sensitivity_threshold"] == 0.2
    with pytest.raises(SystemExit, match=r"a\.yaml \+ .*d\.yaml has no callback with init_args\.sensitivity_threshold"):
        sensitivity_callbacks([recipe, other_callbacks], 0.2)


def test_dataset_without_a_recipe__is_refused_before_any_run_naming_the_fix(tmp_path):
    result = run_grid("--datasets", "triviaqa", "squad", "--output_dir", str(tmp_path / "grid"))
    assert result.returncode != 0
    assert "no SEND recipe for dataset 'squad'" in result.stderr and "--fit_config" in result.stderr
    assert "coqa, fanoutqa, triviaqa, truthfulqa, tydiqa" in result.stderr
    assert not (tmp_path / "grid").exists() and "$ " not in result.stdout


def _strings(tree) -> list[str]:
    if isinstance(tree, dict):
        return [s for v in tree.values() for s in _strings(v)]
    if isinstance(tree, list):
        return [s for v in tree for s in _strings(v)]
    return [tree] if isinstance(tree, str) else []


def test_dry_run__every_folder_of_fit_and_predict_lies_under_output_dir(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["neurolight"])
    out = tmp_path / "grid"
    result = run_grid(
        "--dry_run", "--models", "llama2-7b", "--datasets", "tydiqa", "--output_dir", str(out), "--arms", "send"
    )  # fmt: skip
    resolved = {}
    for command in commands(result.stdout):
        with pytest.raises(SystemExit):
            neurolight_main([*command[command.index("-m") + 2 :], "--print_config"])
        printed = capsys.readouterr().out
        lines = [line for line in printed.splitlines() if not line.startswith("[")]  # Lightning's log lines
        resolved[stage(command)] = yaml.safe_load("\n".join(lines))
    fit, predict = resolved["fit"], resolved["predict"]
    logs = out / "logs" / "llama2-7b_tydiqa"
    assert fit["trainer"]["default_root_dir"] == str(logs)
    assert fit["trainer"]["logger"]["init_args"]["save_dir"] == str(out / "logs")
    assert fit["trainer"]["logger"]["init_args"]["name"] == "llama2-7b_tydiqa"
    assert fit["model"]["init_args"]["output_dir"] == str(out)
    assert predict["trainer"]["default_root_dir"] == str(logs / "predict")  # its config.yaml goes there
    assert predict["trainer"]["callbacks"][-1]["init_args"]["output_file"] == str(
        out / "predictions_llama2-7b_tydiqa.json"
    )
    for config in (fit, predict):  # no recipe folder (runs/send, runs/demo/send, output) is left
        assert not [s for s in _strings(config) if s.startswith(("runs/", "output"))]
    # The composed tydiqa recipe + llama2-7b overlay, not the SmolLM2 demo:
    assert fit["trainer"]["precision"] == "bf16-true" and fit["model"]["init_args"]["freeze_layers"] == 13
    assert fit["model"]["init_args"]["overwrite"] is False
    assert fit["data"]["init_args"]["max_length"] == 512 and fit["data"]["init_args"]["use_context"] is True
    assert fit["model"]["init_args"]["model_name"] == fit["data"]["init_args"]["model_name"] == "llama2-7b"


def test_grid__a_real_fit_and_predict_on_a_tiny_model_write_nothing_outside_output_dir(tiny_model_dir, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    records = tmp_path / "tqa.jsonl"
    words = "red green blue river mountain city king queen".split()
    records.write_text("".join(
        json.dumps({"question": f"Which {words[i % 8]} {words[(i * 3) % 8]}?", "question_id": f"q{i}",
                    "answer": {"value": words[i % 5], "aliases": []}}) + "\n"
        for i in range(20)
    ))  # fmt: skip
    result = subprocess.run(
        [
            sys.executable, "-m", "neurolight.cli.send_grid", "--models", str(tiny_model_dir),
            "--datasets", "triviaqa", "--output_dir", "grid", "--device", "cpu", "--max_samples", "20",
            "--batch_size", "4", "--max_length", "48", "--num_epochs", "1", "--num_samples", "2",
            "--num_generations", "0", "--max_new_tokens", "3", "--quiet",
            "--trainer.precision", "32-true", "--model.init_args.freeze_layers", "0",
            "--data.init_args.data_path", str(records), "--predict_args", "--model.init_args.judge_model null",
        ],
        cwd=work, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    name = f"{tiny_model_dir.name}_triviaqa"
    out = work / "grid"
    assert [p.name for p in work.iterdir()] == ["grid"]  # nothing in the working directory (runs/...) but the grid
    assert (out / f"{name}_SEND" / "model.safetensors").is_file()
    for suffix in ("", "_plain", "_base"):  # SEND, the plain fine-tuning control and the base model, scored alike
        assert json.loads((out / f"predictions_{name}{suffix}.json").read_text())["aggregate"]["num_questions"] == 2
    callbacks = {
        arm: json.loads((out / f"{name}_{arm}" / "training_config.json").read_text())["callbacks"]
        for arm in ("SEND", "plain")
    }
    assert "SensitiveNeuronDropout" in callbacks["SEND"] and "SensitiveNeuronDropout" not in callbacks["plain"]
    assert callbacks["SEND"]["SensitiveNeuronDropout"]["sensitivity_threshold"] == 0.3
    assert "models side by side" in result.stdout and "predictions_" in result.stdout
    assert (out / "logs" / name / "predict" / "config.yaml").is_file()
    assert list((out / "logs" / name).glob("version_*/config.yaml"))
    # The recipe is found in the installed configs package from any working directory.
    assert json.loads((out / "grid_summary.json").read_text())[0]["fit_configs"] == [
        str(ROOT / "configs/send/triviaqa.yaml")
    ]
    fit_log = (out / "logs" / f"{name}_fit.log").read_text()
    assert f"SEND model written to {out.resolve() / f'{name}_SEND'}\n" in fit_log


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
    out.write_text(json.dumps({"aggregate": {"exact_match": 0.25, "f1": 0.5}, "results": []}))
print(args[0], "done")
"""


def test_grid__a_failed_run_does_not_stop_the_others_and_the_summary_marks_it(tmp_path):
    fake = tmp_path / "fake_neurolight.py"
    fake.write_text(FAKE_NEUROLIGHT)
    out = tmp_path / "grid"
    # Local model folders (the grid refuses names that are neither folders, short names nor hub ids).
    names = {name: str(tmp_path / name) for name in ("bad-model", "good", "slow-model")}
    for folder in names.values():
        Path(folder).mkdir()
    result = run_grid(
        "--models", *names.values(), "--datasets", "d1", "d2", "--output_dir", str(out),
        "--fit_config", "configs/send/demo.yaml",
        "--neurolight_cmd", f"{shlex.quote(sys.executable)} {shlex.quote(str(fake))}", "--timeout_s", "3", "--quiet",
        "--arms", "send",
    )  # fmt: skip
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-2000:]
    table = result.stdout[result.stdout.index("pair") :]
    rows = {line.split("  ")[0]: line for line in table.splitlines()[2:] if " x " in line.split("  ")[0]}
    assert set(rows) == {f"{m} x {d}" for m in names.values() for d in ("d1", "d2")}
    for dataset in ("d1", "d2"):
        assert "FAILED (fit, exit 3)" in rows[f"{names['bad-model']} x {dataset}"]
        cells = rows[f"{names['good']} x {dataset}"].split()  # pair (3 words), status, wall time (2), EM, F1
        assert cells[3] == "ok" and cells[5] == "s" and cells[-2:] == ["0.250", "0.500"]
        assert "FAILED (fit, timeout after 3 s)" in rows[f"{names['slow-model']} x {dataset}"]
        assert (out / f"predictions_good_{dataset}.json").is_file()
        assert not (out / f"predictions_bad-model_{dataset}.json").exists()  # no predict after a failed fit
    assert "model 'bad-model' not found" in result.stdout  # --quiet shows the failed run's log tail
    summary = json.loads((out / "grid_summary.json").read_text())
    assert [run["status"] for run in summary] == ["FAILED (fit, exit 3)"] * 2 + ["ok"] * 2 + [
        "FAILED (fit, timeout after 3 s)"
    ] * 2
    assert summary[2]["aggregate"]["send"]["f1"] == 0.5
    assert (out / "logs" / "bad-model_d1_fit.log").read_text().startswith("$ ")


@pytest.mark.parametrize("model", ["llama9", "runs/missing/model_SEND"])
def test_dry_run__refuses_an_unknown_model_in_one_line(model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        grid_main(["--dry_run", "--models", model, "--datasets", "fanoutqa"])
    message = str(exit_info.value.code)
    assert message.startswith("neurolight-send-grid: error: --models: ") and model in message and "\n" not in message
