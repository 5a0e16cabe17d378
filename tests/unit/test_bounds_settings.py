"""The stream and file bounds in Settings: defaults that follow --max-tokens, explicit
values, and what is refused (exit 2)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.errors import RunFatal
from pipeline.settings import MiB, Secret, Settings


def settings(**kw: object) -> Settings:
    return Settings(manifest=Path("m.csv"), out=Path("out"), base_url="http://127.0.0.1:1/v1",
                    api_key=Secret(""), **kw)  # type: ignore[arg-type]


def test_defaults_are_generous_floors_for_short_captions() -> None:
    s = settings(max_tokens=200)
    assert (s.line_cap, s.response_cap, s.attempt_deadline) == (1 * MiB, 16 * MiB, 600.0)
    assert (s.max_file_bytes, s.image_timeout) == (256 * MiB, 60.0)


def test_defaults_grow_with_max_tokens() -> None:
    s = settings(max_tokens=32_000)
    assert s.line_cap == 4096 * 32_000
    assert s.response_cap == 16384 * 32_000
    assert s.attempt_deadline == pytest.approx(3200.0)


def test_explicit_values_win_and_attempt_timeout_0_means_none() -> None:
    s = settings(max_line_bytes=1000, max_response_bytes=5000, attempt_timeout=12.5)
    assert (s.line_cap, s.response_cap, s.attempt_deadline) == (1000, 5000, 12.5)
    assert settings(attempt_timeout=0).attempt_deadline is None


@pytest.mark.parametrize("field, value", [
    ("max_line_bytes", 0), ("max_response_bytes", -1), ("max_file_bytes", 0),
    ("image_timeout", 0), ("attempt_timeout", -1)])
def test_bounds_that_allow_nothing_are_config_errors(field: str, value: float) -> None:
    with pytest.raises(RunFatal) as info:
        settings(**{field: value})
    assert info.value.exit_code == 2
    assert f"--{field.replace('_', '-')}" in info.value.message
