"""Where the console script finds its config: an argument, else $VLLM_GUARD_CONFIG, else
./config.yaml (the container image sets the variable to its ConfigMap's mount)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway import cli

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "config.yaml"


@pytest.fixture
def broken(tmp_path: Path) -> Path:
    path = tmp_path / "broken.yaml"
    path.write_text("server:\n  port: eighty\n", encoding="utf-8")
    return path


def test_check_config_reads_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without a path, check-config validates the file $VLLM_GUARD_CONFIG names."""
    monkeypatch.setenv(cli.CONFIG_ENV, str(EXAMPLE))
    assert cli.main(["check-config"]) == 0
    assert capsys.readouterr().out.strip() == f"{EXAMPLE}: ok"


def test_an_argument_wins_over_the_variable(
    monkeypatch: pytest.MonkeyPatch, broken: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An explicit path is the one read, whatever the variable says."""
    monkeypatch.setenv(cli.CONFIG_ENV, str(broken))
    assert cli.main(["check-config", str(EXAMPLE)]) == 0
    assert cli.main(["check-config"]) == 1
    assert str(broken) in capsys.readouterr().err


def test_run_reads_the_variable(
    monkeypatch: pytest.MonkeyPatch, broken: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`run` without --config loads $VLLM_GUARD_CONFIG (a broken one: exit 1 naming it and
    the key, before anything listens)."""
    monkeypatch.setenv(cli.CONFIG_ENV, str(broken))
    assert cli.main(["run"]) == 1
    err = capsys.readouterr().err
    assert str(broken) in err
    assert "server.port" in err


@pytest.mark.parametrize("value", [None, "", "  "])
def test_without_the_variable_the_default_is_config_yaml(
    monkeypatch: pytest.MonkeyPatch, value: str | None
) -> None:
    """Unset or blank, the variable gives way to ./config.yaml."""
    if value is None:
        monkeypatch.delenv(cli.CONFIG_ENV, raising=False)
    else:
        monkeypatch.setenv(cli.CONFIG_ENV, value)
    assert cli.default_config_path() == "config.yaml"
