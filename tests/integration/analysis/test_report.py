"""The analysis report: every section from synthetic data, rendered in headless Chromium.

Chromium is driven from the command line: ``--dump-dom`` on a copy of the report with
a small script that, once the page has loaded, lists every <img> whose naturalWidth
is 0; and ``--screenshot`` for a person to look at (kept under pytest's tmp folder).
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import (
    average_precision_score,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

from services.analysis.ablation import FEATURE_GROUPS, permutation_importances, run_ablation
from services.analysis.figures import probability_grid
from services.analysis.report import (
    CurveSet,
    PatchExample,
    PatchMontage,
    ReliabilitySet,
    SlideHeatmap,
    build_report,
)
from services.common.errors import InvalidInput
from services.nuclei.features import FEATURE_NAMES

pytestmark = pytest.mark.slow

IMAGE_CHECK = """
<script>
window.addEventListener("load", function () {
  var images = Array.from(document.images);
  var broken = images
    .filter(function (i) { return !i.complete || i.naturalWidth === 0; })
    .map(function (i) { return i.getAttribute("data-file") || i.alt; });
  var out = document.createElement("pre");
  out.id = "image-check";
  out.textContent = JSON.stringify({total: images.length, broken: broken});
  document.body.appendChild(out);
});
</script>
"""


@pytest.fixture(scope="module")
def chromium() -> str:
    """Path of Debian's chromium; a missing one skips locally and fails under CI."""
    found = shutil.which("chromium")
    if found is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("chromium is not installed (CI is set): run `make system-deps`")
        pytest.skip("chromium is not installed; `make system-deps` installs it")
    return found


