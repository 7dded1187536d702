"""`patchbalance report`: the SPEC §5 figures on a hand-worked table, and the HTML page."""

from __future__ import annotations

import base64
import io
import os
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from patchbalance.cli import app
from patchbalance.reporting.html import render_html_report, write_html_report
from patchbalance.sampling.figures import figures_from_table

pytest.importorskip("matplotlib")


def hand_built_table(with_crs: bool = True) -> pd.DataFrame:
    """Return five patches: cluster 0 (three 90/10 patches, weight 0.5 each), cluster 1 (one
    20/80 patch, weight 2.5) and one excluded patch (weight 0). Active mean weight is 1."""
    table = pd.DataFrame(
        {
            "image_path": "scene.tif",
            "mask_path": "scene_mask.tif",
            "row_off": [0, 0, 10, 10, 20],
            "col_off": [0, 10, 0, 10, 0],
            "patch_size": 10,
            "px_0": [90, 90, 90, 20, 100],
            "px_1": [10, 10, 10, 80, 0],
            "excluded": [False, False, False, False, True],
            "freq_cluster_id": [0, 0, 0, 1, -1],
            "sampler_weight": [0.5, 0.5, 0.5, 2.5, 0.0],
        }
    )
    # Footprints of a 1 m grid anchored at (300000, 2780000), north-up.
    table["tile_minx"] = 300_000.0 + table["col_off"]
    table["tile_maxx"] = table["tile_minx"] + 10
    table["tile_maxy"] = 2_780_000.0 - table["row_off"]
    table["tile_miny"] = table["tile_maxy"] - 10
    table["crs"] = "EPSG:32640" if with_crs else ""
    return table


class ImageCollector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[tuple[str, str]] = []
        self.headings: list[str] = []
        self._in_heading = False

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        if tag == "img":
            self.images.append((attributes.get("alt", ""), attributes.get("src", "")))
        self._in_heading = tag == "h2"

    def handle_data(self, data):
        if self._in_heading:
            self.headings.append(data)
            self._in_heading = False


def decoded_images(page: str) -> list[tuple[str, Image.Image]]:
    parser = ImageCollector()
    parser.feed(page)
    decoded = []
    for alt, source in parser.images:
        prefix = "data:image/png;base64,"
        assert source.startswith(prefix), f"{alt}: not an embedded PNG"
        image = Image.open(io.BytesIO(base64.b64decode(source[len(prefix) :], validate=True)))
        image.load()
        decoded.append((alt, image))
    return decoded


def test_figures_of_a_hand_built_table_equal_hand_computed_values():
    figures = figures_from_table(hand_built_table())

    assert figures.class_values == [0, 1]
    # Uniform: (90*3 + 20) / 400 and (10*3 + 80) / 400 over the four active patches.
    np.testing.assert_allclose(figures.uniform_share, [290 / 400, 110 / 400])
    # Weighted: class 1 gets 0.5*30 + 2.5*80 = 215 of 0.5*300 + 2.5*100 = 400 weighted pixels.
    np.testing.assert_allclose(figures.weighted_share, [185 / 400, 215 / 400])
    assert figures.n_rows == 5 and figures.n_active == 4 and figures.draws == 5
    # ESS = (sum w)^2 / sum w^2 = 16 / (3 * 0.25 + 6.25) = 16 / 7.
    assert figures.ess == pytest.approx(16 / 7)
    # pi = 0.125 (x3), 0.625; five draws per epoch (one per table row).
    expected = 3 * (1 - 0.875**5) + (1 - 0.375**5)
    assert figures.expected_distinct == pytest.approx(expected)
    assert figures.expected_distinct_uniform == pytest.approx(4 * (1 - 0.75**5))
    assert figures.max_expected_repeats == pytest.approx(5 * 0.625)


