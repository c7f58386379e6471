"""Tests of the interactive report and of comparisons of any runs (issue 14, item 3): packed
data, comparison verdicts on synthetic seeds with known effects, reports of groups of recorded
runs given with labels (CLI and API), escaping of user-given names, and the page in headless
Chromium driven over the DevTools protocol: no console message or exception, no request but
the page itself and its data: images, a scripted choice of a site and of a unit that changes
the plots to the dataset's own values."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from torch import nn

import icstools
from icstools.analysis.compare import compare
from icstools.analysis.drift import site_aggregate
from icstools.report import REPORT_SCHEMA, write_report
from icstools.report.assets import UPLOT_VERSION, content_security_policy, json_block, scripts
from icstools.report.comparison import (
    COMPARISON_VERDICTS,
    Group,
    compare_groups,
    comparison_verdict,
)
from icstools.report.interactive import pack, thin

sys.path.insert(0, str(Path(__file__).parent))
from report_browser import CHROMIUM, Browser

jsonschema = pytest.importorskip("jsonschema", reason="jsonschema validates the report's JSON")

EVIL_SITE = '<script>alert("site")</script>'
LABEL_A = "<script>alert('A')</script>"
LABEL_B = 'it\'s "B" <img src=x onerror="window.pwned=1">'


# --------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------


class Net(nn.Module):
    """A small sigmoid MLP whose first nonlinearity has a hostile name."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 12)
        self.add_module(EVIL_SITE, nn.Sigmoid())
        self.fc2 = nn.Linear(12, 12)
        self.act2 = nn.ReLU()
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = getattr(self, EVIL_SITE)(self.fc1(x))
        return self.head(self.act2(self.fc2(h)))


def record(path: Path, seed: int, lr: float, steps: int = 24) -> None:
    torch.manual_seed(seed)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    rec = icstools.Recorder(
        model,
        (nn.Sigmoid, nn.ReLU),
        role="input",
        every=2,
        optimizer=opt,
        probe=torch.randn(48, 8, generator=gen),
        gradients=True,
        path=path,
    )
    with rec:
        for _ in range(steps):
            x = torch.randn(16, 8, generator=gen)
            y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.log(loss=loss, **{"my.metric-2": float(loss.detach()) * 2})


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("groups")
    for group, lr in (("slow", 0.05), ("fast", 3.0)):
        for seed in (0, 1):
            record(root / group / f"seed-{seed}.zarr", seed, lr)
    return {"root": root, "slow": root / "slow", "fast": root / "fast"}


@pytest.fixture(scope="module")
def two_groups(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp")
    result = write_report(
        [runs["slow"], runs["fast"]], out / "cmp.html", out / "cmp.json", labels=[LABEL_A, LABEL_B]
    )
    return result


# --------------------------------------------------------------------------------------------
# Packing, escaping, the policy
# --------------------------------------------------------------------------------------------


def test_pack_roundtrip_within_its_error_bound():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, 5, 7)) * 10
    a[0, 1, 2] = np.nan
    a[2, 0, 0] = np.inf
    p = pack(a)
    assert p["shape"] == [3, 5, 7] and len(p["s"]) == 2 * a.size
    k = np.array([[ord(c) for c in p["s"][i : i + 2]] for i in range(0, len(p["s"]), 2)])
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    idx = {ord(c): i for i, c in enumerate(alphabet)}
    code = np.array([idx[x] * 64 + idx[y] for x, y in k])
    finite = np.isfinite(a.ravel())
    assert (code[~finite] == 4095).all()
    back = p["lo"] + (p["hi"] - p["lo"]) * code[finite] / 4094
    assert np.abs(back - a.ravel()[finite]).max() <= (p["hi"] - p["lo"]) / 8188 + 1e-12
    lg = pack([1e-6, 1.0, 1e6, 0.0, -1.0], log=True)  # zero has a code, negatives are missing
    assert (lg["lo"], lg["hi"], lg["s"]) == (-6.0, 6.0, "AAf-_9_-__")  # 0, 2046.5→2046, 4093
    assert pack([2.0, 2.0])["s"] == "AAAA"  # constant: every value at lo
    assert thin(10, 4).tolist() == [0, 3, 6, 9] and thin(3, 5).tolist() == [0, 1, 2]


