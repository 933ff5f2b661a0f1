"""Triton's logging switches onto Ferry's one log threshold, and back."""
from __future__ import annotations

import pytest

from daemon.errors import InvalidInput
from frontends.http.kserve_settings import level_for, log_settings


@pytest.mark.parametrize("level", ["debug", "info", "warning", "error", "critical"])
def test_every_level_reads_back_as_itself(level):
    assert level_for(log_settings(level, "json")) == level


def test_switches_map_to_thresholds():
    base = log_settings("info", "json")
    assert level_for({**base, "log_verbose_level": 3}) == "debug"
    assert level_for({**base, "log_info": False}) == "warning"
    assert level_for({**base, "log_info": False, "log_warnings": False}) == "error"
    assert level_for({**base, "log_info": False, "log_warnings": False,
                      "log_errors": False}) == "critical"


@pytest.mark.parametrize("change, param", [
    ({"log_warnings": False}, "log_warnings"),                    # info on, warnings off
    ({"log_info": False, "log_errors": False}, "log_errors"),     # warnings on, errors off
    ({"log_info": False, "log_verbose_level": 1}, "log_verbose_level"),
])
def test_what_a_threshold_cannot_express_is_refused(change, param):
    with pytest.raises(InvalidInput) as err:
        level_for({**log_settings("info", "json"), **change})
    assert (err.value.code, err.value.param) == ("log_setting_unsupported", param)
