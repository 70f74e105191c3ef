"""The image definitions of deploy/images/, checked statically (no container runtime here),
and, as the stand-in for building one, the package installed the way the gateway image
installs it into a fresh virtual environment, its console script run as a non-root user."""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from gateway.cli import CONFIG_ENV
from gateway.config import ServerConfig, load_config
from tests.deploy.manifests import (
    ENGINE_IMAGE,
    GATEWAY_DOCKERFILE,
    ROOT,
    VLLM_DOCKERFILE,
    parse_dockerfile,
    pods,
)
from tests.helpers import free_port

DOCKERFILES = (GATEWAY_DOCKERFILE, VLLM_DOCKERFILE)
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
NON_ROOT_UID = 65534
"""Who runs the console script when the tests run as root (nobody)."""


def console_script() -> str:
    scripts = PYPROJECT["project"]["scripts"]
    [name] = [n for n, target in scripts.items() if target == "gateway.cli:main"]
    return str(name)


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_the_entry_point_is_tini_then_the_console_script(path: Path) -> None:
    """PID 1 is tini (it reaps the engine's orphans and forwards SIGTERM, which the gateway
    handles), then the package's real console script from the image's venv, running `run`."""
    final = parse_dockerfile(path).final
    entry = final.exec_form("ENTRYPOINT")
    assert entry[:2] == ["/usr/bin/tini", "--"]
    assert "-g" not in entry
    assert entry[2] == f"/opt/vllm-guard/bin/{console_script()}"
    assert final.exec_form("CMD") == ["run"]
    assert final.last("STOPSIGNAL") == "SIGTERM"
    installs = " ".join(final.all("RUN"))
    assert "install -y --no-install-recommends tini" in installs


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_the_image_runs_as_non_root(path: Path) -> None:
    """The final stage's USER is a numeric non-root uid (so runAsNonRoot can verify it), the
    user the image creates, and the one the manifests' gateway containers run as."""
    final = parse_dockerfile(path).final
    user, _, group = final.last("USER").partition(":")
    assert user.isdigit()
    assert int(user) != 0
    assert group == user
    assert f"--uid {user}" in " ".join(final.all("RUN"))
    image = "/vllm-guard-vllm:" if path == VLLM_DOCKERFILE else "/vllm-guard:"
    users = {
        p.gateway["securityContext"]["runAsUser"] for p in pods() if image in p.gateway["image"]
    }
    assert users == {int(user)}
    assert all(p.gateway["securityContext"]["runAsNonRoot"] for p in pods())


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_the_config_path_comes_from_the_environment(path: Path) -> None:
    """VLLM_GUARD_CONFIG (the variable the CLI reads) names the file the image bakes in, a
    valid config, in the directory the ConfigMaps are mounted over."""
    final = parse_dockerfile(path).final
    config_path = final.env()[CONFIG_ENV]
    assert posixpath.isabs(config_path)
    copies = [c.split() for c in final.all("COPY") if not c.startswith("--from")]
    [source] = [words[0] for words in copies if words[-1] == config_path]
    load_config(ROOT / source)
    mounts = {
        m["mountPath"] for p in pods() for m in p.gateway["volumeMounts"] if m["name"] == "config"
    }
    assert mounts == {posixpath.dirname(config_path)}


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_the_image_exposes_the_client_port_and_copies_real_files(path: Path) -> None:
    """EXPOSE is the gateway's default client port (only it); every COPY source exists."""
    dockerfile = parse_dockerfile(path)
    assert dockerfile.final.all("EXPOSE") == [str(ServerConfig.model_fields["port"].default)]
    for stage in dockerfile.stages:
        for copy in stage.all("COPY"):
            if copy.startswith("--from"):
                continue
            *sources, _ = copy.split()
            for source in sources:
                assert (ROOT / source).exists(), f"{path.name}: COPY {source}"


