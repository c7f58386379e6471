"""Tests of icstools.sites: listing and selecting sites, finding tensors, unit layout."""

from __future__ import annotations

import difflib
import math

import pytest
import torch
from torch import nn

from icstools.functional.statistics import SIGMOID_SATURATION, TANH_SATURATION
from icstools.sites import (
    ACTIVATION_TYPES,
    Site,
    SiteSelectionError,
    default_unit_dim,
    find_tensor,
    list_sites,
    select_sites,
)


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 3), nn.Sigmoid(), nn.Linear(3, 2), nn.Tanh())


class Nested(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 3), nn.BatchNorm2d(2), nn.ReLU()
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8, 3), nn.Sigmoid())
        self.fc_out = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(self.head(self.features(x)))


NESTED_MODULES = [
    "features",
    "features.0",
    "features.1",
    "features.2",
    "features.3",
    "features.4",
    "head",
    "head.0",
    "head.1",
    "head.2",
    "fc_out",
]


def names(sites: list[Site]) -> list[str]:
    return [s.name for s in sites]


# --------------------------------------------------------------------------------------------
# list_sites
# --------------------------------------------------------------------------------------------


def test_list_sites_sequential():
    assert list_sites(mlp()) == [
        "0:input",
        "0:output",
        "1:input",
        "1:output",
        "2:input",
        "2:output",
        "3:input",
        "3:output",
    ]
    assert list_sites(mlp(), roles=("input",)) == ["0:input", "1:input", "2:input", "3:input"]
    assert list_sites(mlp(), roles=["output"]) == ["0:output", "1:output", "2:output", "3:output"]


def test_list_sites_nested_in_module_order_without_the_root():
    m = Nested()
    m(torch.zeros(2, 1, 6, 6))  # the model runs (sanity of the fixture)
    assert list_sites(m) == [f"{n}:{r}" for n in NESTED_MODULES for r in ("input", "output")]
    assert ":input" not in list_sites(m)


def test_list_sites_shared_module_once():
    shared = nn.Linear(2, 2)
    m = nn.Sequential(shared, nn.ReLU(), shared)
    assert list_sites(m, roles=("output",)) == ["0:output", "1:output"]


@pytest.mark.parametrize("roles", [(), ("inputs",), ("input", "grad")])
def test_list_sites_bad_roles(roles):
    with pytest.raises(SiteSelectionError, match="not valid"):
        list_sites(mlp(), roles=roles)


# --------------------------------------------------------------------------------------------
# select_sites
# --------------------------------------------------------------------------------------------


def test_default_selects_inputs_of_nonlinearities():
    assert names(select_sites(mlp())) == ["1:input", "3:input"]
    assert names(select_sites(Nested())) == ["features.1:input", "features.4:input", "head.2:input"]
    assert names(select_sites(Nested(), role="output")) == [
        "features.1:output",
        "features.4:output",
        "head.2:output",
    ]


def test_default_covers_all_activation_types():
    m = nn.Sequential(*(t() if t is not nn.Threshold else t(0.1, 0.0) for t in ACTIVATION_TYPES))
    assert len(select_sites(m)) == len(ACTIVATION_TYPES)


def test_default_without_nonlinearity_is_an_error():
    with pytest.raises(SiteSelectionError, match="sites="):
        select_sites(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)))


def test_model_without_submodules_is_an_error():
    with pytest.raises(SiteSelectionError, match="no submodules"):
        select_sites(nn.Linear(2, 2), nn.Linear)


def test_select_by_type():
    m = Nested()
    assert names(select_sites(m, nn.Linear)) == ["head.1:output", "fc_out:output"]
    assert names(select_sites(m, nn.Conv2d, role="input")) == [
        "features.0:input",
        "features.2:input",
    ]
    assert names(select_sites(m, nn.Sequential, role=("output", "input"))) == [
        "features:input",
        "features:output",
        "head:input",
        "head:output",
    ]

    # subclasses match (isinstance)
    class MySigmoid(nn.Sigmoid):
        pass

    m2 = nn.Sequential(nn.Linear(2, 2), MySigmoid())
    assert names(select_sites(m2, nn.Sigmoid, role="input")) == ["1:input"]


