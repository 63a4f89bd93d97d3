"""User errors end in one line that names the root cause and the fix; --debug / NEUROLIGHT_DEBUG=1 keep the trace."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from neurolight.cli.errors import config_error_line
from neurolight.cli.main import main

RECIPE = str(Path(__file__).parents[2] / "configs" / "sae" / "demo.yaml")

UNION_REPORT = """Parser key "model":
  Does not validate against any of the Union subtypes
  Subtypes: [<class 'lightning.pytorch.core.module.LightningModule'>, <class 'NoneType'>]
  Errors:
    - Problem with given class_path 'neurolight.lightning_modules.SparseAutoencoderModule':
        Parser key "dict_vec_size":
          Expected a <class 'int'>. Got value: abc
    - Expected a <class 'NoneType'>
  Given value type: <class 'jsonargparse._util.NestedArg'>
  Given value: NestedArg(key='dict_vec_size', val='abc')"""

CALLBACK_REPORT = """Parser key "trainer.callbacks":
  Does not validate against any of the Union subtypes
  Errors:
    - Problem with given class_path 'neurolight.callbacks.SaeCheckpoint':
        Option 'foo' is not accepted
    - Problem with given class_path 'lightning.Callback':
        Option 'foo' is not accepted
    - Expected a <class 'NoneType'>"""


@pytest.fixture(autouse=True)
def neurolight_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["neurolight"])
    monkeypatch.delenv("NEUROLIGHT_DEBUG", raising=False)


def test_config_error_line__digs_the_root_cause_out_of_the_union_report():
    line = config_error_line(UNION_REPORT, "fit")
    assert line == (
        "model.dict_vec_size (SparseAutoencoderModule): Expected a <class 'int'>. Got value: abc; "
        "the accepted options: neurolight fit --model.help SparseAutoencoderModule"
    )
    assert config_error_line(CALLBACK_REPORT, "fit").startswith(
        "trainer.callbacks (SaeCheckpoint): Option 'foo' is not accepted"
    )
    assert config_error_line("unrecognized arguments: --trainer.max_stepz 3", "fit") == (
        "unrecognized arguments: --trainer.max_stepz 3"
    )


def test_main__a_bad_setting_is_one_line_with_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", RECIPE, "--model.init_args.dict_vec_size", "abc"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("neurolight: error: model.dict_vec_size (SparseAutoencoderModule)")


def test_main__an_unknown_class_lists_the_package_exports(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", RECIPE, "--model", "neurolight.lightning_modules.Nope"])
    err = capsys.readouterr().err.strip()
    assert "no class 'Nope' in neurolight.lightning_modules; it exports" in err and "SendModule" in err


def test_main__a_missing_input_is_one_line_and_the_trace_on_request(tmp_path, capsys, monkeypatch):
    args = ["fit", "--config", RECIPE, "--data.init_args.dataset_path", str(tmp_path / "nope")]
    args += ["--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    message = exit_info.value.code  # printed by Python to stderr, with exit status 1
    assert message.startswith("neurolight: error: tokenized corpus") and "neurolight-tokenize" in message
    assert "\n" not in message and "Traceback" not in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="tokenized corpus"):
        main([*args, "--debug"])
    monkeypatch.setenv("NEUROLIGHT_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        main(args)


def _fake_checkpoint(path, class_path, **hparams):
    import torch

    torch.save({"state_dict": {}, "hyper_parameters": {"_class_path": class_path, **hparams}}, path)
    return str(path)


def test_ckpt_path__a_checkpoint_of_another_module_is_refused_in_one_line(tmp_path):
    ckpt = _fake_checkpoint(tmp_path / "send.ckpt", "neurolight.lightning_modules.SendModule", model_name="x")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", RECIPE, "--ckpt_path", ckpt])
    assert exit_info.value.code.startswith(
        f"neurolight: error: --ckpt_path {ckpt} is a checkpoint of SendModule, but this recipe trains "
        "SparseAutoencoderModule"
    )


def test_ckpt_path__a_checkpoint_of_another_sae_shape_is_refused_in_one_line(tmp_path):
    ckpt = _fake_checkpoint(
        tmp_path / "sae.ckpt", "neurolight.lightning_modules.SparseAutoencoderModule", act_vec_size=576,
        dict_vec_size=999,
    )  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", RECIPE, "--ckpt_path", ckpt])
    assert "was trained with dict_vec_size=999, but the recipe sets dict_vec_size=2304" in exit_info.value.code
