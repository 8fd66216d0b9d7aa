"""The baseline and selective methods on the command line: their flags are listed, bad values are one line."""

import pytest

FLAGS = {
    "head": [],
    "last_k": ["--k N"],
    "bitfit": ["--biases PATTERN"],
    "child_tuning_f": ["--p-f X"],
    "child_tuning_d": ["--p-d X", "--fisher-examples N"],
    "fishmask": ["--keep X", "--fisher-examples N"],
}


@pytest.mark.parametrize("method", sorted(FLAGS))
def test_train_help_lists_the_method_flags_and_the_regularisers(cli, method, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli("train", "--method", method, "--help")
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    for flag in FLAGS[method] + ["--l2sp X", "--ewc X", "--ewc-examples N"]:
        assert flag in out, flag
    code, out, _ = cli("methods", method)
    assert code == 0 and "default learning rate" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "last_k", "--k", "5"], "error: k: the model has 2 blocks (bert.encoder.layer), so k can be at"),
        (["--method", "bitfit", "--biases", "qurey"], "error: biases: pattern 'qurey' selects no bias"),
        (["--method", "fishmask", "--keep", "2"], "error: keep: expected a share in (0, 1]"),
        (["--method", "full", "--ewc", "-1"], "error: ewc: expected a number >= 0"),
        (["--method", "head", "--ewc", "1"], "error: ewc: method 'head' trains no pretrained parameter"),
    ],
)
def test_bad_values_are_one_line_errors(cli, tiny_model_dir, tiny_csv, tmp_path, args, message):
    common = ["--model", tiny_model_dir, "--data", tiny_csv, "--max-length", "32", "--out", tmp_path / "r"]
    code, _, err = cli("train", *common, *args)
    assert code == 2 and err.startswith(message) and err.count("\n") == 1, err
