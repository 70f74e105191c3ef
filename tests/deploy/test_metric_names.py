"""Every metric the dashboard and the alerting rules name is one a running gateway really
exports: read from a live app's GET /metrics (create_app on a real socket), not from a list.
docs/metrics.md, the reference they are checked against in test_monitoring.py, is held to
the same output in both directions."""

from __future__ import annotations

import re

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from gateway.app import create_app
from gateway.config import parse_config
from tests.deploy.manifests import metric_catalogue, named_expressions
from tests.deploy.promql import HISTOGRAM_SUFFIXES, metric_names
from tests.helpers import free_port

_TYPE = re.compile(r"^# TYPE (vllm_guard_[a-z0-9_]+) (counter|gauge|histogram|summary|untyped)$")


@pytest.fixture
async def exported() -> dict[str, str]:
    """The gateway's metric families as /metrics declares them (name to type), from an app in
    the sidecar shape with the shared quarantine configured (its Redis gauge is exported only
    then); neither the engine nor Redis needs to answer for the families to be declared."""
    config = parse_config(
        {
            "server": {"host": "127.0.0.1", "port": free_port()},
            "admin": {"enabled": False},
            "engine": {"url": f"http://127.0.0.1:{free_port()}"},
            "isolation": {"shared": {"url": f"redis://127.0.0.1:{free_port()}/0"}},
        }
    )
    async with (
        TestServer(create_app(config), host="127.0.0.1") as server,
        aiohttp.ClientSession() as session,
        session.get(server.make_url("/metrics")) as resp,
    ):
        assert resp.status == 200, await resp.text()
        assert resp.content_type == "text/plain"
        text = await resp.text()
    families = {m.group(1): m.group(2) for m in map(_TYPE.match, text.splitlines()) if m}
    assert families, text[:2000]
    return {name: kind for name, kind in families.items() if not _created(name, families)}


def _created(name: str, families: dict[str, str]) -> bool:
    """prometheus-client's `_created` gauge beside each counter and histogram (its creation
    time), which is the family's, not a metric of its own."""
    base = name.removesuffix("_created")
    return name != base and (
        families.get(base + "_total") == "counter" or families.get(base) == "histogram"
    )


def _exported_name(name: str, families: dict[str, str]) -> bool:
    if name in families:
        return True
    return any(
        name.endswith(suffix) and families.get(name.removesuffix(suffix)) == "histogram"
        for suffix in HISTOGRAM_SUFFIXES
    )


async def test_every_metric_the_dashboard_and_rules_name_is_exported(
    exported: dict[str, str],
) -> None:
    """No panel, variable or alert names a metric the gateway does not export."""
    missing = {
        f"{where}: {name}"
        for where, expr in named_expressions()
        for name in metric_names(expr)
        if not _exported_name(name, exported)
    }
    assert missing == set()


async def test_the_metric_reference_is_what_the_gateway_exports(
    exported: dict[str, str],
) -> None:
    """docs/metrics.md lists exactly the gateway's metric families, each with its type."""
    documented = {name: doc.type for name, doc in metric_catalogue().items()}
    assert documented == exported