def test_html_report_shows_the_figures_and_every_plot_decodes(tmp_path):
    table = hand_built_table()
    out = tmp_path / "report.html"

    write_html_report(table, figures_from_table(table), out, title="hand <table>")

    page = out.read_text(encoding="utf-8")
    images = decoded_images(page)
    alts = [alt for alt, _ in images]
    assert alts == [
        "class pixel share per epoch, uniform vs weighted",
        "histogram of sampler weights and concentration of draws",
        "cluster sizes, share of draws and mean composition",
        "map of patch footprints coloured by sampler weight",
    ]
    for alt, image in images:
        assert image.format == "PNG"
        assert image.width > 300 and image.height > 150, alt
        # A real plot, not a blank canvas: the weighted bars/footprints bring colour.
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 20, alt
    # The hand-computed numbers, as the page prints them.
    for text in ("72.50%", "46.25%", "27.50%", "53.75%", "1.95&times;", "2.3 (57.1% of active)"):
        assert text in page
    assert f"{3 * (1 - 0.875**5) + (1 - 0.375**5):,.1f}" in page  # expected distinct, 2.5
    assert "3.12" in page or "3.13" in page  # largest expected repeats 5 * 0.625
    # Cluster 1 holds a quarter of the patches but 2.5 / 4 of the draws.
    assert "<td>1</td><td>1</td><td>25.0%</td><td>62.5%</td>" in page
    assert "hand &lt;table&gt;" in page and "hand <table>" not in page
    # Self-contained: nothing is fetched from elsewhere.
    assert "http://" not in page and "https://" not in page and "<script" not in page


def test_a_table_without_a_crs_gets_no_map_and_the_page_says_why():
    table = hand_built_table(with_crs=False)

    page = render_html_report(table, figures_from_table(table))

    assert [alt for alt, _ in decoded_images(page)][-1].startswith("cluster sizes")
    assert "No map: the table has no tile bounds with a CRS" in page


def test_class_names_label_the_report():
    table = hand_built_table()

    page = render_html_report(table, figures_from_table(table), class_names={1: "building"})

    assert "<td>building</td>" in page and "<td>class 0</td>" in page


def test_report_command_prints_the_figures_and_writes_the_page(tmp_path):
    table_path = tmp_path / "balanced.csv"
    hand_built_table().to_csv(table_path, index=False)
    out = tmp_path / "site" / "report.html"

    result = CliRunner().invoke(app, ["report", str(table_path), "--out", str(out)])

    assert result.exit_code == 0, result.output
    assert "effective sample size            2.3 of 4 active (57.1%)" in result.stdout
    assert "53.75%" in result.stdout
    assert len(decoded_images(out.read_text(encoding="utf-8"))) == 4
    assert not [p for p in out.parent.iterdir() if p.name != "report.html"]  # no temp left


def test_report_to_an_unwritable_place_is_a_one_line_error(tmp_path):
    table_path = tmp_path / "balanced.csv"
    hand_built_table().to_csv(table_path, index=False)
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")

    result = CliRunner().invoke(
        app, ["report", str(table_path), "--out", str(blocker / "report.html")]
    )

    assert result.exit_code == 2
    assert "report.html" in result.output and "Traceback" not in result.output


