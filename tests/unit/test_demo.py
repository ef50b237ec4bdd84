"""``make demo``'s last line: the fill-mask guesses of the newest checkpoint."""

from __future__ import annotations

import pytest

from coordinator.demo import format_guesses


@pytest.mark.timeout(10)
def test_guesses_show_small_probabilities_in_percent():
    predictions = [{"token_str": "the", "score": 3.14e-5}, {"token_str": "value", "score": 0.4237}]
    assert format_guesses(predictions) == "the (0.0031%), value (42%)"