def run_chromium(executable: str, profile: Path, *args: str) -> str:
    result = subprocess.run(
        [
            executable,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            f"--user-data-dir={profile}",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def broken_images(executable: str, page: Path, profile: Path) -> dict:
    """Load ``page`` (a copy with the check script, beside it) and report its images."""
    probe = page.with_name(f"probe-{page.name}")
    probe.write_text(
        page.read_text(encoding="utf-8").replace("</body>", IMAGE_CHECK + "</body>"),
        encoding="utf-8",
    )
    try:
        dom = run_chromium(
            executable, profile, "--virtual-time-budget=15000", "--dump-dom", probe.as_uri()
        )
    finally:
        probe.unlink()
    found = re.search(r'<pre id="image-check">(.*?)</pre>', dom, re.S)
    assert found, f"the check script did not run; DOM starts {dom[:300]!r}"
    return json.loads(html.unescape(found.group(1)))


def curve_set(name: str, level: str, labels: np.ndarray, scores: np.ndarray) -> CurveSet:
    fpr, tpr, _ = roc_curve(labels, scores)
    precision, recall, _ = precision_recall_curve(labels, scores)
    points = []
    for threshold in np.unique(scores):
        called = scores >= threshold
        tp = float((called & (labels == 1)).sum())
        fp = float((called & (labels == 0)).sum())
        fn = float((~called & (labels == 1)).sum())
        tn = float((~called & (labels == 0)).sum())
        f1 = 2 * tp / max(2 * tp + fp + fn, 1)
        denominator = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        mcc = (tp * tn - fp * fn) / denominator if denominator else 0.0
        points.append((f1, (mcc + 1) / 2))
    return CurveSet(
        name=name,
        level=level,  # type: ignore[arg-type]
        fpr=fpr,
        tpr=tpr,
        precision=precision,
        recall=recall,
        mcc_f1_points=np.asarray(points),
        auroc=float(roc_auc_score(labels, scores)),
        auprc=float(average_precision_score(labels, scores)),
        mcc_f1=0.71,
        prevalence=float(labels.mean()),
        auroc_ci=(0.7, 0.9),
    )


def feature_table(
    rng: np.random.Generator, signal: float = 1.2, patients: int = 12, patches: int = 6
) -> pd.DataFrame:
    label = np.repeat(np.arange(patients) % 2, patches)
    values = rng.normal(size=(len(label), len(FEATURE_NAMES)))
    intensity = [i for i, n in enumerate(FEATURE_NAMES) if n.startswith("intensity.")]
    values[:, intensity] += signal * label[:, None]
    table = pd.DataFrame(values, columns=list(FEATURE_NAMES))
    table["patient_id"] = np.repeat([f"P{i}" for i in range(patients)], patches)
    table["label"] = label
    return table


def tissue_patch(rng: np.random.Generator, purple: float) -> np.ndarray:
    """A 64x64 pink patch with dark-purple 'nuclei' blobs."""
    image = np.empty((64, 64, 3), np.float64)
    image[:] = (235, 170, 200)
    yy, xx = np.mgrid[:64, :64]
    for _ in range(int(6 + 10 * purple)):
        cy, cx, r = rng.uniform(4, 60), rng.uniform(4, 60), rng.uniform(2, 5)
        image[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = (90, 40, 120)
    image += rng.normal(0, 8, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def slide_heatmap(slide_id: str, rng: np.random.Generator, label: str) -> SlideHeatmap:
    downsample = 32.0
    height, width = 180, 300
    yy, xx = np.mgrid[:height, :width]
    tissue = ((yy - 90) / 70) ** 2 + ((xx - 150) / 120) ** 2 < 1
    thumbnail = np.full((height, width, 3), 245, np.uint8)
    thumbnail[tissue] = (225, 160, 195)
    rows = []
    size = 512  # level-0 pixels: 16 thumbnail pixels
    for y in range(0, height * 32, size):
        for x in range(0, width * 32, size):
            cy, cx = int((y + size / 2) / downsample), int((x + size / 2) / downsample)
            if cy < height and cx < width and tissue[cy, cx]:
                p = float(np.clip(cx / width + rng.normal(0, 0.1), 0, 1))
                rows.append((x, y, size, size, p))
    patches = pd.DataFrame(rows, columns=["x", "y", "width", "height", "probability"])
    return SlideHeatmap(
        slide_id,
        "TP53",
        thumbnail,
        downsample,
        patches,
        label=label,
        slide_probability=float(patches["probability"].mean()),
    )


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(7)
    out = tmp_path_factory.mktemp("report")
    curves = []
    for name, strength in (("TP53", 1.6), ("ER", 2.2)):
        for level, n in (("patch", 1500), ("slide", 60)):
            labels = (rng.random(n) < 0.35).astype(int)
            scores = 1 / (1 + np.exp(-(strength * (labels - 0.5) * 2 + rng.normal(0, 1.2, n))))
            curves.append(curve_set(name, level, labels, scores))
    # Labels drawn from the calibrated probabilities; the sharpened ones overclaim.
    calibrated = rng.beta(2, 2, 2000)
    labels = (rng.random(2000) < calibrated).astype(int)
    overconfident = 1 / (1 + np.exp(-3 * np.log(calibrated / (1 - calibrated))))
    reliability = [
        ReliabilitySet(
            "TP53 patch",
            {"before (T = 1)": overconfident, "after (T = 2.4)": calibrated},
            labels,
        )
    ]
    results = []
    for biomarker in ("TP53", "ER"):
        sets = {"BD": feature_table(rng), "CD": feature_table(rng, signal=0.3)}
        results.append(
            run_ablation(
                sets,
                "label",
                biomarker=biomarker,
                folds=3,
                n_estimators=8,
                bootstrap=30,
            )
        )
    ablation = pd.concat(results, ignore_index=True)
    importances = {
        "TP53, BD patches": permutation_importances(
            feature_table(rng),
            "label",
            features=[*FEATURE_GROUPS["intensity"][:6], *FEATURE_GROUPS["spatial"][:6]],
            folds=3,
            n_estimators=8,
            repeats=2,
            top=10,
        )
    }
    statistics = pd.DataFrame(
        {
            "feature": ["intensity.blue.mean", "morph.area.mean", "<b>not bold</b>"],
            "p": [1.76e-05, 0.2, 0.04],
            "q": [5.3e-04, 0.31, 0.08],
            "median_positive": [148.2, 40.1, 1.0],
            "median_negative": [131.9, 41.3, 2.0],
            "effect": [0.42, -0.05, 0.1],
        }
    )
    montages = [
        PatchMontage(
            "TP53",
            {
                "mutated": [
                    PatchExample(png_bytes(tissue_patch(rng, 1.0)), f"SYN-{i:02d} p=0.9{9 - i}")
                    for i in range(5)
                ],
                "wild-type": [
                    PatchExample(tissue_patch(rng, 0.2), f"SYN-{i:02d} p=0.0{i + 1}")
                    for i in range(4)
                ],
            },
        )
    ]
    heatmaps = [
        slide_heatmap("SYN-0001", rng, "mutated"),
        slide_heatmap("SYN-0002", rng, "wild-type"),
    ]
    return build_report(
        out,
        "demo run <1> & co",
        summary={"cohort": "synthetic", "slides": 60, "biomarkers": "TP53, ER"},
        curves=curves,
        reliability=reliability,
        ablation=ablation,
        importances=importances,
        statistics=statistics,
        montages=montages,
        heatmaps=heatmaps,
    )


def test_report_files_and_html(report: Path) -> None:
    assert report.name == "report.html"
    page = report.read_text(encoding="utf-8")
    pngs = sorted(p.name for p in (report.parent / "figures").glob("*.png"))
    # 2 curve figures, 1 reliability, 1 importance, 1 montage, 2 heatmaps.
    assert len(pngs) == 7, pngs
    for name in pngs:
        assert (report.parent / "figures" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    referenced = sorted(Path(f).name for f in re.findall(r'data-file="([^"]+)"', page))
    assert referenced == pngs
    # Self-contained: every image inlined, nothing fetched from elsewhere.
    sources = re.findall(r'<img src="([^"]{0,30})', page)
    assert len(sources) == 7 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "<link" not in page and "<script" not in page and "http" not in page
    # Escaped text.
    assert "demo run &lt;1&gt; &amp; co" in page and "<1>" not in page
    assert "&lt;b&gt;not bold&lt;/b&gt;" in page and "<b>" not in page
    # Sections and the ablation table.
    for anchor in ("summary", "curves", "calibration", "ablation", "importance", "statistics"):
        assert f'id="{anchor}"' in page
    assert 'id="patches"' in page and 'id="heatmaps"' in page
    assert '<th colspan="2">TP53</th>' in page and '<th colspan="2">ER</th>' in page
    assert "morphology+intensity (55)" in page and "chance (prevalence)" in page
    assert re.search(r'<td class="best">\d\.\d\d \[\d\.\d\d, \d\.\d\d\]</td>', page)
    assert "1.76e-05" in page and 'class="significant"' in page


def test_every_image_loads_in_chromium(report: Path, chromium: str, tmp_path: Path) -> None:
    checked = broken_images(chromium, report, tmp_path / "profile")
    assert checked == {"total": 7, "broken": []}


def test_the_image_check_sees_a_broken_image(chromium: str, tmp_path: Path) -> None:
    good = base64_png()
    page = tmp_path / "broken.html"
    page.write_text(
        f'<html><body><img src="data:image/png;base64,{good}" alt="good">'
        '<img src="figures/missing.png" alt="missing"></body></html>',
        encoding="utf-8",
    )
    assert broken_images(chromium, page, tmp_path / "profile") == {
        "total": 2,
        "broken": ["missing"],
    }


def test_screenshot(report: Path, chromium: str, tmp_path: Path) -> None:
    shot = report.parent / "screenshot.png"
    run_chromium(
        chromium,
        tmp_path / "profile",
        f"--screenshot={shot}",
        "--window-size=1400,5000",
        "--hide-scrollbars",
        report.as_uri(),
    )
    with Image.open(shot) as image:
        assert image.size == (1400, 5000)
        # Not a blank page: the header band and the figures give many colours.
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 1000
    print(f"screenshot: {shot}")


def base64_png() -> str:
    return base64.b64encode(png_bytes(np.zeros((4, 4, 3), np.uint8))).decode("ascii")


def test_heatmap_grid_paints_patches_at_their_thumbnail_pixels() -> None:
    patches = pd.DataFrame(
        {
            "x": [0, 640],
            "y": [320, 0],
            "width": [320, 64],
            "height": [320, 64],
            "probability": [0.2, 0.9],
        }
    )
    heatmap = SlideHeatmap("S", "TP53", np.zeros((40, 40, 3), np.uint8), 32.0, patches)
    grid = probability_grid(heatmap)
    assert np.all(grid[10:20, 0:10] == 0.2)
    assert np.all(grid[0:2, 20:22] == 0.9)
    assert np.isnan(grid).sum() == 40 * 40 - 100 - 4


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (
            lambda: SlideHeatmap(
                "S", "TP53", np.zeros((8, 8, 3), np.uint8), 32.0, pd.DataFrame({"x": [0]})
            ),
            "lacks",
        ),
        (
            lambda: SlideHeatmap(
                "S",
                "TP53",
                np.zeros((8, 8, 3), np.uint8),
                32.0,
                pd.DataFrame(
                    {"x": [0], "y": [0], "width": [9], "height": [9], "probability": [1.5]}
                ),
            ),
            "in \\[0, 1\\]",
        ),
    ],
)
def test_bad_heatmaps_are_refused(build, message, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidInput, match=message):
        build_report(tmp_path, "run", heatmaps=[build()])


def test_bad_curves_and_patches_are_refused(tmp_path: Path) -> None:
    empty = np.zeros(2)
    with pytest.raises(InvalidInput, match="patch or slide"):
        CurveSet("TP53", "tile", empty, empty, empty, empty, np.zeros((2, 2)), 0.5, 0.5, 0.5)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="mcc_f1_points"):
        CurveSet("TP53", "patch", empty, empty, empty, empty, np.zeros(2), 0.5, 0.5, 0.5)
    montage = PatchMontage("TP53", {"mutated": [PatchExample(b"not an image", "x")]})
    with pytest.raises(InvalidInput, match="not a readable image"):
        build_report(tmp_path, "run", montages=[montage])


def test_a_rebuild_leaves_only_its_own_figures(tmp_path: Path) -> None:
    stale = tmp_path / "figures" / "curves-old.png"
    stale.parent.mkdir()
    stale.write_bytes(b"old")
    importances = pd.DataFrame(
        {"feature": ["a", "b"], "family": ["intensity", "spatial"], "importance_mean": [0.1, 0.05]}
    )
    page = build_report(tmp_path, "run", importances={"TP53": importances})
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == ["importance-tp53.png"]
    assert page.read_text(encoding="utf-8").count("<img ") == 1
