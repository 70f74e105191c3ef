"""The operator's view, as data and as text: the effective configuration with each value's
source, secrets redacted, and the terminal rendering `vllm-guard status` prints.

A value's source is `file` when config.yaml set it (its dotted `key` says where: a model's
entry or the defaults), `default` when nothing did, and `engine` when it was discovered from the
engine (a context length read from /v1/models). `engine.env` values and the value of any
`--api-key` argument are never shown. Pure: no I/O, no aiohttp.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel

from gateway.config import Config, Policy

REDACTED = "<redacted>"
SECRET_FLAGS = ("--api-key",)
SECTIONS = ("server", "admin", "engine", "isolation", "logging")


def redact_command(argv: Sequence[str] | None) -> list[str] | None:
    """argv with the value of each secret flag (`--api-key X`, `--api-key=X`) replaced."""
    if argv is None:
        return None
    out: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            out.append(REDACTED)
            hide_next = False
        elif arg in SECRET_FLAGS:
            out.append(arg)
            hide_next = True
        elif arg.startswith(tuple(f"{flag}=" for flag in SECRET_FLAGS)):
            out.append(arg.split("=", 1)[0] + "=" + REDACTED)
        else:
            out.append(arg)
    return out


def _section(model: BaseModel, prefix: str) -> dict[str, dict[str, Any]]:
    dumped = model.model_dump(mode="json")
    return {
        name: {
            "value": dumped[name],
            "source": "file" if name in model.model_fields_set else "default",
            **({"key": f"{prefix}.{name}"} if name in model.model_fields_set else {}),
        }
        for name in type(model).model_fields
    }


def _policy(
    config: Config, model: str | None, policy: Policy, max_model_len: int | None
) -> dict[str, dict[str, Any]]:
    entry = config.models.get(model) if model is not None else None
    dumped = policy.model_dump(mode="json")
    out: dict[str, dict[str, Any]] = {}
    for name in Policy.model_fields:
        if entry is not None and name in entry.model_fields_set:
            item = {"value": dumped[name], "source": "file", "key": f"models.{model}.{name}"}
        elif name in config.defaults.model_fields_set:
            item = {"value": dumped[name], "source": "file", "key": f"defaults.{name}"}
        else:
            item = {"value": dumped[name], "source": "default"}
        if name == "context_length" and dumped[name] is None and max_model_len is not None:
            item = {"value": max_model_len, "source": "engine", "key": "/v1/models max_model_len"}
        out[name] = item
    return out


def effective_config(config: Config, served: Mapping[str, int]) -> dict[str, Any]:
    """Every setting in force with its source; the policy of each configured or served
    model resolved (defaults merged), and the engine's models."""
    view: dict[str, Any] = {name: _section(getattr(config, name), name) for name in SECTIONS}
    engine = view["engine"]
    engine["command"]["value"] = redact_command(config.engine.command)
    engine["env"]["value"] = dict.fromkeys(config.engine.env, REDACTED)
    view["defaults"] = _policy(config, None, config.policy_for(None), None)
    names = list(dict.fromkeys([*config.models, *served]))
    view["models"] = {
        name: {
            "configured": name in config.models,
            "served": name in served,
            "policy": _policy(config, name, config.policy_for(name), served.get(name)),
        }
        for name in names
    }
    return view


# -- the terminal ------------------------------------------------------------------------------


def _when(ts: object) -> str:
    if not isinstance(ts, int | float):
        return "-"
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def _value(item: Mapping[str, Any]) -> str:
    source = item.get("source", "")
    where = f" ({item['key']})" if item.get("key") and source == "file" else ""
    return f"{item.get('value')!r}  [{source}{where}]"


def render_status(view: Mapping[str, Any]) -> str:
    """What `vllm-guard status` prints: the admin listener's GET /status for a person."""
    lines: list[str] = []
    reload = view.get("config", {})
    lines.append(
        f"config      {reload.get('path') or '(not from a file)'}  generation "
        f"{reload.get('generation')}  loaded {_when(reload.get('loaded_at'))}"
    )
    last = reload.get("last_reload")
    if last:
        lines.append(
            f"last reload {last['outcome']} ({last['trigger']}) at {_when(last['at'])}; "
            f"failures so far {reload.get('failures', 0)}"
        )
        if last.get("error"):
            lines.extend("            " + line for line in str(last["error"]).splitlines())
    lines.extend(
        f"pending     {key}: changed in the file, applies at the next gateway start"
        for key in reload.get("pending_gateway_restart", [])
    )
    lines.extend(
        f"pending     {key}: applies at the next engine restart"
        for key in reload.get("pending_engine_restart", [])
    )
    lines.extend(f"warning     {warning}" for warning in reload.get("warnings", []))
    engine = view.get("engine", {})
    shape = "supervised" if engine.get("supervised") else "sidecar"
    lines.append(
        f"engine      {engine.get('state')}  ({shape}, epoch {engine.get('epoch')}, "
        f"version {engine.get('version') or 'unknown'})"
    )
    models = engine.get("models") or {}
    lines.append(
        "models      "
        + (", ".join(f"{m} (max_model_len {n})" for m, n in models.items()) or "none known yet")
    )
    lines.append(
        f"in flight   {view.get('in_flight', 0)}{'  (draining)' if view.get('draining') else ''}"
    )
    quarantine = view.get("quarantine", {})
    entries = quarantine.get("entries", [])
    lines.append(
        f"quarantine  {len(entries)} entries, {len(quarantine.get('suspects', []))} suspects"
    )
    lines.extend(
        f"  {e['fingerprint']}  {e['model']}  until {_when(e['until'])}  {e['reason']}"
        for e in entries
    )
    changes = engine.get("recent_changes", [])
    if changes:
        lines.append("engine state changes (newest first)")
        lines.extend(
            f"  {_when(c['at'])}  {c['from']} -> {c['to']}  {c['reason']}" for c in changes[:10]
        )
    effective = view.get("effective")
    if effective:
        lines.append("effective configuration")
        for section in (*SECTIONS, "defaults"):
            for name, item in effective.get(section, {}).items():
                lines.append(f"  {section}.{name} = {_value(item)}")
        for model, entry in effective.get("models", {}).items():
            flags = ", ".join(
                f
                for f, on in (("configured", entry["configured"]), ("served", entry["served"]))
                if on
            )
            lines.append(f"  models.{model}  ({flags})")
            for name, item in entry["policy"].items():
                if item["source"] != "default":
                    lines.append(f"    {name} = {_value(item)}")
    return "\n".join(lines) + "\n"
