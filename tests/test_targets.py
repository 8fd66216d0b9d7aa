import pytest
from torch import nn

from peftlab.core.targets import find_targets, matches
from peftlab.errors import InputError
from tests.conftest import tiny_classifier

QUERY0 = "bert.encoder.layer.0.attention.self.query"


@pytest.mark.parametrize(
    "pattern, expected",
    [
        ("query", True),
        ("self.query", True),
        ("layer.0.*.query", True),
        ("*.query", True),
        (QUERY0, True),
        ("uery", False),
        ("layer.1.*.query", False),
        ("Query", False),
    ],
)
def test_glob_rule_matches_full_name_or_dot_bounded_suffix(pattern, expected):
    assert matches(pattern, QUERY0) is expected


def test_targets_by_name_and_type_in_model_order():
    model = tiny_classifier()
    names = find_targets(model, ["value", "query"], (nn.Linear,))
    assert names == [
        "bert.encoder.layer.0.attention.self.query",
        "bert.encoder.layer.0.attention.self.value",
        "bert.encoder.layer.1.attention.self.query",
        "bert.encoder.layer.1.attention.self.value",
    ]


def test_all_linear_leaves_out_the_task_head():
    model = tiny_classifier()
    names = find_targets(model, ["all-linear"], (nn.Linear,), protected=["classifier"])
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert "classifier" not in names
    assert set(names) == set(linear) - {"classifier"}


def test_protected_modules_are_never_selected():
    model = tiny_classifier()
    with pytest.raises(InputError, match="matches no module"):
        find_targets(model, ["classifier"], (nn.Linear,), protected=["classifier"])


def test_misspelt_pattern_names_the_closest_modules():
    model = tiny_classifier()
    with pytest.raises(InputError) as e:
        find_targets(model, ["qurey"], (nn.Linear,))
    message = str(e.value)
    assert "'qurey' matches no module" in message and "query" in message
    assert "\n" not in message


def test_pattern_of_the_wrong_layer_type_says_which_types_it_found():
    model = tiny_classifier()
    with pytest.raises(InputError, match="matches only BertEmbeddings.*adapts Linear"):
        find_targets(model, ["embeddings"], (nn.Linear,))


def test_empty_target_list_is_an_error():
    with pytest.raises(InputError, match="at least one"):
        find_targets(tiny_classifier(), [], (nn.Linear,))
