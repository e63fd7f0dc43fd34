"""Table 2 in the report: one best cell per column, however the table was joined."""

from __future__ import annotations

import pandas as pd

from services.analysis.report import _ablation_html


def _results(biomarker: str, best: str) -> pd.DataFrame:
    rows = []
    for patch_set in ("BD", "CD"):
        for group, n in (("all", 75), ("intensity", 24), ("spatial", 21)):
            auprc = 0.8 if group == best else 0.5
            rows.append(
                {
                    "biomarker": biomarker,
                    "patch_set": patch_set,
                    "group": group,
                    "n_features": n,
                    "auprc": auprc,
                    "ci_low": auprc - 0.1,
                    "ci_high": auprc + 0.1,
                    "prevalence": 0.3,
                }
            )
    return pd.DataFrame(rows)


def test_one_best_cell_per_column_when_tables_are_joined_without_renumbering() -> None:
    # Two biomarkers' tables concatenated as they come: index labels repeat.
    joined = pd.concat([_results("TP53", "spatial"), _results("ER", "intensity")])
    assert joined.index.duplicated().any()
    html = _ablation_html(joined)
    assert html.count('class="best"') == 4  # 2 biomarkers x 2 patch sets
    assert html == _ablation_html(joined.reset_index(drop=True))