def test_many_clusters_are_capped_and_the_page_says_how_many_are_hidden():
    rng = np.random.default_rng(3)
    n = 400
    table = pd.DataFrame(
        {
            "px_0": rng.integers(0, 100, n),
            "px_1": rng.integers(0, 100, n),
            "px_2": rng.integers(1, 100, n),
            "freq_cluster_id": np.arange(n) % 40,
            "sampler_weight": rng.gamma(2.0, 0.5, n),
        }
    )

    page = render_html_report(table, figures_from_table(table))

    assert "Composition clusters (40)" in page
    assert "10 smaller cluster(s) are not shown." in page
    assert "No map" in page


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(
    _chromium() is None and not os.environ.get("CI"),
    reason="chromium is not installed (CI installs it with .ci/chromium.sh)",
)
def test_a_headless_browser_renders_the_report_with_its_plots(tmp_path):
    table = hand_built_table()
    out = tmp_path / "report.html"
    write_html_report(table, figures_from_table(table), out, title="hand-built")
    screenshot = tmp_path / "screenshot.png"
    browser = _chromium()
    assert browser is not None, "CI must install chromium (.ci/chromium.sh)"

    subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--window-size=1200,2600",
            f"--screenshot={screenshot}",
            out.as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )

    shot = np.asarray(Image.open(screenshot).convert("RGB")).astype(int)
    assert shot.shape[:2] == (2600, 1200)
    # The weighted bars (#d1495b) and viridis-yellow footprints only come from the plots,
    # so finding them proves the browser decoded and laid out the embedded images.
    weighted_red = np.abs(shot - [0xD1, 0x49, 0x5B]).sum(axis=2) < 30
    viridis_yellow = np.abs(shot - [0xFD, 0xE7, 0x25]).sum(axis=2) < 40
    assert weighted_red.sum() > 2000
    assert viridis_yellow.sum() > 200


def test_report_out_that_is_a_folder_exits_2_before_the_table_is_read(tmp_path):
    # The table does not exist: read first, the error would be about it.
    result = CliRunner().invoke(
        app, ["report", str(tmp_path / "missing.csv"), "--out", str(tmp_path)]
    )
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "names a folder, not a file" in lines[0], result.stderr
    assert "--out" in lines[0]


@pytest.mark.parametrize("bad", [np.nan, -1.0])
def test_report_on_bad_weights_names_the_file_the_rows_from_1_and_the_fix(tmp_path, bad):
    table = hand_built_table()
    table.loc[[1, 3], "sampler_weight"] = bad  # data rows 2 and 4 of the file
    path = tmp_path / "weights.csv"
    table.to_csv(path, index=False)
    result = CliRunner().invoke(app, ["report", str(path)])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    kind = "NaN" if np.isnan(bad) else "negative"
    assert lines[0].startswith(f"error: {path}: sampler_weight is {kind}")
    assert "in 2 row(s) (rows 2, 4)" in lines[0]
    assert "rebuild the table with build-balanced-dataset" in lines[0]


def starving_pool():
    """Return class counts and composition scores: the minority class 2 lives only in the big
    cluster of mixed patches, so composition rarity (1 / cluster size) draws it less."""
    mixed = np.tile([60.0, 30.0, 10.0], (8, 1))  # cluster of 8: classes 0, 1 and minority 2
    pure = np.tile([100.0, 0.0, 0.0], (2, 1))  # cluster of 2: pure class 0
    counts = np.vstack([mixed, pure])
    composition = np.array([1 / 8] * 8 + [1 / 2] * 2)
    return counts, composition


def test_the_starvation_warning_names_a_below_median_class_that_the_weights_lower():
    from data_fixtures import method_scores as sampling_scores
    from patchbalance.sampling.figures import sampling_figures
    from patchbalance.sampling.scores import normalise_weights

    counts, composition = starving_pool()
    scores, _ = sampling_scores(
        "composition_only", composition, np.zeros(10), counts, np.full(10, 100.0)
    )
    figures = sampling_figures(counts, normalise_weights(scores), np.ones(10, bool), [0, 1, 2])

    warnings = figures.starvation_warnings("composition_only")
    assert figures.starved_classes() == [2]
    assert len(warnings) == 1
    # Uniform: 80 / 1000 = 8.00 %; weighted share falls below 0.9 of that.
    assert warnings[0].startswith("composition_only lowers class 2 from 8.00% to ")
    assert figures.to_dict()["starved_classes"] == [2]
    # It names the setting that raised the rare classes in the evidence.
    assert warnings[0].endswith(
        "; in our evidence (docs/benchmarks.md), class_target with target_share: sqrt and "
        "class-centred windows (input.placement: class_centred) raised the rare classes)"
    )
    assert "in our evidence" not in figures.starvation_warnings("class_target")[0]


