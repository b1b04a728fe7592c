"""The Python documentation corpus of the docs-chat recipe (bin/train-docs-model), from the standard library of the
Python that runs this (PSF License; offline on every machine):

    OUT/text/          one document per language-reference topic (pydoc_data.topics: the reference's own text) and
                       per documented public object of the standard library's modules (its signature and docstring)
    OUT/chat.jsonl     questions and answers drawn from the same documents: "What does json.dumps do?" answered by
                       the first paragraph of its docstring; "Explain: for" by the topic's first paragraph
    OUT/heldout.jsonl  the questions of the modules set aside (every eighth), for trying the model

usage: python bin/docs_chat_data.py OUT
"""

import importlib
import inspect
import json
import pkgutil
import sys
import sysconfig
import warnings
from pathlib import Path

SKIP = ("test", "idlelib", "tkinter", "turtle", "lib2to3", "ensurepip", "pydoc", "antigravity", "this", "__",
        "xxsubtype", "_")


def modules() -> list[str]:
    stdlib = sysconfig.get_paths()["stdlib"]
    names = sorted({m.name for m in pkgutil.iter_modules([stdlib]) if not m.name.startswith(SKIP)}
                   | set(sys.builtin_module_names) - {n for n in sys.builtin_module_names if n.startswith("_")})
    return names


def first_paragraph(doc: str, limit: int = 400) -> str:
    """The first paragraph that is not a heading (a title underlined with * or =), on one line."""
    for paragraph in doc.strip().split("\n\n"):
        lines = paragraph.strip().splitlines()
        if lines and not set(lines[-1].strip()) <= set("*=-"):
            return " ".join(paragraph.split())[:limit]
    return ""


def documented(module_name: str):
    """(qualified name, signature line, docstring) of the module and its public functions and classes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            module = importlib.import_module(module_name)
        except Exception:  # platform modules that do not import here
            return
    doc = inspect.getdoc(module)
    if doc:
        yield module_name, f"module {module_name}", doc
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != module_name:
            continue
        if not (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj)):
            continue
        doc = inspect.getdoc(obj)
        if not doc:
            continue
        try:
            signature = f"{module_name}.{name}{inspect.signature(obj)}"
        except (TypeError, ValueError):
            signature = f"{module_name}.{name}"
        yield f"{module_name}.{name}", signature, doc


def main(out: str) -> None:
    import pydoc_data.topics

    root = Path(out)
    (root / "text").mkdir(parents=True, exist_ok=True)
    chat, heldout = [], []
    for topic, text in sorted(pydoc_data.topics.topics.items()):
        (root / "text" / f"topic-{topic}.txt").write_text(text)
        answer = first_paragraph(text)
        if len(answer) > 40:
            chat.append({"messages": [{"role": "user", "content": f"Explain: {topic}"},
                                      {"role": "assistant", "content": answer}]})
    for number, module_name in enumerate(modules()):
        entries = list(documented(module_name))
        if not entries:
            continue
        page = "\n\n".join(f"{signature}\n\n{doc}" for _, signature, doc in entries)
        (root / "text" / f"module-{module_name}.txt").write_text(page)
        for qualified, _, doc in entries:
            answer = first_paragraph(doc)
            if len(answer) < 20:
                continue
            kind = "module" if qualified == module_name else "do"
            question = f"What is the {qualified} module?" if kind == "module" else f"What does {qualified} do?"
            pair = {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
            (heldout if number % 8 == 7 else chat).append(pair)
    (root / "chat.jsonl").write_text("".join(json.dumps(p) + "\n" for p in chat))
    (root / "heldout.jsonl").write_text("".join(json.dumps(p) + "\n" for p in heldout))
    print(f"{len(list((root / 'text').iterdir()))} documents, {len(chat)} chat pairs, {len(heldout)} held out")


if __name__ == "__main__":
    main(sys.argv[1])