def test_the_gateway_image_is_small() -> None:
    """The gateway image builds in one stage and ships another: a slim Python base, the
    virtual environment copied over, no compiler or pip cache in the final stage."""
    dockerfile = parse_dockerfile(GATEWAY_DOCKERFILE)
    assert len(dockerfile.stages) == 2
    assert all("-slim" in stage.base for stage in dockerfile.stages)
    assert dockerfile.final.all("COPY")[0] == "--from=build /opt/vllm-guard /opt/vllm-guard"
    assert "rm -rf /var/lib/apt/lists/*" in " ".join(dockerfile.final.all("RUN"))
    assert dockerfile.stages[0].env()["PIP_NO_CACHE_DIR"] == "1"


def test_the_single_container_image_is_the_pinned_vllm_with_the_gateway_apart() -> None:
    """FROM the official vLLM image at the release pinned in pyproject's `engine` extra (the
    same tag the sidecar manifests run), the gateway in a venv of its own that is not on PATH
    (engine.command's `vllm` must be the image's)."""
    [pin] = PYPROJECT["project"]["optional-dependencies"]["engine"]
    version = pin.split("==")[1]
    dockerfile = parse_dockerfile(VLLM_DOCKERFILE)
    assert dockerfile.final.base == f"{ENGINE_IMAGE}v{version}"
    engines = {p.engine["image"] for p in pods() if p.engine is not None}
    assert engines == {dockerfile.final.base}
    assert "/opt/vllm-guard" not in dockerfile.final.env().get("PATH", "")
    runs = " ".join(dockerfile.final.all("RUN"))
    assert "python3 -m venv --without-pip /opt/vllm-guard" in runs
    assert "pip --python /opt/vllm-guard/bin/python install" in runs


# --- the stand-in for a build ---------------------------------------------------------------


def _as_non_root() -> list[str]:
    """The prefix that drops root for the console script (nothing when not root)."""
    if os.geteuid() != 0:
        return []
    uid = NON_ROOT_UID
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--"]


def _others_can_run(path: Path) -> bool:
    """Whether a user who is neither the owner nor in the group can execute `path`."""
    path = path.resolve()
    return all(p.stat().st_mode & stat.S_IXOTH for p in [path, *path.parents])