def test_json_block_cannot_be_closed_by_a_name():
    block = json_block("d", {EVIL_SITE: "</script><!--", "x": "&amp; \u2028"})
    body = block[len('<script type="application/json" id="d">') : -len("</script>")]
    assert "<" not in body and ">" not in body and "&" not in body
    assert json.loads(body) == {EVIL_SITE: "</script><!--", "x": "&amp; \u2028"}


def test_policy_allows_exactly_the_page_scripts():
    inline = scripts()
    assert inline[0].startswith(f"/*! uPlot v{UPLOT_VERSION}, MIT License")
    assert "http://" not in "".join(inline) and "https://" not in "".join(inline)
    csp = content_security_policy(inline)
    assert csp.startswith("default-src 'none'; img-src data:; style-src 'unsafe-inline';")
    assert csp.count("'sha256-") == 2 and "unsafe-inline' 'sha" not in csp
    assert "'unsafe-eval'" not in csp and "script-src 'unsafe-inline'" not in csp


def test_vendored_uplot_is_the_npm_release_and_ships_in_the_wheel():
    import hashlib

    root = Path(icstools.__file__).parent / "report" / "assets"
    digest = hashlib.sha256((root / "uPlot.iife.min.js").read_bytes()).hexdigest()
    # sha256 of dist/uPlot.iife.min.js in uplot-1.6.32.tgz (npm pack uplot@1.6.32)
    assert digest == "19c8d4c6ad88929a79f4ae49d6f7161566dfd0ba3d15cc495e974f787eb78f1f"
    assert "Leon Sorokin" in (root / "uPlot.LICENSE").read_text()
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert '"icstools.report" = ["assets/*.js", "assets/*.css", "assets/*.LICENSE"]' in pyproject


# --------------------------------------------------------------------------------------------
# Comparison verdicts on synthetic seeds with known effects
# --------------------------------------------------------------------------------------------


