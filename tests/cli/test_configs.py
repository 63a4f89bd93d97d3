"""Every recipe under configs/ parses with the `neurolight` CLI, alone and with each trainer overlay, and the CLI's
help shows the docstrings of the model and data arguments."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from neurolight.cli.main import main, run
from tests.helpers.sae import build_tiny_corpus

ROOT = Path(__file__).parents[2]
CONFIGS = ROOT / "configs"
OVERLAYS = sorted((CONFIGS / "trainer").glob("*.yaml"))
HARVEST_RECIPES = sorted(CONFIGS.glob("*/harvest*.yaml"))  # neurolight-harvest's, not LightningCLI's
RECIPES = sorted(
    p for p in CONFIGS.glob("*/**/*.yaml") if p.relative_to(CONFIGS).parts[0] != "trainer" and p not in HARVEST_RECIPES
)
BASE_RECIPE = CONFIGS / "sae" / "demo.yaml"
LOG_LINE = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,]+\] \[[A-Z]+\]")


@pytest.fixture(autouse=True)
def neurolight_argv(monkeypatch):
    """LightningCLI warns when sys.argv (pytest's here) and ``args`` are both given."""
    monkeypatch.setattr(sys, "argv", ["neurolight"])


def run_cli(args: list[str], capsys) -> str:
    """stdout of `neurolight <args>` run in this process, for commands that print and exit (help, print_config)."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    captured = capsys.readouterr()
    assert exit_info.value.code in (0, None), captured.err[-2000:]
    return captured.out


def print_config(configs: list[Path], capsys, *extra: str) -> dict:
    args = ["fit"]
    for config in configs:
        args += ["--config", str(config)]
    out = run_cli([*args, *extra, "--print_config"], capsys)
    # Importing DeepSpeed (for the strategy class) logs "[<date>] [WARNING] ..." to stdout; that is not config.
    return yaml.safe_load("\n".join(line for line in out.splitlines() if not LOG_LINE.match(line)))


def assert_contains(actual, expected, where: str = "") -> None:
    """Every value set in ``expected`` (a parsed overlay) is what the composed config holds."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict), f"{where}: expected a mapping, got {actual!r}"
        for key, value in expected.items():
            assert key in actual, f"{where}.{key} missing from the composed config"
            assert_contains(actual[key], value, f"{where}.{key}")
    else:
        assert actual == expected, f"{where}: composed {actual!r}, overlay sets {expected!r}"


def rel(path: Path) -> str:
    return str(path.relative_to(CONFIGS))


def test_configs__recipes_and_overlays_are_found():
    assert BASE_RECIPE in RECIPES
    assert {p.stem for p in OVERLAYS} >= {"ddp", "deepspeed", "debug"}


@pytest.mark.parametrize("recipe", RECIPES, ids=rel)
def test_recipe__parses_with_print_config(recipe, capsys):
    written = yaml.safe_load(recipe.read_text())
    config = print_config([recipe], capsys)
    for section in ("model", "data"):
        if isinstance(written.get(section), dict) and "class_path" in written[section]:
            assert config[section]["class_path"].endswith(written[section]["class_path"].rsplit(".", 1)[-1])


@pytest.mark.parametrize("recipe", HARVEST_RECIPES, ids=rel)
def test_harvest_recipe__parses_with_print_config(recipe, capsys):
    from neurolight.cli.harvest import main as harvest

    with pytest.raises(SystemExit) as exit_info:
        harvest(["--config", str(recipe), "--print_config"])
    assert exit_info.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)
    assert {key: config[key] for key in yaml.safe_load(recipe.read_text())} == yaml.safe_load(recipe.read_text())


@pytest.mark.parametrize("overlay", OVERLAYS, ids=rel)
def test_trainer_overlay__composes_with_a_recipe_and_keeps_its_callbacks(overlay, capsys):
    written = yaml.safe_load(overlay.read_text())
    assert set(written) == {"trainer"}, f"{rel(overlay)} should only set trainer options"
    config = print_config([BASE_RECIPE, overlay], capsys)
    assert_contains(config["trainer"], written["trainer"], "trainer")
    recipe_callbacks = yaml.safe_load(BASE_RECIPE.read_text())["trainer"]["callbacks"]
    assert [c["class_path"] for c in config["trainer"]["callbacks"]] == [c["class_path"] for c in recipe_callbacks]


@pytest.mark.parametrize("overlay", OVERLAYS, ids=rel)
def test_trainer_overlay__holds_no_list_a_later_file_would_replace(overlay):
    def lists(node, where: str):
        if isinstance(node, list):
            yield where
        elif isinstance(node, dict):
            for key, value in node.items():
                yield from lists(value, f"{where}.{key}")

    # A list here would replace the recipe's whole list (callbacks), not extend it.
    assert list(lists(yaml.safe_load(overlay.read_text()), rel(overlay))) == []


