"""The command line: engine verbs at the top, one group per method, each verb answering --help."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from sam4med.cli import app

GROUPS = {"eval": ["benchmark", "report"], "samaug": ["priors", "train", "predict", "evaluate"],
          "samunet": ["train"]}


def test_top_level_lists_engine_verbs_and_method_groups():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in ["models", "segment", "segment-volume", "demo", *GROUPS]:
        assert name in result.output
    assert CliRunner().invoke(app, ["benchmark", "--help"]).exit_code == 2  # no flat method verbs any more


@pytest.mark.parametrize("group", GROUPS)
def test_each_group_lists_its_verbs_and_each_verb_has_help(group):
    result = CliRunner().invoke(app, [group, "--help"])
    assert result.exit_code == 0 and all(verb in result.output for verb in GROUPS[group])
    for verb in GROUPS[group]:
        assert CliRunner().invoke(app, [group, verb, "--help"]).exit_code == 0


def test_models_lists_the_registry():
    result = CliRunner().invoke(app, ["models"])
    assert result.exit_code == 0 and "litemedsam" in result.output and "bundled" in result.output


def test_bad_input_in_a_group_verb_is_one_line_with_exit_2(tmp_path):
    result = CliRunner().invoke(app, ["samunet", "train", "--method", "decoder", "--data", str(tmp_path / "none"), "--out",
                                      str(tmp_path / "run")])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "none" in lines[0]


@pytest.mark.parametrize(("arguments", "named"), [
    (["--jitter", "nan"], "--jitter"),
    (["--max-images", "-1"], "--max-images"),
    (["--max-objects", "-1"], "--max-objects"),
    (["--rounds", "-1"], "--rounds"),
    (["--mask-rule", "biggest"], "--mask-rule"),
    (["--modes", "points0"], "points0"),
    (["--click-rule", "nearest"], "--click-rule"),
    (["--threads", "-3"], "--threads"),
    (["--split", "holdout"], "--split"),
])
def test_bad_benchmark_settings_stop_before_anything_is_written(tmp_path, arguments, named):
    """Checked where they enter: one line naming the argument, exit 2, and no protocol.json or results."""
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    result = CliRunner().invoke(app, ["eval", "benchmark", "--data", str(data), "--out", str(tmp_path / "out"),
                                      *arguments])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], lines
    assert not (tmp_path / "out").exists()
