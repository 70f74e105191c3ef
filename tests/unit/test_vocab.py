"""gateway.vocab: the bound for token ids is the smaller of config.json's vocab_size and the
tokenizer's size, read from the model folder (test models where the two differ)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from engine.state import EngineState, StateChange
from gateway.config import parse_config
from gateway.vocab import Vocabularies, read_vocabulary
from tests.helpers import MODEL_DIR

TINY_VOCAB = 2000  # models/tiny: config.json and tokenizer.json agree


def model_folder(tmp_path: Path, vocab_size: int | None, *, text_config: bool = False) -> Path:
    """A model folder with tiny's tokenizer and a config.json saying `vocab_size`."""
    folder = tmp_path / f"model-{vocab_size}"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(MODEL_DIR / name, folder / name)
    config: dict[str, object] = {"model_type": "llama"}
    if vocab_size is not None:
        if text_config:
            config["text_config"] = {"vocab_size": vocab_size}
        else:
            config["vocab_size"] = vocab_size
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_the_tiny_model_agrees_with_itself() -> None:
    """models/tiny: both sizes 2000, and no tokenizer kept for bad words."""
    vocab = read_vocabulary(MODEL_DIR)
    assert vocab is not None
    assert (vocab.size, vocab.tokenizer_size, vocab.encode) == (TINY_VOCAB, TINY_VOCAB, None)


def test_a_smaller_model_vocabulary_wins(tmp_path: Path) -> None:
    """A tokenizer larger than the model's output: the model's size, and the tokenizer kept to
    tokenize bad words (its ids may fall past the output)."""
    vocab = read_vocabulary(model_folder(tmp_path, 1500))
    assert vocab is not None
    assert (vocab.size, vocab.tokenizer_size) == (1500, TINY_VOCAB)
    assert vocab.encode is not None
    assert vocab.encode("hello") == vocab.encode("hello")
    assert all(isinstance(i, int) for i in vocab.encode("hello"))


def test_a_smaller_tokenizer_wins(tmp_path: Path) -> None:
    """Padded embeddings (config larger than the tokenizer): the tokenizer's size."""
    vocab = read_vocabulary(model_folder(tmp_path, 2048, text_config=True))
    assert vocab is not None
    assert (vocab.size, vocab.tokenizer_size, vocab.encode) == (TINY_VOCAB, TINY_VOCAB, None)


def test_no_files_no_vocabulary(tmp_path: Path) -> None:
    """An empty folder says nothing; a config alone is enough."""
    assert read_vocabulary(tmp_path) is None
    (tmp_path / "config.json").write_text('{"vocab_size": 7}')
    vocab = read_vocabulary(tmp_path)
    assert vocab is not None
    assert vocab.size == 7


async def test_vocabularies_per_policy_and_refreshed_on_ready(tmp_path: Path) -> None:
    """An explicit limits.vocab_size wins; else the model folder (limits.model_dir, else the
    tokenizer folder) is read once and read again after the engine became ready."""
    folder = model_folder(tmp_path, 1500)
    config = parse_config(
        {
            "models": {
                "explicit": {"limits": {"vocab_size": 10}},
                "dir": {"tokenizer": str(MODEL_DIR), "limits": {"model_dir": str(folder)}},
                "tok": {"tokenizer": str(MODEL_DIR)},
                "none": {},
            }
        }
    )
    vocabs = Vocabularies()
    explicit = await vocabs.for_policy(config.policy_for("explicit"))
    assert explicit is not None
    assert explicit.size == 10
    by_dir = await vocabs.for_policy(config.policy_for("dir"))
    assert by_dir is not None
    assert by_dir.size == 1500
    tok = await vocabs.for_policy(config.policy_for("tok"))
    assert tok is not None
    assert tok.size == TINY_VOCAB
    assert await vocabs.for_policy(config.policy_for("none")) is None

    (folder / "config.json").write_text('{"vocab_size": 1200}')
    again = await vocabs.for_policy(config.policy_for("dir"))
    assert again is not None
    assert again.size == 1500  # kept until the engine is ready again
    vocabs.on_state_change(StateChange(EngineState.STARTING, EngineState.READY, "ready", 1))
    fresh = await vocabs.for_policy(config.policy_for("dir"))
    assert fresh is not None
    assert fresh.size == 1200