def test_deepspeed_overlay__stage_3_from_the_command_line(capsys):
    config = print_config(
        [BASE_RECIPE, CONFIGS / "trainer" / "deepspeed.yaml"], capsys, "--trainer.strategy.init_args.stage", "3"
    )
    strategy = config["trainer"]["strategy"]
    assert strategy["class_path"] == "lightning.pytorch.strategies.DeepSpeedStrategy"
    assert strategy["init_args"]["stage"] == 3
    assert config["trainer"]["precision"] == "bf16-mixed"


def test_debug_overlay__runs_a_short_fit_of_the_demo_recipe(tmp_path, tiny_model_dir):
    corpus = build_tiny_corpus(tmp_path, tiny_model_dir)
    small = {  # the demo recipe shrunk to the tiny Llama (hidden 64) and its 16-token corpus
        "--trainer.accelerator": "cpu",
        "--trainer.default_root_dir": str(tmp_path / "run"),
        "--trainer.logger.init_args.save_dir": str(tmp_path / "run"),
        "--data.dataset_path": str(corpus),
        "--data.model_name": str(tiny_model_dir),
        "--data.layer_id": "1",
        "--data.num_tokens": "16",
        "--data.batch_size_llm": "8",
        "--data.batch_size_autoencoder": "64",
        "--data.num_batches_preload": "6",
        "--data.val_contexts": "16",
        "--model.act_vec_size": "64",
        "--model.dict_vec_size": "256",
        "--model.architecture.init_args.k": "8",
    }
    args = ["fit", "--config", str(BASE_RECIPE), "--config", str(CONFIGS / "trainer" / "debug.yaml")]
    cli = run([*args, *(item for pair in small.items() for item in pair)])
    assert cli.trainer.global_step == 20
    assert "val/ce_loss_recovered" in cli.trainer.callback_metrics
    assert len(list((tmp_path / "run").rglob("last.ckpt"))) == 1


def test_help__model_and_data_arguments_show_their_docstrings(capsys):
    # jsonargparse lists a subclass's init arguments under `--model.help CLASS` (`--model CLASS --help` prints
    # only the generic help).
    model_help = run_cli(["fit", "--model.help", "SparseAutoencoderModule"], capsys)
    assert "--model.dict_vec_size" in model_help and "Number of latents" in model_help
    data_help = run_cli(["fit", "--data.help", "ActivationDataModule"], capsys)
    assert "--data.dataset_path" in data_help and "neurolight-tokenize" in data_help


def test_help__architecture_settings_show_their_docstrings(capsys):
    model_help = run_cli(["fit", "--model.help", "SparseAutoencoderModule"], capsys)
    assert "--model.architecture" in model_help and "neurolight.lightning_modules.JumpReLU" in model_help
    topk_help = run_cli(["fit", "--model", "SparseAutoencoderModule", "--model.architecture.help", "TopK"], capsys)
    assert "--architecture.k K" in topk_help and "Latents kept active per token" in topk_help


@pytest.mark.parametrize(
    ("written", "expected"), [("BatchTopK", "BatchTopK"), ({"class_path": "JumpReLU"}, "JumpReLU")]
)
def test_architecture__short_forms_take_the_default_settings(written, expected, tmp_path, capsys):
    overlay = tmp_path / "architecture.yaml"
    overlay.write_text(yaml.safe_dump({"model": {"init_args": {"architecture": written}}}))
    architecture = print_config([BASE_RECIPE, overlay], capsys)["model"]["init_args"]["architecture"]
    assert architecture["class_path"] == f"neurolight.lightning_modules.{expected}"
    assert "k" not in architecture["init_args"] or expected == "BatchTopK"


def test_architecture__another_class_drops_the_recipe_settings_and_foreign_settings_are_refused(tmp_path, capsys):
    # The demo recipe sets TopK's k: 32; switching the class must not keep it.
    config = print_config([BASE_RECIPE], capsys, "--model.architecture", "ReLU")
    assert config["model"]["init_args"]["architecture"]["init_args"] == {
        "l1_coefficient": 5.0,
        "normalize_decoder": True,
    }
    overlay = tmp_path / "relu_with_k.yaml"
    relu_with_k = {"class_path": "neurolight.lightning_modules.ReLU", "init_args": {"k": 32}}
    overlay.write_text(yaml.safe_dump({"model": {"init_args": {"architecture": relu_with_k}}}))
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(BASE_RECIPE), "--config", str(overlay), "--print_config"])
    assert "Option 'k' is not accepted" in capsys.readouterr().err


def test_python_m_neurolight__help_lists_the_subcommands_outside_the_repository(tmp_path):
    # Run from elsewhere: the installed namespace, not the repository's folders, must provide the command.
    result = subprocess.run(
        [sys.executable, "-m", "neurolight", "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    for command in ("fit", "validate", "predict"):
        assert command in result.stdout
