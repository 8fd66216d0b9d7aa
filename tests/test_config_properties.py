"""Property-based tests of the config parser: any valid flat config round-trips through TOML, YAML and JSON, and
any unknown key is refused by name."""

import json
import string

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peftlab.cli import read_config_file
from peftlab.errors import InputError
from peftlab.run import split_config

names = st.text(string.ascii_lowercase + "_", min_size=1, max_size=12).filter(lambda s: s.strip("_"))
patterns = st.lists(st.text(string.ascii_lowercase + ".*", min_size=1, max_size=10), min_size=1, max_size=3)

valid = st.fixed_dictionaries(
    {},
    optional={
        "model": names,
        "data": names,
        "epochs": st.floats(0.1, 10, allow_nan=False),
        "batch_size": st.integers(1, 512),
        "lr": st.floats(1e-6, 1.0, allow_nan=False),
        "seed": st.integers(0, 2**31 - 1),
        "schedule": st.sampled_from(["linear", "cosine", "constant"]),
        "precision": st.sampled_from(["fp32", "bf16"]),
        "max_length": st.integers(8, 512),
        "r": st.integers(1, 64),
        "alpha": st.floats(0.5, 128, allow_nan=False),
        "dropout": st.floats(0, 0.9, allow_nan=False),
        "rslora": st.booleans(),
        "targets": patterns,
    },
)


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(value)  # a TOML basic string is a JSON string for these characters


def write(path, fmt, values):
    if fmt == "toml":
        path.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in values.items()))
    elif fmt == "yaml":
        path.write_text(yaml.safe_dump(values))
    else:
        path.write_text(json.dumps(values))


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(values=valid, fmt=st.sampled_from(["toml", "yaml", "json"]))
def test_valid_configs_round_trip(tmp_path, values, fmt):
    path = tmp_path / f"c.{fmt}"
    write(path, fmt, values)
    read = read_config_file(str(path))
    assert read == values
    options, train, method = split_config(read, str(path))
    merged = {**vars(options), **vars(train), **vars(method)}
    for key, value in values.items():
        assert merged[key] == pytest.approx(value) if isinstance(value, float) else merged[key] == value


known = {"model", "data", "method", "out", "epochs", "batch_size", "lr", "seed", "r", "alpha", "dropout"}


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(key=names.filter(lambda k: k not in known and len(k) > 2), fmt=st.sampled_from(["toml", "yaml", "json"]))
def test_unknown_keys_are_refused_by_name(tmp_path, key, fmt):
    path = tmp_path / f"c.{fmt}"
    write(path, fmt, {"r": 4, key: 1})
    try:
        split_config(read_config_file(str(path)), str(path))
    except InputError as e:
        assert f"unknown option {key!r}" in str(e) and str(path) in str(e)
    else:
        # the key happened to be a real option (hypothesis found one): it must then be a known field
        from dataclasses import fields

        from peftlab.methods.lora import LoraConfig
        from peftlab.run import RunOptions
        from peftlab.train.loop import TrainSettings

        assert key in {f.name for c in (RunOptions, TrainSettings, LoraConfig) for f in fields(c)}


@given(st.binary(min_size=1, max_size=200))
@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
def test_arbitrary_bytes_never_crash_the_parser(tmp_path, blob):
    for fmt in ("toml", "yaml", "json"):
        path = tmp_path / f"c.{fmt}"
        path.write_bytes(blob)
        try:
            values = read_config_file(str(path))
            split_config(values, str(path))
        except InputError:
            pass
