"""PromptTokenizer against vLLM itself: the same prompt token ids for every request of the corpus.

The reference comes from vLLM 0.32's own request models and renderer, run once per session in
the engine's virtual environment (tests/engine_reference.py, no engine started). These tests run
in the gateway's environment, which has neither vLLM nor transformers.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from engine.tokenization import (
    InvalidChat,
    PromptTokenizer,
    UnsupportedLocally,
)
from tests.helpers import MODEL_DIR, ROOT
from tests.real_engine import ENGINE_PYTHON, MAX_MODEL_LEN
from tests.token_corpus import TEMPLATES_DIR, Case, cases, local_ids, template, template_paths

CORPUS = cases()
# What the local path leaves to the engine's /tokenize, on purpose.
EXPECTED_UNSUPPORTED = {"unsupported-image"}

VARIANT_TEMPLATE = (
    "{{- bos_token }}[eos={{ eos_token }} unk={{ unk_token }} marker={{ marker_token }}]\n"
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
VARIANT_CASES: list[Case] = [
    {
        "id": "v-default",
        "kind": "chat",
        "body": {"messages": [{"role": "user", "content": "hi <|marker|> <unk>"}]},
    },
    {
        "id": "v-tools-pick-tool-use",
        "kind": "chat",
        "body": {
            "messages": [{"role": "user", "content": "weather?"}],
            "tools": [{"type": "function", "function": {"name": "f"}}],
        },
    },
    {
        "id": "v-named-template",
        "kind": "chat",
        "body": {"messages": [{"role": "user", "content": "named"}], "chat_template": "tool_use"},
    },
    {
        "id": "v-literal-template",
        "kind": "chat",
        "body": {
            "messages": [{"role": "user", "content": "lit"}],
            "chat_template": "{% for m in messages %}{{ m.content }}|{% endfor %}{{ eos_token }}",
        },
    },
    {
        "id": "v-cmpl-added-tokens",
        "kind": "completion",
        "body": {"prompt": "x <unk><|marker|>y </s> <pad>"},
    },
]
SERVER: dict[str, Any] = {
    "chat_template": template("features"),
    "chat_template_kwargs": {"persona": "server persona", "enable_thinking": True},
}
SERVER_CASES: list[Case] = [
    {
        "id": "s-server-template",
        "kind": "chat",
        "body": {"messages": [{"role": "user", "content": "u"}]},
    },
    {
        "id": "s-request-kwargs-win",
        "kind": "chat",
        "body": {
            "messages": [{"role": "user", "content": "u"}],
            "chat_template_kwargs": {"persona": "request persona"},
            "reasoning_effort": "none",
        },
    },
    {
        "id": "s-request-template-wins",
        "kind": "chat",
        "body": {
            "messages": [{"role": "user", "content": "u"}],
            "chat_template": template("vllm_chatml"),
        },
    },
]
DETECTION_TEMPLATES = [
    *(p.read_text(encoding="utf-8") for p in template_paths()),
    "{% set msgs = messages %}{% for m in msgs %}{% for c in m.content %}{{ c.text }}"
    "{% endfor %}{% endfor %}",
    "{% for m in messages[1:] %}{% for c in m['content'] | selectattr('type') %}{{ c }}"
    "{% endfor %}{% endfor %}",
    "{% for m in messages %}{% set content = m.content %}{% for c in content %}{{ c }}"
    "{% endfor %}{% endfor %}",
    "{% for m in messages %}{% for k, v in m.content %}{{ v }}{% endfor %}{% endfor %}",
    "{% for i, m in messages | enumerate %}{{ m.content }}{% endfor %}",
    "{% for m in messages %}{{ m['content'][0]['text'] }}{% endfor %}",
    "{{ messages | tojson }}",
    "{% for m in messages %}{% generation %}{% for p in m.content %}{{ p.text }}{% endfor %}"
    "{% endgeneration %}{% endfor %}",
]


def _variant_dir(root: Path) -> Path:
    folder = root / "variant"
    folder.mkdir()
    for name in ("config.json", "generation_config.json", "tokenizer.json", "model.safetensors"):
        shutil.copy(MODEL_DIR / name, folder / name)
    config = json.loads((MODEL_DIR / "tokenizer_config.json").read_text(encoding="utf-8"))
    del config["chat_template"]
    config["unk_token"] = "<unk>"  # not in the vocabulary: transformers adds it
    config["marker_token"] = "<|marker|>"  # a model-specific special token
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    # An old special_tokens_map.json overrides the config's eos token.
    (folder / "special_tokens_map.json").write_text(
        json.dumps({"eos_token": "<|im_end|>"}), encoding="utf-8"
    )
    (folder / "chat_template.jinja").write_text(VARIANT_TEMPLATE, encoding="utf-8")
    (folder / "additional_chat_templates").mkdir()
    shutil.copy(
        TEMPLATES_DIR / "tools_llama_style.jinja",
        folder / "additional_chat_templates" / "tool_use.jinja",
    )
    return folder


@pytest.fixture(scope="session")
def model_dir() -> Path:
    if not (MODEL_DIR / ".tiny-model-complete").is_file():
        if not ENGINE_PYTHON.is_file():
            pytest.fail(
                "models/tiny is missing and so is the engine environment that makes "
                "it: run `make engine model` (make test does)"
            )
        subprocess.run(
            [str(ENGINE_PYTHON), str(ROOT / "scripts" / "make_tiny_model.py"), str(MODEL_DIR)],
            check=True,
            timeout=300,
        )
    return MODEL_DIR


@pytest.fixture(scope="session")
def variant_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _variant_dir(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def reference(model_dir: Path, variant_dir: Path) -> dict[str, Any]:
    """vLLM's answers for the corpus, the variant model and the server defaults (one run of
    the helper: importing vLLM takes a while)."""
    if not ENGINE_PYTHON.is_file():
        pytest.fail(
            "the engine environment (.venv-engine) is missing: run `make engine` (make test does)"
        )
    request = {
        "runs": [
            {"model_dir": str(model_dir), "cases": CORPUS},
            {"model_dir": str(variant_dir), "cases": VARIANT_CASES},
            {"model_dir": str(model_dir), "cases": SERVER_CASES, "server": SERVER},
        ],
        "templates": DETECTION_TEMPLATES,
    }
    done = subprocess.run(
        [str(ENGINE_PYTHON), str(ROOT / "tests" / "engine_reference.py")],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    answer = json.loads(done.stdout)
    runs = answer["runs"]
    by_id: dict[str, Any] = {}
    for run, run_cases in zip(runs, (CORPUS, VARIANT_CASES, SERVER_CASES), strict=True):
        for case, result in zip(run_cases, run["results"], strict=True):
            by_id[case["id"]] = result
    return {"cases": by_id, "formats": answer["formats"]}


def _expected_count(case: Case, ids: list[int]) -> int:
    """vLLM's truncation: keep k tokens; -1 is the window, less one with an output limit."""
    body = case["body"]
    k = body.get("truncate_prompt_tokens")
    if k is None:
        return len(ids)
    if k == -1:
        # A completion's max_tokens defaults to 16, null included; a chat's to none.
        limited = body.get("max_tokens") or (16 if case["kind"] == "completion" else None)
        k = MAX_MODEL_LEN - 1 if limited else MAX_MODEL_LEN
    return min(len(ids), int(k))


