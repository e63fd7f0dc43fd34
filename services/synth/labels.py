"""Labels, morphology and stain style of the synthetic cohort (ground truth of ``synth``).

A synthetic cohort is a list of :class:`SlideSpec`: one slide per patient, either a
*cancer* slide (tumour regions among normal tissue, six binary labels) or a *normal*
slide (no tumour, no labels). This module decides everything about a slide except
its pixels: labels, an immune score, the :class:`Morphology` the renderer draws, the
scanning :class:`Site` whose stain style it imitates, and a per-slide render seed.

Labels: a small causal structure
--------------------------------
Labels are drawn in causal order: Basal first; ER and HER2 given Basal; PR given ER;
TP53 given Basal and HER2; PIK3CA given ER. The conditional probabilities
(TCGA-BRCA-like; constants ``P_BASAL`` ... ``P_PIK3CA_GIVEN_ER``):

======================  ==========================  ===========
label                   condition                   P(label=1)
======================  ==========================  ===========
Basal                   (none)                      0.20
ER+                     Basal=0 / Basal=1           0.92 / 0.10
PR+                     ER=0 / ER=1                 0.08 / 0.82
HER2+                   Basal=0 / Basal=1           0.25 / 0.05
TP53 mutated            Basal=0, HER2=0             0.18
TP53 mutated            Basal=0, HER2=1             0.45
TP53 mutated            Basal=1 (either HER2)       0.80
PIK3CA mutated          ER=0 / ER=1                 0.12 / 0.40
======================  ==========================  ===========

Expected marginals, computed exactly from the table (``label_probability``), and the
minority-class share of each label (TCGA-BRCA's "class imbalance 18-48%"):

======  ===============  ==============
label   P(positive)      minority share
======  ===============  ==============
Basal   0.2000           0.200
TP53    0.3580           0.358
PIK3CA  0.3317           0.332
ER      0.7560           0.244
PR      0.6394           0.361
HER2    0.2100           0.210
======  ===============  ==============

Implied correlations: phi(Basal, ER) = -0.76; P(TP53 | Basal) - P(TP53 | non-Basal)
= 0.80 - 0.26 = 0.54; P(PIK3CA | ER+) - P(PIK3CA | ER-) = 0.28. The unit tests check,
over 200 cohorts of 40 cancer slides (8000 slides), that every sampled marginal lies
within 4 binomial standard deviations (about +-0.02) of the exact value, that the
per-cohort minority share lies in 0.10-0.55 in at least 95% of cohorts, and the
correlation signs and sizes above.

Morphology rules
----------------
Each label moves some :class:`Morphology` parameters by a fixed effect, then per-slide
noise blurs it, so each rule is learnable but no single feature separates a class.
``LN(s)`` is a log-normal factor ``exp(N(0, s))``; ``Beta(m, k)`` is a Beta with
mean ``m`` and concentration ``k`` (``a = m k``, ``b = (1 - m) k``).

=============  ===========================  ==================================  =================
label          parameter                    effect                              noise
=============  ===========================  ==================================  =================
TP53 mutated   lymphocyte_density_per_mm2   400 -> 1000 /mm² (x2.5)             x LN(0.30)
TP53 mutated   tumour_lymphocyte_share      0.35 -> 0.70 (TILs in tumour)       (none)
(via lymph.)   immune score                 follows lymphocyte density          + N(0, 0.5)
PIK3CA mut.    karyorrhexis_rate            0.015 -> 0.12 per nucleus (x8)      x LN(0.50)
(drawn as)     apoptotic cells              eosinophilic body in a clear halo   (viable tumour)
ER+            gland_fraction               mean +0.30                          Beta(m, 3)
ER+            tumour_nucleus_major_um      -1.0 µm                             + N(0, 0.8) µm
PR+            gland_fraction               mean +0.10                          (same draw)
PR+            tumour_nucleus_major_um      -1.0 µm                             (same draw)
PR+            solid_fraction               mean 0.25 -> 0.13 (fewer sheets)    Beta(m, 4)
HER2+          tumour_nucleus_cv            0.15 -> 0.30 (pleomorphism)         x LN(0.22)
HER2+          tumour_nucleolus_fraction    0.17 -> 0.34 (prominent nucleoli)   x LN(0.20)
HER2+          tumour_density_per_mm2       x0.75 (more cytoplasm)              x LN(0.15)
HER2+          hematoxylin_scale            x1.15 (stain intensity)             x LN(0.10)
Basal          gland_fraction               mean -> 0.04 (overrides ER/PR)      Beta(m, 3)
Basal          solid_fraction               mean 0.25 -> 0.55 (solid sheets)    Beta(m, 4)
Basal          tumour_nucleus_major_um      +2.0 µm                             (same draw)
Basal          necrosis_fraction            mean 0.03 -> 0.12                   Beta(m, 8)
Basal          tumour_density_per_mm2       4000 -> 5200 /mm² (+30%)            x LN(0.15)
Basal          karyorrhexis_rate            x1.5 (debris; confounds PIK3CA)     (same draw)
=============  ===========================  ==================================  =================

The gland mean without Basal is ``0.10 + 0.30 ER + 0.10 PR``; the nucleus mean is
``11.5 - 1.0 ER - 1.0 PR + 2.0 Basal`` µm (clipped to 7-20 µm); the density mean is
``4000 x 1.3 (Basal) x 0.75 (HER2+)`` /mm².

Base values (all labels negative: a non-Basal, ER-/PR-/HER2- tumour) are at the
scale of 40x H&E: tumour nuclei 11.5 µm major axis (luminal ER+/PR+ 9.5 µm, Basal
13.5 µm: within the usual 9-14 µm), normal epithelial nuclei 7.5 µm, lymphocytes
``LYMPHOCYTE_NUCLEUS_UM`` = 7 µm round, stromal nuclei 10 x 3 µm
(``STROMAL_NUCLEUS_UM``). Parameters without a label rule (tumour fraction, nuclear
axis ratio, tissue composition, eosin scale) still vary per slide. Single-feature
slide AUROCs of the parameters, over the 6000 cancer slides of 40-slide cohorts with
seeds 0-199 (the tests require 0.85-0.998 for the first six): lymphocyte density for
TP53 0.98, karyorrhexis rate for PIK3CA 0.996, gland fraction for ER 0.93, nucleus size
for Basal 0.99, nuclear CV for HER2 0.98, nucleolus size for HER2 0.993, gland fraction
for PR 0.80, solid fraction for PR 0.80 (lower is PR+), small nuclei for PR 0.90,
tumour density for HER2 0.91 (lower is HER2+), hematoxylin scale for HER2 0.85.
Because Basal and ER- go together, features of one label also carry the other (e.g.
small nuclei for ER: 0.97). A parameter is never seen
itself, only the nuclei and tissue drawn from it in a slide's 1 mm² or so of tumour,
so what a model can see is much noisier than these figures. Rules version 2 made the
cues stronger and their per-slide noise smaller than version 1 (TP53 x2.0 with
LN(0.35), PIK3CA x5 with LN(0.8) and fragments of 0.6-1.3 µm radius, now 0.8-1.5 µm;
HER2 CV 0.27 with LN(0.28), PR -0.5 µm), with which a small CNN learned too little
of PIK3CA, HER2 and PR on the demo's slides;
gland effects stayed as they were, because more glands cost nuclei segmentation
accuracy on the test cohorts. Rules version 3 made the weak cues visible at the 1 µm
per pixel a biomarker model sees: the fragment clusters of viable tumour became whole
apoptotic cells (a shrunken, deeply eosinophilic body with the fragments, in a clear
retraction halo 2.5 µm wide; the renderer's ``APOPTOTIC_HALO_UM``), which no longer
look like lymphocytes, while fragments in necrosis stay bare debris; HER2+ tumours got
prominent nucleoli, as high-grade tumours have; and the per-slide noise of the tumour
nucleus size fell from 1.5 to 0.8 µm, so that the ER and PR effects of -1 µm each
show. (With rules version 2 the demo's PIK3CA model ranked held-out slides against
their label, among non-Basal slides too: bare fragment clusters at 1 µm per pixel
resemble lymphocytes, which follow TP53.) How much of each rule a small patch
classifier learns from a cohort is measured by ``benchmarks/recipes/learnability.py`` and
``histomarker demo``.

Normal slides have no tumour: every ``tumour_*`` field, ``gland_fraction``,
``solid_fraction``, ``necrosis_fraction`` and ``karyorrhexis_rate`` is 0;
lymphocytes are sparser (150 /mm² x LN(0.45)).

Sites and stain
---------------
``SITES`` are six synthetic tissue-source sites ``SA``..``SF``. Each has its own
unit-norm optical-density (OD) vectors for hematoxylin and eosin, tilted 3-6 degrees
from the standard H&E vectors (``SA`` is the reference), its own stain strengths
(1.0 +- 0.2) and glass background colour. The renderer multiplies OD concentrations
by ``site.h_strength * morphology.hematoxylin_scale`` (and likewise for eosin), so
stain varies between sites and, less, between slides of a site.

Cohort layout
-------------
``sample_cohort(n, seed, normal_fraction)`` is deterministic for ``seed`` and
prefix-stable: slide ``i`` is the same whatever ``n`` is (for the same fraction).
With ``c(m)`` the number of normal slides among the first ``m`` (``c(m) =
round_half_up(m * normal_fraction)``, clipped to ``[1, m - 1]`` when ``m >= 2``),
slide ``i`` is normal when ``c(i + 1) > c(i)``; so normals are spread evenly and a
cohort of ``n >= 2`` slides has both kinds. Each slide draws its site uniformly at
random, and all its randomness, from its own stream
``SeedSequence([seed, SYNTH_TAG, stream, i])``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from services.cohort.manifest import MANIFEST_COLUMNS as COHORT_MANIFEST_COLUMNS
from services.common.errors import InvalidInput
from services.common.vocabulary import BIOMARKERS

#: Version of the label and morphology rules; bumped whenever a change makes the same
#: seed give other slides (``histomarker demo`` regenerates a cohort of an older one).
RULES_VERSION = 3

#: Slide kinds.
CANCER = "cancer"
NORMAL = "normal"

#: Lymphocyte nucleus diameter, µm (round); the renderer's constant, stated here once.
LYMPHOCYTE_NUCLEUS_UM = 7.0
#: Stromal (fibroblast) nucleus major x minor axis, µm.
STROMAL_NUCLEUS_UM = (10.0, 3.0)

#: Most slides a cohort may hold: patient numbers have four digits.
MAX_SLIDES = 10_000

# Conditional probability table of the labels (see the module docstring).
P_BASAL = 0.20
P_ER_GIVEN_BASAL: dict[int, float] = {0: 0.92, 1: 0.10}
P_PR_GIVEN_ER: dict[int, float] = {0: 0.08, 1: 0.82}
P_HER2_GIVEN_BASAL: dict[int, float] = {0: 0.25, 1: 0.05}
P_TP53_GIVEN_BASAL_HER2: dict[tuple[int, int], float] = {
    (0, 0): 0.18,
    (0, 1): 0.45,
    (1, 0): 0.80,
    (1, 1): 0.80,
}
P_PIK3CA_GIVEN_ER: dict[int, float] = {0: 0.12, 1: 0.40}

# Seed streams: a tag keeps synth's streams apart from other users of the same seed.
SYNTH_TAG = 0x53594E  # "SYN"
_STREAM_SPEC = 0
_STREAM_RENDER = 1


@dataclass(frozen=True)
class Site:
    """A synthetic tissue-source site: one lab and scanner, one stain style.

    Attributes:
        code: Two-letter site code, ``"SA"`` .. ``"SF"``; appears in patient IDs.
        hematoxylin_od: Unit-norm optical-density vector (R, G, B) of hematoxylin.
        eosin_od: Unit-norm optical-density vector (R, G, B) of eosin.
        h_strength: Multiplier of hematoxylin concentration at this site (~1.0 +- 0.2).
        e_strength: Multiplier of eosin concentration at this site (~1.0 +- 0.2).
        background_rgb: Colour of empty glass, 8-bit RGB.
    """

    code: str
    hematoxylin_od: tuple[float, float, float]
    eosin_od: tuple[float, float, float]
    h_strength: float
    e_strength: float
    background_rgb: tuple[int, int, int]


#: Standard H&E optical-density vectors (Ruifrok & Johnston), unit norm.
STANDARD_HEMATOXYLIN_OD = (0.6511, 0.7012, 0.2905)
STANDARD_EOSIN_OD = (0.0701, 0.9914, 0.1102)

#: The synthetic sites. OD vectors are the standard ones tilted by the stated angles.
SITES: tuple[Site, ...] = (
    # Reference style: standard vectors and strengths.
    Site("SA", STANDARD_HEMATOXYLIN_OD, STANDARD_EOSIN_OD, 1.00, 1.00, (240, 237, 243)),
    # H tilted 3° towards red, E 4° towards blue; dark hematoxylin, pale eosin.
    Site("SB", (0.6899, 0.6688, 0.2771), (0.0694, 0.9814, 0.1792), 1.15, 0.90, (244, 240, 246)),
    # H 5° towards blue, E 3° towards red; pale hematoxylin, strong eosin.
    Site("SC", (0.6314, 0.6800, 0.3728), (0.1222, 0.9864, 0.1096), 0.85, 1.10, (236, 233, 240)),
    # H 4° towards green, E 5° towards blue; strong overall.
    Site("SD", (0.6049, 0.7492, 0.2699), (0.0692, 0.9781, 0.1964), 1.20, 1.05, (242, 238, 247)),
    # H 6° towards red, E 4° towards red; faded overall.
    Site("SE", (0.7269, 0.6345, 0.2629), (0.1395, 0.9842, 0.1094), 0.90, 0.80, (238, 235, 239)),
    # H 3° towards blue, E 6° towards blue; strong eosin.
    Site("SF", (0.6399, 0.6891, 0.3402), (0.0689, 0.9745, 0.2134), 1.05, 1.20, (245, 241, 245)),
)


@dataclass(frozen=True)
class SlideLabels:
    """Ground-truth labels of a cancer slide; 1 = mutated / positive / Basal."""

    tp53: int
    pik3ca: int
    er: int
    pr: int
    her2: int
    basal: int

    def as_dict(self) -> dict[str, int]:
        """Return the labels keyed by the names in :data:`BIOMARKERS`."""
        return {name: int(getattr(self, name)) for name in BIOMARKERS}


@dataclass(frozen=True)
class Morphology:
    """What the renderer draws for one slide; every field is a float.

    Fractions are shares in [0, 1]. "Tumour area" is the area of tumour regions;
    the ``tumour_*``, gland, solid, necrosis and karyorrhexis fields are 0 on normal
    slides. Rules that set each field are in the module docstring.

    Attributes:
        tumour_fraction: Share of the tissue area that is tumour; Beta(0.45, 8)
            clipped to 0.10-0.85 on cancer slides, 0 on normal slides.
        gland_fraction: Share of tumour area forming glands/tubules; ER+/PR+ raise
            it, Basal drops it to ~0.02.
        solid_fraction: Share of the remaining (non-gland, non-necrotic) tumour area
            growing as solid sheets; the rest is nests and cords. Basal raises it,
            PR+ lowers it.
        necrosis_fraction: Share of tumour area that is necrotic; Basal raises it.
            ``gland_fraction + necrosis_fraction <= 0.95``.
        tumour_nucleus_major_um: Mean major axis of tumour nuclei, µm; ER+/PR+
            shrink it, Basal enlarges it.
        tumour_nucleus_axis_ratio: Mean major/minor axis ratio of tumour nuclei
            (>= 1.05); no label rule.
        tumour_nucleus_cv: Pleomorphism: coefficient of variation of tumour nuclear
            size (major axis) within the slide; HER2+ raises it.
        tumour_nucleolus_fraction: Radius of a tumour nucleus's nucleolus as a share
            of the nucleus's semi-axes (about 0.17 is an inconspicuous nucleolus,
            0.3 a prominent one); HER2+ raises it.
        tumour_density_per_mm2: Tumour nuclei per mm² of viable tumour area; Basal
            raises it, HER2+ lowers it.
        karyorrhexis_rate: Clusters of nuclear fragments per tumour nucleus;
            PIK3CA mutation raises it (Basal a little).
        lymphocyte_density_per_mm2: Lymphocytes per mm² of stroma, including the
            stroma between tumour nests; TP53 mutation raises it.
        tumour_lymphocyte_share: Density of lymphocytes inside tumour as a share of
            ``lymphocyte_density_per_mm2`` (tumour-infiltrating lymphocytes); TP53
            mutation raises it. 0 on normal slides.
        normal_nucleus_major_um: Mean major axis of normal epithelial nuclei, µm.
        stroma_fraction: Share of the non-tumour tissue that is fibrous stroma.
        fat_fraction: Share of the non-tumour tissue that is adipose tissue.
        normal_epithelium_fraction: Share of the non-tumour tissue that is normal
            ducts and lobules. The three composition shares sum to 1.
        hematoxylin_scale: Per-slide multiplier of hematoxylin optical density
            (stain intensity), on top of the site's ``h_strength``; HER2+ raises it.
        eosin_scale: Per-slide multiplier of eosin optical density, on top of the
            site's ``e_strength``.
    """

    tumour_fraction: float
    gland_fraction: float
    solid_fraction: float
    necrosis_fraction: float
    tumour_nucleus_major_um: float
    tumour_nucleus_axis_ratio: float
    tumour_nucleus_cv: float
    tumour_nucleolus_fraction: float
    tumour_density_per_mm2: float
    karyorrhexis_rate: float
    lymphocyte_density_per_mm2: float
    tumour_lymphocyte_share: float
    normal_nucleus_major_um: float
    stroma_fraction: float
    fat_fraction: float
    normal_epithelium_fraction: float
    hematoxylin_scale: float
    eosin_scale: float


@dataclass(frozen=True)
class SlideSpec:
    """Everything about one synthetic slide except its pixels.

    Attributes:
        slide_id: TCGA-like barcode, ``SYN-SA-0007-01Z-00-DX1`` (cancer) or
            ``SYN-SA-0007-11A-00-DX1`` (normal, sample type 11 as in TCGA).
        patient_id: ``SYN-<site>-<4 digits>``; one slide per patient.
        kind: ``"cancer"`` or ``"normal"``.
        site: The site whose stain style the slide has.
        labels: The six labels of a cancer slide; None for a normal slide.
        immune_score: Unitless expression-like immune score (about -3..+4); follows
            the lymphocyte density.
        morphology: What the renderer draws.
        seed: Non-negative 63-bit seed for the renderer's own random stream.
    """

    slide_id: str
    patient_id: str
    kind: str
    site: Site
    labels: SlideLabels | None
    immune_score: float
    morphology: Morphology
    seed: int


def _bernoulli(rng: np.random.Generator, p: float) -> int:
    return int(rng.random() < p)


def sample_labels(rng: np.random.Generator) -> SlideLabels:
    """Draw the six labels of one cancer slide from the conditional table.

    Args:
        rng: Random generator; six uniform draws are consumed.

    Returns:
        The labels, each 0 or 1.
    """
    basal = _bernoulli(rng, P_BASAL)
    er = _bernoulli(rng, P_ER_GIVEN_BASAL[basal])
    pr = _bernoulli(rng, P_PR_GIVEN_ER[er])
    her2 = _bernoulli(rng, P_HER2_GIVEN_BASAL[basal])
    tp53 = _bernoulli(rng, P_TP53_GIVEN_BASAL_HER2[(basal, her2)])
    pik3ca = _bernoulli(rng, P_PIK3CA_GIVEN_ER[er])
    return SlideLabels(tp53=tp53, pik3ca=pik3ca, er=er, pr=pr, her2=her2, basal=basal)


def label_probability(labels: SlideLabels) -> float:
    """Return the exact probability of a label combination under the table.

    Args:
        labels: One combination of the six labels.

    Returns:
        Its probability; the 64 combinations sum to 1.
    """

    def p(prob_one: float, value: int) -> float:
        return prob_one if value else 1.0 - prob_one

    return (
        p(P_BASAL, labels.basal)
        * p(P_ER_GIVEN_BASAL[labels.basal], labels.er)
        * p(P_PR_GIVEN_ER[labels.er], labels.pr)
        * p(P_HER2_GIVEN_BASAL[labels.basal], labels.her2)
        * p(P_TP53_GIVEN_BASAL_HER2[(labels.basal, labels.her2)], labels.tp53)
        * p(P_PIK3CA_GIVEN_ER[labels.er], labels.pik3ca)
    )


def _lognormal(rng: np.random.Generator, sigma: float) -> float:
    return math.exp(sigma * float(rng.standard_normal()))


def _beta_mean(rng: np.random.Generator, mean: float, concentration: float) -> float:
    return float(rng.beta(mean * concentration, (1.0 - mean) * concentration))


def _composition(
    rng: np.random.Generator, alpha: tuple[float, float, float]
) -> tuple[float, float, float]:
    stroma, fat, epithelium = (float(x) for x in rng.dirichlet(alpha))
    return stroma, fat, epithelium


def _normal_morphology(rng: np.random.Generator) -> Morphology:
    stroma, fat, epithelium = _composition(rng, (5.0, 4.0, 1.5))
    return Morphology(
        tumour_fraction=0.0,
        gland_fraction=0.0,
        solid_fraction=0.0,
        necrosis_fraction=0.0,
        tumour_nucleus_major_um=0.0,
        tumour_nucleus_axis_ratio=0.0,
        tumour_nucleus_cv=0.0,
        tumour_nucleolus_fraction=0.0,
        tumour_density_per_mm2=0.0,
        karyorrhexis_rate=0.0,
        lymphocyte_density_per_mm2=150.0 * _lognormal(rng, 0.45),
        tumour_lymphocyte_share=0.0,
        normal_nucleus_major_um=float(np.clip(rng.normal(7.5, 0.3), 6.5, 8.5)),
        stroma_fraction=stroma,
        fat_fraction=fat,
        normal_epithelium_fraction=epithelium,
        hematoxylin_scale=_lognormal(rng, 0.10),
        eosin_scale=_lognormal(rng, 0.08),
    )


def _cancer_morphology(labels: SlideLabels, rng: np.random.Generator) -> Morphology:
    basal, er, pr = labels.basal, labels.er, labels.pr
    tumour_fraction = float(np.clip(_beta_mean(rng, 0.45, 8.0), 0.10, 0.85))
    necrosis = min(_beta_mean(rng, 0.12 if basal else 0.03, 8.0), 0.6)
    gland_mean = 0.04 if basal else 0.10 + 0.30 * er + 0.10 * pr
    gland = min(_beta_mean(rng, gland_mean, 3.0), 0.95 - necrosis)
    solid = _beta_mean(rng, 0.55 if basal else 0.25 - 0.12 * pr, 4.0)
    major_mean_um = 11.5 - 1.0 * er - 1.0 * pr + 2.0 * basal
    major_um = float(np.clip(rng.normal(major_mean_um, 0.8), 7.0, 20.0))
    axis_ratio = max(1.4 * _lognormal(rng, 0.08), 1.05)
    cv = float(np.clip((0.15 + 0.15 * labels.her2) * _lognormal(rng, 0.22), 0.03, 0.8))
    density = (
        4000.0 * (1.3 if basal else 1.0) * (0.75 if labels.her2 else 1.0) * _lognormal(rng, 0.15)
    )
    karyorrhexis = (
        0.015 * (8.0 if labels.pik3ca else 1.0) * (1.5 if basal else 1.0) * _lognormal(rng, 0.5)
    )
    lymphocytes = 400.0 * (2.5 if labels.tp53 else 1.0) * _lognormal(rng, 0.3)
    stroma, fat, epithelium = _composition(rng, (6.0, 3.0, 1.0))
    normal_major_um = float(np.clip(rng.normal(7.5, 0.3), 6.5, 8.5))
    hematoxylin = (1.15 if labels.her2 else 1.0) * _lognormal(rng, 0.10)
    eosin = _lognormal(rng, 0.08)
    # Drawn last, so rules version 3 left every other draw of a slide as it was.
    nucleolus = 0.17 * (2.0 if labels.her2 else 1.0) * _lognormal(rng, 0.2)
    return Morphology(
        tumour_fraction=tumour_fraction,
        gland_fraction=gland,
        solid_fraction=solid,
        necrosis_fraction=necrosis,
        tumour_nucleus_major_um=major_um,
        tumour_nucleus_axis_ratio=axis_ratio,
        tumour_nucleus_cv=cv,
        tumour_nucleolus_fraction=float(np.clip(nucleolus, 0.08, 0.45)),
        tumour_density_per_mm2=density,
        karyorrhexis_rate=min(karyorrhexis, 0.5),
        lymphocyte_density_per_mm2=lymphocytes,
        tumour_lymphocyte_share=0.7 if labels.tp53 else 0.35,
        normal_nucleus_major_um=normal_major_um,
        stroma_fraction=stroma,
        fat_fraction=fat,
        normal_epithelium_fraction=epithelium,
        hematoxylin_scale=hematoxylin,
        eosin_scale=eosin,
    )


def morphology_for(kind: str, labels: SlideLabels | None, rng: np.random.Generator) -> Morphology:
    """Apply the documented morphology rules, with per-slide noise.

    Args:
        kind: ``"cancer"`` or ``"normal"``.
        labels: The slide's labels; required for cancer, must be None for normal.
        rng: Random generator for the per-slide noise.

    Returns:
        The slide's morphology.

    Raises:
        InvalidInput: Unknown kind, or labels missing (cancer) or given (normal).
    """
    if kind == NORMAL:
        if labels is not None:
            raise InvalidInput("a normal slide has no labels; pass labels=None")
        return _normal_morphology(rng)
    if kind == CANCER:
        if labels is None:
            raise InvalidInput("a cancer slide needs labels")
        return _cancer_morphology(labels, rng)
    raise InvalidInput(f"unknown slide kind {kind!r}: use {CANCER!r} or {NORMAL!r}")


#: Lymphocyte density (per mm² of stroma) at which the immune score is 0.
IMMUNE_REFERENCE_PER_MM2 = 400.0


def immune_score_for(morphology: Morphology, rng: np.random.Generator) -> float:
    """Return an expression-like immune score that follows lymphocyte density.

    The score is ``ln(density / 400) / 0.5 + N(0, 0.5)``: unitless, 0 at 400
    lymphocytes per mm² of stroma, +1.39 per doubling, with noise standing in for
    the error of estimating immune infiltration from bulk gene expression.

    Args:
        morphology: The slide's morphology (its lymphocyte density is used).
        rng: Random generator for the noise.

    Returns:
        The immune score.
    """
    density = max(morphology.lymphocyte_density_per_mm2, 1.0)
    return math.log(density / IMMUNE_REFERENCE_PER_MM2) / 0.5 + 0.5 * float(rng.standard_normal())


def _normal_count(m: int, normal_fraction: float) -> int:
    """Number of normal slides among the first ``m`` slides of a cohort."""
    count = math.floor(m * normal_fraction + 0.5)
    if m >= 2:
        count = min(max(count, 1), m - 1)
    return count


def _is_normal(index: int, normal_fraction: float) -> bool:
    return _normal_count(index + 1, normal_fraction) > _normal_count(index, normal_fraction)


def _validate_cohort_args(n_slides: Any, seed: Any, normal_fraction: Any) -> None:
    if isinstance(n_slides, bool) or not isinstance(n_slides, int | np.integer):
        raise InvalidInput(f"n_slides must be an integer, got {n_slides!r}")
    if not 1 <= n_slides <= MAX_SLIDES:
        raise InvalidInput(f"n_slides must be between 1 and {MAX_SLIDES}, got {n_slides}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise InvalidInput(f"seed must be a non-negative integer, got {seed!r}")
    if (
        isinstance(normal_fraction, bool)
        or not isinstance(normal_fraction, int | float | np.floating)
        or not 0.0 < float(normal_fraction) < 1.0
    ):
        raise InvalidInput(
            f"normal_fraction must be a number strictly between 0 and 1, got {normal_fraction!r}"
        )


def _slide_spec(index: int, seed: int, normal: bool) -> SlideSpec:
    rng = np.random.default_rng(np.random.SeedSequence([seed, SYNTH_TAG, _STREAM_SPEC, index]))
    render_state = np.random.SeedSequence([seed, SYNTH_TAG, _STREAM_RENDER, index])
    render_seed = int(render_state.generate_state(1, dtype=np.uint64)[0]) & (2**63 - 1)
    site = SITES[int(rng.integers(len(SITES)))]
    patient_id = f"SYN-{site.code}-{index:04d}"
    if normal:
        kind, labels, sample = NORMAL, None, "11A"
    else:
        kind, labels, sample = CANCER, sample_labels(rng), "01Z"
    morphology = morphology_for(kind, labels, rng)
    return SlideSpec(
        slide_id=f"{patient_id}-{sample}-00-DX1",
        patient_id=patient_id,
        kind=kind,
        site=site,
        labels=labels,
        immune_score=immune_score_for(morphology, rng),
        morphology=morphology,
        seed=render_seed,
    )


def sample_cohort(n_slides: int, seed: int, normal_fraction: float = 0.25) -> list[SlideSpec]:
    """Draw a synthetic cohort: one slide per patient, cancer and normal.

    Deterministic for ``seed`` and prefix-stable: slide ``i`` does not change when
    ``n_slides`` grows. The normal count is ``round_half_up(n_slides *
    normal_fraction)``, at least 1 and at most ``n_slides - 1`` when ``n_slides >= 2``;
    normal slides are spread evenly through the list. Sites are drawn uniformly at
    random per slide.

    Args:
        n_slides: Number of slides (= patients), 1 to 10000.
        seed: Non-negative cohort seed.
        normal_fraction: Share of normal slides, strictly between 0 and 1.

    Returns:
        The slide specs, in index order (patient numbers 0000, 0001, ...).

    Raises:
        InvalidInput: ``n_slides`` out of range, negative seed, or a fraction
            outside (0, 1).
    """
    _validate_cohort_args(n_slides, seed, normal_fraction)
    fraction = float(normal_fraction)
    return [
        _slide_spec(index, int(seed), _is_normal(index, fraction)) for index in range(int(n_slides))
    ]


#: The manifest columns a slide spec fills (all but ``slide_path``, which the
#: generator adds once the slide is written).
MANIFEST_COLUMNS: tuple[str, ...] = tuple(
    column for column in COHORT_MANIFEST_COLUMNS if column != "slide_path"
)


def manifest_rows(specs: list[SlideSpec]) -> list[dict[str, Any]]:
    """Return one manifest row per slide, keyed by :data:`MANIFEST_COLUMNS`.

    Labels are ints 0/1 for cancer slides and ``""`` for normal slides; ``split`` is
    ``""`` (assigned later by the cohort service); ``immune_score`` is rounded to
    4 decimals.

    Args:
        specs: Slide specs, e.g. from :func:`sample_cohort`.

    Returns:
        The rows, in the order of ``specs``.
    """
    rows: list[dict[str, Any]] = []
    for spec in specs:
        labels: dict[str, Any] = (
            spec.labels.as_dict() if spec.labels is not None else dict.fromkeys(BIOMARKERS, "")
        )
        rows.append(
            {
                "slide_id": spec.slide_id,
                "patient_id": spec.patient_id,
                "kind": spec.kind,
                "site": spec.site.code,
                "split": "",
                **labels,
                "immune_score": round(spec.immune_score, 4),
            }
        )
    return rows


#: Names of the :class:`Morphology` fields, in order (handy for tables).
MORPHOLOGY_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Morphology))