def _base_python() -> str:
    """A Python of this version that the non-root user can execute, as an image's
    /usr/local/bin/python is: this interpreter's base when others can run it (a Python under
    root's home cannot be), else the system's of the same version."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [
        Path(getattr(sys, "_base_executable", sys.executable)),
        Path("/usr/local/bin", version),
        Path("/usr/bin", version),
    ]
    for candidate in candidates:
        if candidate.exists() and (os.geteuid() != 0 or _others_can_run(candidate)):
            return str(candidate)
    raise AssertionError(f"no {version} that a non-root user can run among {candidates}")


@pytest.fixture(scope="module")
def installed() -> Iterator[Path]:
    """A fresh venv with the package installed from exactly what the gateway image's build
    stage copies (pip, from the registry and its cache), readable by a non-root user."""
    top = Path(tempfile.mkdtemp(prefix="vllm-guard-image-"))
    try:
        top.chmod(0o755)
        src = top / "src"
        build = parse_dockerfile(GATEWAY_DOCKERFILE).stages[0]
        for copy in build.all("COPY"):
            *sources, dest = copy.split()
            target = src / Path(dest).relative_to("/src")
            for source in sources:
                origin = ROOT / source
                if origin.is_dir():
                    shutil.copytree(origin, target, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    target.mkdir(parents=True, exist_ok=True)
                    shutil.copy(origin, target / origin.name)
        venv = top / "venv"
        subprocess.run([_base_python(), "-m", "venv", str(venv)], check=True, timeout=120)
        subprocess.run(
            [str(venv / "bin" / "pip"), "install", "--quiet", str(src)],
            check=True,
            timeout=540,
            env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
        )
        for path in [top, *top.rglob("*")]:  # world-readable, as an image layer is
            mode = path.lstat().st_mode
            if not stat.S_ISLNK(mode):
                path.chmod(mode | stat.S_IRGRP | stat.S_IROTH | (0o055 if path.is_dir() else 0))
        yield venv
    finally:
        shutil.rmtree(top, ignore_errors=True)


def _env(**extra: str) -> dict[str, str]:
    keep = {k: os.environ[k] for k in ("PATH", "LANG", "LC_ALL") if k in os.environ}
    return {**keep, "HOME": "/nonexistent", "PYTHONDONTWRITEBYTECODE": "1", **extra}


def test_check_config_runs_from_the_fresh_venv_as_non_root(installed: Path) -> None:
    """`vllm-guard check-config` from the installed console script, as a non-root user,
    accepts the example config.yaml (with the tokenizer folder it names) and the images'
    baked configs via VLLM_GUARD_CONFIG, and refuses a broken one."""
    script = str(installed / "bin" / console_script())
    work = installed.parent / "work"
    work.mkdir()
    shutil.copy(ROOT / "config.yaml", work / "config.yaml")
    tiny = ROOT / "models" / "tiny"
    if tiny.is_dir():  # the folder the example config's `tokenizer` names, files only
        (work / "models" / "tiny").mkdir(parents=True)
        for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
            if (tiny / name).exists():
                shutil.copy(tiny / name, work / "models" / "tiny" / name)
    (work / "broken.yaml").write_text("engine:\n  url: [1]\n", encoding="utf-8")
    for path in [work, *work.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)

    def run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*_as_non_root(), script, *args],
            cwd=work,
            env=_env(**env),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    result = run("check-config", "config.yaml")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "config.yaml: ok"
    for baked in ("config.default.yaml", "config.single.yaml"):
        result = run("check-config", **{CONFIG_ENV: str(ROOT / "deploy" / "images" / baked)})
        assert result.returncode == 0, result.stderr
    result = run("check-config", "broken.yaml")
    assert result.returncode == 1
    assert "engine.url" in result.stderr


def _get(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return None


def test_run_serves_and_stops_on_sigterm_as_non_root(installed: Path) -> None:
    """`vllm-guard run`, config from VLLM_GUARD_CONFIG, as a non-root user, starts the
    emulator the fresh venv installed (single-container shape), reaches /health and /ready,
    and on SIGTERM drains and exits 0 with its engine stopped."""
    port, admin, engine = free_port(), free_port(), free_port()
    python = str(installed / "bin" / "python")
    config = {
        "server": {"host": "127.0.0.1", "port": port, "shutdown_grace_s": 2},
        "admin": {"host": "127.0.0.1", "port": admin},
        "engine": {
            "url": f"http://127.0.0.1:{engine}",
            "command": [python, "-m", "engine.emulator", "--port", str(engine)],
            "stop_grace_s": 5,
        },
        "logging": {"format": "json"},
    }
    path = installed.parent / "run.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    path.chmod(0o644)
    proc = subprocess.Popen(
        [*_as_non_root(), str(installed / "bin" / console_script()), "run"],
        env=_env(**{CONFIG_ENV: str(path)}),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and _get(f"http://127.0.0.1:{port}/ready") != 200:
            assert proc.poll() is None, proc.communicate()[0]
            time.sleep(0.2)
        assert _get(f"http://127.0.0.1:{port}/health") == 200
        assert _get(f"http://127.0.0.1:{port}/ready") == 200
        uid = _uid_of(proc.pid)
        assert uid != 0 or os.geteuid() != 0
        assert uid == (NON_ROOT_UID if os.geteuid() == 0 else os.geteuid())
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
        events = [json.loads(line)["event"] for line in out.splitlines() if line.startswith("{")]
        assert "gateway_draining" in events
        assert events[-1] == "gateway_stopped"
        assert _get(f"http://127.0.0.1:{engine}/health") is None  # the engine went with it
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def _uid_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid in /proc/{pid}/status")