def test_select_type_not_present():
    with pytest.raises(SiteSelectionError, match=r"Conv1d.*Linear"):
        select_sites(mlp(), nn.Conv1d)


def test_select_by_exact_name_is_not_a_prefix_match():
    m = nn.Sequential(*[nn.Linear(2, 2) for _ in range(12)])
    assert names(select_sites(m, "1")) == ["1:output"]
    assert names(select_sites(Nested(), "head")) == ["head:output"]
    assert names(select_sites(Nested(), "head.1", role="input")) == ["head.1:input"]


def test_select_by_glob():
    m = Nested()
    assert names(select_sites(m, "features.*")) == [f"features.{i}:output" for i in range(5)]
    assert names(select_sites(m, "features.*:input")) == [f"features.{i}:input" for i in range(5)]
    assert names(select_sites(m, "head.[12]")) == ["head.1:output", "head.2:output"]
    assert names(select_sites(m, "*", role="input")) == [f"{n}:input" for n in NESTED_MODULES]


def test_select_by_name_and_role():
    m = Nested()
    assert names(select_sites(m, "fc_out:input")) == ["fc_out:input"]
    assert names(select_sites(m, "fc_out:*")) == ["fc_out:input", "fc_out:output"]
    # an explicit role in the selector wins over role=
    assert names(select_sites(m, "fc_out:input", role="output")) == ["fc_out:input"]


def test_select_by_predicate():
    m = Nested()
    got = select_sites(m, lambda n, mod: n.startswith("features") and isinstance(mod, nn.ReLU))
    assert names(got) == ["features.1:output", "features.4:output"]
    with pytest.raises(SiteSelectionError, match="matched no module"):
        select_sites(m, lambda n, mod: False)


def test_select_list_is_an_ordered_union_without_duplicates():
    m = Nested()
    got = select_sites(
        m, ["fc_out", nn.ReLU, "features.*", "head.2:input", "features.1", "fc_out:output"]
    )
    expected = [f"features.{i}:output" for i in range(5)] + ["head.2:input", "fc_out:output"]
    assert names(got) == expected
    assert len(set(got)) == len(got)
    # nested lists and tuples flatten; roles of one module ordered input, output
    got = select_sites(m, [("head.1:output", ["head.1:input"])])
    assert names(got) == ["head.1:input", "head.1:output"]


def test_unknown_name_lists_the_closest_names():
    m = Nested()
    module_names = [n for n, _ in m.named_modules() if n]
    for wrong in ("featurs.1", "head.5", "fc_ot", "fc_outt:input"):
        with pytest.raises(SiteSelectionError) as err:
            select_sites(m, wrong)
        pattern = wrong.rpartition(":")[0] or wrong
        close = difflib.get_close_matches(pattern, module_names, n=3)
        assert close, wrong  # the fixture has near names
        for c in close:
            assert repr(c) in str(err.value), (wrong, c, str(err.value))
        assert repr(pattern) in str(err.value)


def test_glob_matching_nothing():
    with pytest.raises(SiteSelectionError, match="encoder"):
        select_sites(Nested(), "encoder.*")


@pytest.mark.parametrize("selector", ["fc_out:inptu", "fc_out:grad", "fc_out:"])
def test_bad_role_in_selector(selector):
    with pytest.raises(SiteSelectionError, match="Role"):
        select_sites(Nested(), selector)


@pytest.mark.parametrize("role", ["inputs", ["input", "bogus"], []])
def test_bad_role_argument(role):
    with pytest.raises(SiteSelectionError, match="not valid"):
        select_sites(Nested(), "fc_out", role=role)


@pytest.mark.parametrize("selector", [3, 2.5, b"fc_out", object(), ["fc_out", 7], {"fc_out": 1}])
def test_bad_selector_type(selector):
    with pytest.raises(TypeError, match="site selector"):
        select_sites(Nested(), selector)


@pytest.mark.parametrize("selector", [[], (), [[]], set()])
def test_empty_list_is_an_error(selector):
    with pytest.raises(SiteSelectionError, match="empty"):
        select_sites(Nested(), selector)


def test_site_selection_error_is_a_value_error():
    assert issubclass(SiteSelectionError, ValueError)


