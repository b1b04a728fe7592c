"""The docs-chat model (models/titans-docs-chat) on the questions of the modules its recipe held out: each asked
alone in a fresh session through the chat template, greedy. Reports how many replies end their turn (end-of-text or
the next turn's marker) within --max-tokens, the share of the replies' words that occur in the documentation corpus,
the same share for the model before its chat fine-tuning (runs/docs-pretrain, when present) and for a
random-weight model of the same shape (controls), and the first replies.

usage: python bench/docs_chat.py [--model models/titans-docs-chat] [--questions 40] [--out MODEL/eval-chat.json]
"""

import argparse
import importlib.util
import json
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine import Engine, SamplingParams  # noqa: E402
from engine.tokenizer import ChatTemplate  # noqa: E402


def words(text: str) -> list[str]:
    return [w.lower() for w in re.findall(r"[A-Za-z]{3,}", text)]


def ask(engine: Engine, template: ChatTemplate, questions: list[str], max_tokens: int) -> list[dict]:
    rows = []
    for question in questions:
        prompt = engine.tokenizer.encode(template.render([("user", question)]))
        done = engine.complete(prompt, engine.new_state(),
                               SamplingParams(max_tokens=max_tokens, temperature=0, stop=template.stop))
        text = engine.tokenizer.decode([t for t in done.token_ids if t != engine.config.eos_token_id])
        rows.append({"question": question, "reply": text.strip(), "finish_reason": done.finish_reason})
    return rows


def summary(rows: list[dict], known: set[str]) -> dict:
    replied = [w for r in rows for w in words(r["reply"])]
    return {"ended_turn": sum(r["finish_reason"] == "stop" for r in rows) / len(rows),
            "corpus_word_share": sum(w in known for w in replied) / max(1, len(replied)),
            "words_per_reply": len(replied) / len(rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/titans-docs-chat")
    parser.add_argument("--pretrained", default="runs/docs-pretrain")
    parser.add_argument("--questions", type=int, default=40)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    spec = importlib.util.spec_from_file_location("docs_chat_data", ROOT / "bin" / "docs_chat_data.py")
    docs_chat_data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(docs_chat_data)
    with tempfile.TemporaryDirectory() as tmp:
        docs_chat_data.main(tmp)
        known = {w for p in Path(tmp, "text").iterdir() for w in words(p.read_text())}
        lines = Path(tmp, "heldout.jsonl").read_text().splitlines()
        held_out = [json.loads(line)["messages"][0]["content"] for line in lines]
    questions = held_out[:args.questions]
    model = Engine.load(args.model, device="cpu")
    template = ChatTemplate.load(args.model)
    result = {"model": args.model, "questions": len(questions), "max_tokens": args.max_tokens}
    rows = ask(model, template, questions, args.max_tokens)
    result["chat"] = summary(rows, known)
    if Path(args.pretrained, "model.safetensors").exists():
        result["before_chat_fine_tuning"] = summary(
            ask(Engine.load(args.pretrained, device="cpu"), template, questions, args.max_tokens), known)
    random_model = Engine.from_config(model.config, seed=0, tokenizer_dir=args.model, device="cpu")
    result["random_weights"] = summary(ask(random_model, template, questions, args.max_tokens), known)
    result["replies"] = rows[:10]
    for name in ("chat", "before_chat_fine_tuning", "random_weights"):
        if name in result:
            print(f"{name:<24} {result[name]}")
    for r in rows[:10]:
        print(f"{r['question']!r} -> {r['reply']!r} ({r['finish_reason']})")
    out = Path(args.out or Path(args.model) / "eval-chat.json")
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
