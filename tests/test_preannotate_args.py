"""backend.preannotate's command line: bad combinations are refused by name before anything runs."""

from __future__ import annotations

import pytest

from backend.preannotate import parse_args

BASE = ["--project", "3", "--url", "http://127.0.0.1:8080", "--api-key", "k" * 20]


def test_ray_flag_takes_an_optional_address(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert parse_args(BASE).ray is None
    assert parse_args([*BASE, "--ray"]).ray == ""
    assert parse_args([*BASE, "--ray", "auto", "--actors", "2"]).ray == "auto"


def test_ray_address_in_the_environment_turns_ray_on(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "head:6379")
    assert parse_args(BASE).ray == ""  # ray.init reads RAY_ADDRESS itself


@pytest.mark.parametrize(("extra", "message"), [
    (["--ray", "--actors", "0"], "--actors must be at least 1"),
    (["--ray", "auto", "--prompt", "cat"], "--prompt is not used with --ray"),
])
def test_bad_ray_options_are_refused_by_name(monkeypatch, capsys, extra, message):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        parse_args([*BASE, *extra])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