def _check(tok: PromptTokenizer, case: Case, ref: dict[str, Any]) -> None:
    if ref["error"] is not None:
        with pytest.raises(InvalidChat):
            local_ids(tok, case)
        return
    ids, text = local_ids(tok, case)
    assert ref["error"] is None, f"vLLM rejects ({ref['error']}) what the local path counts"
    if text is not None:
        assert text == ref["prompt"]
    if "truncate_prompt_tokens" in case["body"]:
        assert [_expected_count(case, i) for i in ids] == [len(i) for i in ref["ids"]]
    else:
        assert ids == ref["ids"]


@pytest.mark.parametrize("case", CORPUS, ids=[c["id"] for c in CORPUS])
def test_corpus_matches_vllm(tok: PromptTokenizer, reference: dict[str, Any], case: Case) -> None:
    """Every corpus request renders to vLLM's prompt text and tokenizes to its ids; what vLLM
    rejects the local path rejects too, and only the expected cases are left to the engine."""
    ref = reference["cases"][case["id"]]
    if case["id"] in EXPECTED_UNSUPPORTED:
        with pytest.raises(UnsupportedLocally):
            local_ids(tok, case)
        return
    _check(tok, case, ref)


@pytest.mark.parametrize("case", VARIANT_CASES, ids=[c["id"] for c in VARIANT_CASES])
def test_template_files_and_special_tokens_match_vllm(
    variant_dir: Path, reference: dict[str, Any], case: Case
) -> None:
    """chat_template.jinja, additional_chat_templates/ (tool_use picked when tools are sent,
    a template named by the request), special_tokens_map.json and special tokens missing from
    the vocabulary are read as transformers reads them."""
    _check(PromptTokenizer.from_dir(variant_dir), case, reference["cases"][case["id"]])


@pytest.mark.parametrize("case", SERVER_CASES, ids=[c["id"] for c in SERVER_CASES])
def test_server_defaults_match_vllm(model_dir: Path, reference: dict[str, Any], case: Case) -> None:
    """The server's --chat-template and --default-chat-template-kwargs apply under the
    request's own template and kwargs, as in vLLM."""
    tok = PromptTokenizer.from_dir(
        model_dir,
        chat_template=SERVER["chat_template"],
        chat_template_kwargs=SERVER["chat_template_kwargs"],
    )
    _check(tok, case, reference["cases"][case["id"]])


def test_content_format_detection_matches_vllm(
    tok: PromptTokenizer, reference: dict[str, Any]
) -> None:
    """The 'string' / 'openai' content format is detected from the template as vLLM does."""
    local = [tok._compiled_template(t).content_format for t in DETECTION_TEMPLATES]
    assert local == reference["formats"]
    assert {"string", "openai"} <= set(local)
