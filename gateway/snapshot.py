"""A config file made into a snapshot validated completely, files included.

`load_config` checks the YAML against the models. A snapshot also needs the files the
policies name: each model's tokenizer folder and chat template are loaded here, and the token
counters made from them, so that nothing is loaded lazily on the request path and a bad path
is a config error naming its key and line (never a 500 on each request of that model).

Loading tokenizers takes a while: `load_snapshot` is blocking, and the reloader runs it in a
worker thread. `vllm-guard check-config` runs it too. This module does not import aiohttp.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

from gateway.config import Config, ConfigError, Policy, TokenSource, line_of, load_document
from gateway.tokens import TokenCounter, TokenCounters


@dataclass(frozen=True, slots=True)
class Snapshot:
    config: Config
    counters: Mapping[str, tuple[Policy, TokenCounter]]
    """The token counter of each configured (and each served) model, made from its policy."""
    warnings: tuple[str, ...] = ()
    """What works but is likely not what the operator meant (an `auto` tokenizer folder that
    cannot be read: the engine counts)."""


def load_snapshot(
    path: str | Path, counters: TokenCounters, served: Iterable[str] = ()
) -> Snapshot:
    """Read, validate and prepare `path` (blocking). Raises ConfigError listing every key
    that is wrong, with its line. `served`: the engine's model names, whose counters are made
    too (with the defaults when config.yaml does not name them)."""
    config, root = load_document(path)
    return prepare_snapshot(config, counters, served, source=str(path), root=root)


def prepare_snapshot(
    config: Config,
    counters: TokenCounters,
    served: Iterable[str] = (),
    *,
    source: str = "config",
    root: yaml.Node | None = None,
) -> Snapshot:
    """Check the files `config` names and make its counters (blocking)."""
    errors: list[str] = []
    warnings: list[str] = []
    prepared: dict[str, tuple[Policy, TokenCounter]] = {}
    names = list(config.models) + [m for m in dict.fromkeys(served) if m not in config.models]
    # The defaults are checked on their own when they name files: a model the engine serves
    # later, unnamed in the file, uses them.
    entries: list[str | None] = [*names, None]
    for model in entries:
        if model is None and not _names_files(config, None):
            continue
        policy = config.policy_for(model)
        found = _check_files(config, model, policy)
        errors.extend(_at(root, key, message) for key, message in found.errors)
        warnings.extend(f"{key}: {message}" for key, message in found.warnings)
        if found.errors:
            continue
        try:
            counter = counters.prepare(model or "", policy)
        except ConfigError as err:
            detail = str(err).partition(": ")[2] or str(err)
            errors.append(_at(root, _key(config, model, "tokenizer"), detail))
            continue
        if model is not None:
            prepared[model] = (policy, counter)
    if errors:
        raise ConfigError("\n".join([f"{source}: invalid configuration", *dict.fromkeys(errors)]))
    return Snapshot(config, prepared, tuple(dict.fromkeys(warnings)))


@dataclass(slots=True)
class _Found:
    errors: list[tuple[str, str]]
    warnings: list[tuple[str, str]]


def _check_files(config: Config, model: str | None, policy: Policy) -> _Found:
    """The files a policy names: readable, or (key, what is wrong)."""
    found = _Found([], [])
    if policy.token_source is TokenSource.ENGINE:
        return found  # the engine counts: the gateway reads no file of this model
    local = policy.token_source is TokenSource.LOCAL
    if policy.tokenizer is None:
        if local:
            found.errors.append(
                (
                    _key(config, model, "token_source"),
                    "token_source local needs a tokenizer folder (set `tokenizer`)",
                )
            )
    else:
        folder = Path(policy.tokenizer)
        problem = None
        if not folder.is_dir():
            problem = f"{folder} is not a readable folder"
        elif not (folder / "tokenizer.json").is_file():
            problem = f"{folder} has no tokenizer.json"
        if problem is not None:
            key = _key(config, model, "tokenizer")
            if local:
                found.errors.append((key, problem))
            else:
                found.warnings.append((key, f"{problem}; the engine's /tokenize counts instead"))
    if policy.chat_template is not None:
        try:
            Path(policy.chat_template).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            why = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
            found.errors.append(
                (
                    _key(config, model, "chat_template"),
                    f"cannot read the chat template {policy.chat_template}: {why}",
                )
            )
    return found


def _names_files(config: Config, model: str | None) -> bool:
    policy = config.policy_for(model)
    return policy.tokenizer is not None or policy.chat_template is not None


def _key(config: Config, model: str | None, field: str) -> str:
    """Where a policy field's value was written: the model's entry, else the defaults."""
    entry = config.models.get(model) if model is not None else None
    if entry is not None and field in entry.model_fields_set:
        return f"models.{model}.{field}"
    return f"defaults.{field}"


def _at(root: yaml.Node | None, key: str, message: str) -> str:
    first, _, rest = key.partition(".")
    parts: tuple[str, ...] = (first, *rest.rsplit(".", 1)) if first == "models" else (first, rest)
    line = line_of(root, parts)
    return f"  {key}{f' (line {line})' if line is not None else ''}: {message}"