def test_concentrated_weights_warn_with_the_ess_and_the_tied_largest_repeats(tmp_path):
    from patchbalance.sampling.figures import figures_text, sampling_figures

    counts = np.tile([50.0, 50.0], (100, 1))
    weights = np.zeros(100)
    weights[:3] = 1.0  # three patches share every draw: ESS 3 of 100
    figures = sampling_figures(counts, weights, np.ones(100, bool), [0, 1])

    assert figures.max_repeats_patches == 3
    assert figures.concentration_warning() == (
        "the weights are very concentrated: an effective sample size of 3.0 of 100 active "
        "patches (3.00%), and 33.33 expected draws of each of 3 tied patches per epoch; a floor "
        "on the effective sample size (weights.min_ess), a smaller weights.power, "
        "weights.uniform_mix or weights.max_weight spreads them"
    )
    assert "largest expected repeats/epoch   33.33 (3 patches tie)" in figures_text(figures)
    table = pd.DataFrame(counts, columns=["px_0", "px_1"]).assign(
        sampler_weight=weights, excluded=False
    )
    write_html_report(table, figures_from_table(table), tmp_path / "r.html", title="t")
    page = (tmp_path / "r.html").read_text()
    assert "the weights are very concentrated" in page and "33.33 (3 patches tie)" in page
    spread = sampling_figures(counts, np.ones(100), np.ones(100, bool), [0, 1])
    assert spread.concentration_warning() is None


def test_no_warning_when_no_class_is_starved():
    from data_fixtures import method_scores as sampling_scores
    from patchbalance.sampling.figures import sampling_figures
    from patchbalance.sampling.scores import normalise_weights

    counts, composition = starving_pool()
    for method in ("inverse_frequency", "class_target"):
        scores, _ = sampling_scores(method, composition, np.zeros(10), counts, np.full(10, 100.0))
        figures = sampling_figures(counts, normalise_weights(scores), np.ones(10, bool), [0, 1, 2])
        assert figures.starvation_warnings(method) == [], method
    uniform = sampling_figures(counts, np.ones(10), np.ones(10, bool), [0, 1, 2])
    assert uniform.starvation_warnings() == []


def test_prior_correction_is_the_log_ratio_of_uniform_to_weighted_shares():
    import patchbalance

    table = hand_built_table()
    # Active rows: uniform class-0 share = 290 / 400; weighted (0.5 x 3 of 90/10, 2.5 of
    # 20/80) = (135 + 50) / (150 + 250) = 185 / 400.
    expected = np.log([(290 / 400) / (185 / 400), (110 / 400) / (215 / 400)])

    np.testing.assert_allclose(patchbalance.prior_correction(table), expected)
    figures = figures_from_table(table)
    assert figures.to_dict()["log_prior_ratio"] == {
        "0": round(expected[0], 6),
        "1": round(expected[1], 6),
    }


def test_report_command_prints_the_starvation_warning(tmp_path):
    counts, composition = starving_pool()
    from data_fixtures import method_scores as sampling_scores
    from patchbalance.sampling.scores import normalise_weights

    scores, _ = sampling_scores(
        "composition_only", composition, np.zeros(10), counts, np.full(10, 100.0)
    )
    table = pd.DataFrame(counts, columns=["px_0", "px_1", "px_2"])
    table["excluded"] = False
    table["sampler_weight"] = normalise_weights(scores)
    table.to_csv(tmp_path / "starved.csv", index=False)

    out = tmp_path / "starved.html"
    result = CliRunner().invoke(app, ["report", str(tmp_path / "starved.csv"), "--out", str(out)])

    assert result.exit_code == 0, result.output
    assert "warning: starved.csv lowers class 2 from 8.00% to" in result.output
    assert "log prior ratio" in result.output
    page = out.read_text()
    assert "This weighting lowers class 2 from 8.00% to" in page and "log prior ratio" in page
