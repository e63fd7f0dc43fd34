from __future__ import annotations

import io

from services.common.progress import ProgressBar


def test_bar_redraws_sparingly_and_ends_the_line() -> None:
    stream = io.StringIO()
    bar = ProgressBar("slide 1/2", "tiles", stream=stream, interval_s=3600)
    for done in range(1, 11):
        bar(done, 10)
    text = stream.getvalue()
    # The first call draws, the throttled middle ones do not, the last always does.
    assert text.count("\r") == 2
    assert "1/10 tiles" in text and "10/10 tiles" in text
    assert "[" + "#" * 30 + "]" in text and text.endswith("\n")
