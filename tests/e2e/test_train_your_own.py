"""README's "Train your own model", corpus to served model: the commands as a user runs them (a tokenizer learnt
from the standard library's documentation, a corpus, pre-training, chat fine-tuning on a few steps, `titans serve`),
and the shipped model that recipe trained (models/titans-docs-chat) answering a chat request in its domain."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.server_process import ServerProcess

ROOT = Path(__file__).resolve().parents[2]
DOCS_MODEL = ROOT / "models" / "titans-docs-chat"


def titans(*args: str, cwd: Path) -> None:
    subprocess.run([sys.executable, "-m", "titans", *args], check=True, cwd=cwd, timeout=600,
                   env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def docs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("docs")
    subprocess.run([sys.executable, str(ROOT / "bin" / "docs_chat_data.py"), str(out)], check=True, timeout=300,
                   stdout=subprocess.DEVNULL)
    return out


def chat(server: ServerProcess, model: Path, question: str) -> dict:
    body = {"model": model.name, "messages": [{"role": "user", "content": question}], "max_tokens": 80,
            "temperature": 0}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]


@pytest.mark.slow
def test_a_model_trained_from_a_corpus_by_the_readme_commands_serves_chat(docs, tmp_path):
    overrides = {"steps": 3, "batch_size": 2, "seq_len": 64, "eval_every": 2, "eval_windows": 1,
                 "checkpoint_every": 0, "compile": False}
    for name, options in (("pretrain", {"data": str(tmp_path / "corpus")}),
                          ("chat", {"data": str(tmp_path / "chat"), "init_from": str(tmp_path / "pretrain")})):
        (tmp_path / f"{name}.json").write_text(json.dumps({
            "extends": str(ROOT / "configs" / "paper" / "tiny.json"), "out_dir": str(tmp_path / name),
            **overrides, **options}))
    titans("tokenizer", "train", str(docs / "text"), "--out", str(tmp_path / "tokenizer"), "--vocab-size", "600",
           cwd=tmp_path)
    titans("corpus", "prepare", str(docs / "text"), "--out", str(tmp_path / "corpus"), "--tokenizer",
           str(tmp_path / "tokenizer"), cwd=tmp_path)
    titans("corpus", "prepare", str(docs / "chat.jsonl"), "--chat", "--out", str(tmp_path / "chat"), "--tokenizer",
           str(tmp_path / "tokenizer"), cwd=tmp_path)
    titans("train", "--config", str(tmp_path / "pretrain.json"), cwd=tmp_path)
    titans("train", "--config", str(tmp_path / "chat.json"), cwd=tmp_path)
    model = tmp_path / "chat"
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.json"} <= {
        p.name for p in model.iterdir()}
    config = json.loads((model / "config.json").read_text())
    assert config["tokenizer"] == "tokenizers" and config["vocab_size"] == 600 and config["eos_token_id"] == 0
    metrics = [json.loads(line) for line in (model / "metrics.jsonl").read_text().splitlines()]
    assert any("heldout" in m for m in metrics)
    with ServerProcess(model, f"sqlite:///{tmp_path}/sessions.db") as server:
        choice = chat(server, model, "What does json.dumps do?")
    assert choice["finish_reason"] in ("stop", "length")


def words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z]{3,}", text)


@pytest.mark.skipif(not DOCS_MODEL.exists(), reason="models/titans-docs-chat is trained by bin/train-docs-model")
def test_the_docs_chat_model_answers_in_the_words_of_the_python_documentation(docs, tmp_path):
    known = {w.lower() for p in (docs / "text").iterdir() for w in words(p.read_text())}
    lines = (docs / "heldout.jsonl").read_text().splitlines()
    questions = [json.loads(line)["messages"][0]["content"] for line in lines][:6]
    with ServerProcess(DOCS_MODEL, f"sqlite:///{tmp_path}/sessions.db") as server:
        answers = [chat(server, DOCS_MODEL, q) for q in questions]
    for question, choice in zip(questions, answers):
        reply = words(choice["message"]["content"])
        assert len(reply) >= 3, (question, choice)
        assert sum(w.lower() in known for w in reply) >= 0.8 * len(reply), (question, choice)
    assert sum(c["finish_reason"] == "stop" for c in answers) >= len(answers) // 2  # it ends its turn