# --------------------------------------------------------------------------------------------
# find_tensor
# --------------------------------------------------------------------------------------------


def test_find_tensor():
    f = torch.ones(2)
    g = torch.zeros(3, dtype=torch.float16)
    ints = torch.arange(3)
    assert find_tensor(f) is f
    assert find_tensor(g) is g
    assert find_tensor((None, 3, ints, f)) is f
    assert find_tensor({"ids": ints, "mask": torch.ones(2, dtype=torch.bool), "h": g}) is g
    assert find_tensor([[None], ({"a": None}, [f]), g]) is f  # depth-first
    assert find_tensor(((f,), g)) is f
    assert find_tensor((g, f)) is g
    for nothing in (
        None,
        3,
        2.5,
        "x",
        ints,
        torch.ones(2, dtype=torch.bool),
        (),
        {},
        [None],
        torch.tensor(1.5),
        (torch.tensor(1.5), ints),
    ):
        assert find_tensor(nothing) is None, nothing
    # 0-d tensors (a loss) are skipped in favour of a later activation
    assert find_tensor((torch.tensor(0.3), f)) is f


def test_find_tensor_on_real_module_calls():
    lstm = nn.LSTM(3, 4, batch_first=True)
    out = lstm(torch.randn(2, 5, 3))  # (output, (h, c))
    assert find_tensor(out) is out[0]
    emb = nn.Embedding(10, 3)
    assert find_tensor((torch.tensor([[1, 2]]),)) is None  # an embedding's input
    assert find_tensor(emb(torch.tensor([[1, 2]]))).shape == (1, 2, 3)


# --------------------------------------------------------------------------------------------
# default_unit_dim
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("module", "shape", "expected"),
    [
        (nn.Linear(4, 4), (8, 4), 1),  # [B, F]
        (nn.ReLU(), (8, 4), 1),
        (nn.Linear(4, 4), (8, 5, 4), 2),  # [B, T, F]
        (nn.LayerNorm(4), (8, 5, 4), 2),
        (nn.Tanh(), (8, 5, 4), 2),
        (nn.Conv1d(4, 4, 3), (8, 4, 10), 1),  # [N, C, L]
        (nn.BatchNorm1d(4), (8, 4, 10), 1),
        (nn.MaxPool1d(2), (8, 4, 10), 1),
        (nn.BatchNorm1d(4), (8, 4), 1),
        (nn.Conv2d(3, 3, 3), (2, 3, 5, 5), 1),  # [N, C, H, W]
        (nn.ReLU(), (2, 3, 5, 5), 1),
        (nn.Conv3d(3, 3, 1), (2, 3, 2, 2, 2), 1),
        (nn.Linear(4, 4), (4,), 0),  # [F]
        (nn.Sigmoid(), (4,), 0),
    ],
)
def test_default_unit_dim(module, shape, expected):
    assert default_unit_dim(module, torch.zeros(shape)) == expected


# --------------------------------------------------------------------------------------------
# Site
# --------------------------------------------------------------------------------------------


def test_site_name_and_default_saturation():
    assert Site("encoder.layers.0", "input").name == "encoder.layers.0:input"
    inp, out = Site("1", "input"), Site("1", "output")
    assert inp.default_saturation(nn.Sigmoid()) == SIGMOID_SATURATION
    assert inp.default_saturation(nn.Tanh()) == TANH_SATURATION
    assert math.isclose(SIGMOID_SATURATION, 4.585, abs_tol=1e-3)
    assert math.isclose(TANH_SATURATION, 2.993, abs_tol=1e-3)
    for m in (nn.Sigmoid(), nn.Tanh()):
        assert out.default_saturation(m) is None
    for m in (nn.ReLU(), nn.Linear(2, 2), nn.Hardtanh(), nn.LogSigmoid(), nn.Softsign()):
        assert inp.default_saturation(m) is None

    class MyTanh(nn.Tanh):
        pass

    assert inp.default_saturation(MyTanh()) == TANH_SATURATION
    # hashable/frozen: usable in sets, equal by value
    assert {Site("a", "input"), Site("a", "input")} == {Site("a", "input")}
    with pytest.raises(AttributeError):
        inp.role = "output"  # type: ignore[misc]
