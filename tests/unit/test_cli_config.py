"""`vllm-guard check-config` and `run` read the files a policy names before anything serves:
a bad tokenizer path is a config error naming its key, never a 500 on each request."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.cli import main
from tests.helpers import MODEL_DIR

BAD = """\
admin:
  enabled: false
models:
  tiny:
    token_source: local
    tokenizer: /nonexistent/tokenizer
"""


def test_check_config_reads_the_tokenizer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """check-config exits 1 naming models.tiny.tokenizer and its line; a readable folder is ok."""
    path = tmp_path / "config.yaml"
    path.write_text(BAD)
    assert main(["check-config", str(path)]) == 1
    err = capsys.readouterr().err
    assert "models.tiny.tokenizer (line 6): /nonexistent/tokenizer is not a readable folder" in err
    path.write_text(BAD.replace("/nonexistent/tokenizer", str(MODEL_DIR)))
    assert main(["check-config", str(path)]) == 0
    assert capsys.readouterr().out == f"{path}: ok\n"


def test_check_config_warns_for_an_auto_folder_it_cannot_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With token_source auto an unreadable folder is valid (the engine counts) but said."""
    path = tmp_path / "config.yaml"
    path.write_text(BAD.replace("local", "auto"))
    assert main(["check-config", str(path)]) == 0
    assert "warning: models.tiny.tokenizer: /nonexistent/tokenizer" in capsys.readouterr().err


def test_run_refuses_a_bad_tokenizer_before_listening(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`run` with a bad local tokenizer exits 1 with the key, instead of serving 500s."""
    path = tmp_path / "config.yaml"
    path.write_text(BAD)
    assert main(["run", "--config", str(path)]) == 1
    assert "models.tiny.tokenizer (line 6)" in capsys.readouterr().err