def drift_run(speed: float, seed: int, records: int = 6) -> xr.Dataset:
    """Probe values of two sites whose units shift by ``speed`` σ per record (site "b" by
    the same speed in every group)."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(300, 4))
    shifts = np.array([[k * speed] * 2 + [k * 0.2] * 2 for k in range(records)])  # [step, unit]
    samples = np.stack([base + s + rng.normal(0, 0.01, base.shape) for s in shifts])
    return xr.Dataset(
        {"probe_sample": (("step", "sample", "unit"), samples)},
        coords={
            "step": np.arange(records) * 10,
            "unit": np.arange(4),
            "unit_site": ("unit", ["a:input"] * 2 + ["b:input"] * 2),
            "unit_index": ("unit", [0, 1, 0, 1]),
            "site": ["a:input", "b:input"],
            "source": ["probe"],
        },
    )


@pytest.mark.parametrize(
    ("lo", "hi", "n", "verdict"),
    [
        (1.2, 3.0, 3, "higher"),
        (0.2, 0.8, 3, "lower"),
        (0.95, 1.05, 3, "similar"),
        (0.5, 1.5, 3, "inconclusive"),
        (np.nan, np.nan, 1, "inconclusive"),
        (-np.inf, np.inf, 3, "inconclusive"),
    ],
)
def test_comparison_verdict_reads_the_interval(lo, hi, n, verdict):
    v, reason = comparison_verdict("ratio", lo, hi, n, 3)
    assert v == verdict and v in COMPARISON_VERDICTS
    if n == 1:
        assert "at least 2 runs" in reason


def test_compare_groups_finds_the_known_effect_per_site():
    groups = [
        Group("slow", "s", [(f"s{i}", drift_run(0.05, i)) for i in range(5)]),
        Group("fast", "f", [(f"f{i}", drift_run(0.5, 10 + i)) for i in range(5)]),
    ]
    c = compare_groups(groups)
    rows = {(r["metric"], r["metric_kwargs"].get("reference"), r["site"]): r for r in c["rows"]}
    a = rows[("w1_std", "previous", "a:input")]
    assert a["group"] == "fast" and a["reference"] == "slow" and a["verdict"] == "higher"
    assert a["ratio"] == pytest.approx(10, rel=0.2)  # 0.5σ vs 0.05σ per record
    assert a["ratio_ci"][0] > 1 and a["n_group"] == a["n_reference"] == 5
    b = rows[("w1_std", "previous", "b:input")]  # the same 0.2σ per record in both groups
    assert b["ratio"] == pytest.approx(1, abs=0.1) and b["verdict"] in ("similar", "inconclusive")
    assert b["ratio_ci"][0] < 1 < b["ratio_ci"][1]
    # the mirror image, and the numbers are compare()'s own
    back = compare_groups(groups[::-1])
    row = next(r for r in back["rows"] if r["site"] == "a:input")
    assert row["verdict"] == "lower"
    table = compare(
        {g.label: [d for _, d in g.runs] for g in groups},
        "w1_std",
        metric_kwargs={"reference": "previous", "how": "median"},
        n_resamples=9999,
    )
    assert a["ratio_ci"] == pytest.approx(table.loc[0, ["ratio_lo", "ratio_hi"]].tolist())
    assert any("not recorded in every run" in n for n in c["notes"])  # grad_norm etc.


# --------------------------------------------------------------------------------------------
# Reports of groups of recorded runs
# --------------------------------------------------------------------------------------------


def test_two_groups_report_holds_verdicts_for_both_labels(two_groups, runs):
    data = json.loads(two_groups.json_path.read_text())
    jsonschema.Draft202012Validator(REPORT_SCHEMA).validate(data)
    c = data["comparison"]
    assert [g["label"] for g in c["groups"]] == [LABEL_A, LABEL_B]
    assert c["reference"] == LABEL_A and [len(g["runs"]) for g in c["groups"]] == [2, 2]
    assert {r["group"] for r in c["rows"]} == {LABEL_B}
    assert {r["reference"] for r in c["rows"]} == {LABEL_A}
    metrics = {r["metric"] for r in c["rows"]}
    assert {"w1_std", "zero_frac", "grad_norm", "sat_frac"} <= metrics
    sites = {r["site"] for r in c["rows"] if r["metric"] == "grad_norm"}
    assert sites == {f"{EVIL_SITE}:input", "act2:input"}
    # the group means are each run's mean over records, averaged over the group's runs
    for r in (r for r in c["rows"] if r["metric"] == "grad_norm"):
        per_run = {
            label: [
                float(icstools.open_run(p)["grad_norm"].sel(site=r["site"]).mean())
                for p in g["runs"]
            ]
            for g in c["groups"]
            for label in [g["label"]]
        }
        assert r["mean_group"] == pytest.approx(np.mean(per_run[LABEL_B]))
        assert r["mean_reference"] == pytest.approx(np.mean(per_run[LABEL_A]))
        assert r["ratio"] == pytest.approx(r["mean_group"] / r["mean_reference"])
        assert r["verdict"] in COMPARISON_VERDICTS
    # the page names the interval the verdicts read (Fieller / Welch since issue 15)
    page = two_groups.html_path.read_text()
    assert "Fieller" in page and "studentized bootstrap" not in page
    assert all(run.get("group") in (LABEL_A, LABEL_B) for run in data["runs"])
    page = two_groups.html_path.read_text()
    tables = {(r["metric"], r["what"]) for r in c["rows"]}  # w1_std vs previous and vs first
    assert "id='comparison'" in page and page.count("<table class='comparison'") == len(tables)


def test_user_names_stay_escaped_in_html_and_data(two_groups):
    page = two_groups.html_path.read_text()
    for raw in (EVIL_SITE, LABEL_A, LABEL_B):
        assert raw not in page
    assert "&lt;script&gt;alert(&#x27;A&#x27;)&lt;/script&gt;" in page
    assert "it&#x27;s &quot;B&quot; &lt;img src=x onerror=&quot;window.pwned=1&quot;&gt;" in page
    blocks = re.findall(r'<script type="application/json" id="([^"]+)">(.*?)</script>', page, re.S)
    assert len(blocks) == 5  # 4 runs and the comparison's drift traces
    for _, body in blocks:
        assert "<" not in body and ">" not in body
    traces = json.loads(dict(blocks)["ics-compare-data"])
    assert {r["label"].split(": ")[0] for r in traces["runs"]} == {LABEL_A, LABEL_B}
    # executable scripts: exactly uPlot and the report's own, inline, allowed by hash
    assert len(re.findall(r"<script>", page)) == 2 and "<script src" not in page


def test_single_runs_compared_by_the_cli_are_inconclusive_with_the_reason(runs, tmp_path, capsys):
    from icstools import cli

    a, b = runs["slow"] / "seed-0.zarr", runs["fast"] / "seed-0.zarr"
    cmd = ["report", str(a), str(b)]
    code = cli.main(
        [*cmd, "--label", "A", "--label", "B", "--html", str(tmp_path / "r.html"),
         "--json", str(tmp_path / "r.json")]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    c = json.loads((tmp_path / "r.json").read_text())["comparison"]
    assert [g["label"] for g in c["groups"]] == ["A", "B"]
    assert c["rows"] and all(r["verdict"] == "inconclusive" for r in c["rows"])
    assert all("at least 2 runs" in r["reason"] for r in c["rows"])
    assert any("single run" in n for n in c["notes"])
    capsys.readouterr()
    assert cli.main([*cmd, "--label", "A", "--html", str(tmp_path / "x.html")]) == 2
    assert "1 label(s) ['A'] for 2 input(s)" in capsys.readouterr().err
    assert not (tmp_path / "x.html").exists()
    assert cli.main(["report", "--help"]) == 0
    assert "--label NAME" in capsys.readouterr().out


def test_label_errors(runs, tmp_path):
    with pytest.raises(ValueError, match="distinct"):
        write_report([runs["slow"], runs["fast"]], tmp_path / "r.html", labels=["x", "x"])
    with pytest.raises(ValueError, match="non-empty"):
        write_report([runs["slow"], runs["fast"]], tmp_path / "r.html", labels=["x", " "])
    with pytest.raises(TypeError, match="list of str"):
        write_report([runs["slow"]], tmp_path / "r.html", labels="x")
    preset = tmp_path / "p"
    (preset / "c").mkdir(parents=True)
    (preset / "manifest.json").write_text('{"preset": "fig1"}')
    with pytest.raises(ValueError, match="is a preset folder"):
        write_report([preset, runs["fast"]], tmp_path / "r.html", labels=["p", "f"])
    # default labels: the inputs' names
    r = write_report([runs["slow"], runs["fast"] / "seed-1.zarr"], tmp_path / "d.html")
    assert [g["label"] for g in r.data["comparison"]["groups"]] == ["slow", "seed-1"]
    one = write_report([runs["slow"]], tmp_path / "one.html")
    assert one.data["comparison"] is None


# --------------------------------------------------------------------------------------------
# Headless Chromium over the DevTools protocol
# --------------------------------------------------------------------------------------------

needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="chromium is not installed (Debian package 'chromium': apt-get install -y chromium)",
)


def _first_run_id(b: Browser, path_part: str) -> str:
    return b.eval(
        "Object.keys(icsReport.runs).find(k => icsReport.runs[k].label.includes("
        + json.dumps(path_part)
        + "))"
    )


@needs_chromium
def test_page_in_chromium_is_quiet_offline_and_interactive(two_groups, runs, tmp_path):
    pytest.importorskip("websocket", reason="websocket-client (dev extra) drives Chromium")
    with Browser(tmp_path / "profile") as b:
        # control: the checks see a console message, an exception and external requests
        bad = tmp_path / "bad.html"
        bad.write_text(
            '<html><head><link rel="stylesheet" href="https://cdn.invalid/x.css"></head><body>'
            '<img src="http://example.invalid/x.png"><script>console.log("hi");'
            "nope();</script></body></html>"
        )
        b.open(bad)
        b.settle(0.5)
        assert any("console.log" in p for p in b.problems())
        assert any("exception" in p for p in b.problems())
        assert {"http://example.invalid/x.png", "https://cdn.invalid/x.css"} <= set(b.requests())
        b.events.clear()

        b.open(two_groups.html_path)
        b.settle(0.5)
        assert b.eval("icsReport.ready") is True
        assert b.problems() == []
        page_url = two_groups.html_path.resolve().as_uri()
        assert [u for u in b.requests() if not u.startswith("data:image/png;base64,")] == [page_url]
        assert b.eval("typeof window.pwned") == "undefined"
        assert b.eval("document.querySelectorAll('img[src=x], script[src]').length") == 0
        assert b.eval("document.querySelectorAll('canvas').length") > 10

        path = str(runs["fast"] / "seed-1.zarr")
        rid = _first_run_id(b, path)
        ds = icstools.open_run(path)
        sites = [str(s) for s in ds["site"].values]
        assert b.eval(f"icsReport.shown['{rid}/site']") == sites[0]
        legend = b.eval(
            f"Array.from(document.querySelectorAll('#ics-run-{rid} .u-legend')[0]"
            ".querySelectorAll('.u-label')).map(e => e.textContent)"
        )
        assert legend[:1] == ["step"] and set(sites) <= set(legend)  # a legend with every site
        # the drift panel (log scale first, packed in log10): switched to linear, it shows the
        # run's median W1/σ against the previous record, zeros included
        assert b.eval(f"icsReport.plots['{rid}/lines/0'].scales.y.distr") == 3
        b.eval(
            f"(() => {{ const c = document.querySelector('#ics-run-{rid} input.ics-log');"
            " c.checked = false; c.dispatchEvent(new Event('change')); })()"
        )
        assert b.eval(f"icsReport.plots['{rid}/lines/0'].scales.y.distr") == 1
        drift = ds.ics.drift("previous", ["w1_std"])[["w1_std"]]
        want = site_aggregate(drift, "median")["w1_std"].transpose("site", "step").values
        got = np.array(b.eval(f"icsReport.plots['{rid}/lines/0'].data")[1:], dtype=float)
        assert np.isnan(got[:, 0]).all() and np.isnan(want[:, 0]).all()  # no previous record
        assert np.allclose(got[:, 1:], want[:, 1:], rtol=5e-3, atol=0)

        def choose(cls: str, value: str) -> None:
            b.eval(
                f"(() => {{ const s = document.querySelector('#ics-run-{rid} select.{cls}');"
                f" s.value = {json.dumps(value)}; s.dispatchEvent(new Event('change')); }})()"
            )

        def plotted(key: str) -> list:
            return b.eval(f"icsReport.plots['{rid}/{key}'].data")

        before = plotted("units")
        choose("ics-site", sites[1])  # the hostile-named site is sites[0]
        assert b.eval(f"icsReport.shown['{rid}/units']") == f"{sites[1]}|all"
        after = plotted("units")
        assert after != before
        q = ds["quantile_value"].sel(source="probe")
        expect = q.sel(quantile=0.5).where(q["unit_site"] == sites[1], drop=True).median("unit")
        got = np.array(after[2], dtype=float)  # x, 15th, 50th, 85th
        span = float(q.where(q["unit_site"] == sites[1]).max() - q.where(
            q["unit_site"] == sites[1]).min())  # fmt: skip
        assert np.allclose(got, expect.values, atol=span / 4000 + 1e-6)
        choose("ics-unit", "3")
        assert b.eval(f"icsReport.shown['{rid}/units']") == f"{sites[1]}|3"
        unit = q.where((q["unit_site"] == sites[1]) & (q["unit_index"] == 3), drop=True)
        got = np.array(plotted("units")[1:4], dtype=float)  # 15th, 50th, 85th
        want = unit.sel(quantile=[0.15, 0.5, 0.85]).squeeze("unit").transpose("quantile", "step")
        assert np.allclose(got, want.values, atol=span / 4000 + 1e-6)
        # the histogram follows the site
        hist = b.eval(f"icsReport.plots['{rid}/hist'].site")
        assert hist == sites[1]
        # the comparison plot: every run's drift of the chosen site
        cmp_before = b.eval("icsReport.plots.compare.data")
        b.eval(
            "(() => { const s = document.querySelector('#ics-compare select');"
            f" s.value = {json.dumps(sites[1])}; s.dispatchEvent(new Event('change')); }})()"
        )
        assert b.eval("icsReport.shown.compare") == sites[1]
        assert b.eval("icsReport.plots.compare.data") != cmp_before
        labels = b.eval(
            "Array.from(document.querySelectorAll('#ics-compare .u-label')).map(e => e.textContent)"
        )
        assert any(x.startswith(LABEL_B + ": ") for x in labels)
        assert b.problems() == []
