"""Settings every test shares.

The synthetic slides the tests make are small (the ``tiny`` preset is 1.0 x 0.77 mm
with 0.3-0.4 mm² of tissue), under the usable tissue a real slide needs to pass QC
(``QcThresholds.min_usable_mm2``, 0.5 mm²). Services the tests start, in process or
as subprocesses (which inherit the environment), take the generator's floor
(``services.synth.slide.QC_MIN_USABLE_MM2``); tests of the QC verdict itself give
their thresholds explicitly.
"""

from __future__ import annotations

import os

from services.synth.slide import QC_MIN_USABLE_MM2

os.environ["HISTOMARKER_QC_MIN_USABLE_MM2"] = str(QC_MIN_USABLE_MM2)
