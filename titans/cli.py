"""`titans` command line: generate (optionally carrying a session snapshot), init a model, train, eval, serve.

The outermost layer: it imports the engine and, for `serve`, the server (loaded only when it runs).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from engine import Engine, ModelConfig, SamplingParams
from engine.config import PRESETS
from engine.tokenizer import StreamDecoder


def _engine(args) -> Engine:
    if args.model:
        return Engine.load(args.model, device=args.device)
    return Engine.from_config(ModelConfig.preset(args.preset), seed=args.seed_weights, device=args.device)


def cmd_generate(args) -> int:
    eng = _engine(args)
    state = eng.load_state(Path(args.state_in).read_bytes()) if args.state_in else eng.new_state()
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, stop=tuple(args.stop))
    prompt = eng.tokenizer.encode(args.prompt)
    decoder = StreamDecoder(eng.tokenizer)
    start = time.perf_counter()
    gen = eng.generate(prompt, state, params)
    n = 0
    while True:
        try:
            token = next(gen)
        except StopIteration as stop:
            state = stop.value
            break
        if n == 0:
            first = time.perf_counter()
        n += 1
        sys.stdout.write(decoder.push(token))
        sys.stdout.flush()
    sys.stdout.write(decoder.flush() + "\n")
    end = time.perf_counter()
    if args.state_out:
        Path(args.state_out).write_bytes(state.to_bytes())
    if n:
        rate = (n - 1) / (end - first) if n > 1 else float("nan")
        print(f"[{len(prompt)} prompt tokens, {n} generated; first token {1e3 * (first - start):.0f} ms, "
              f"{rate:.0f} tokens/s after; session at {state.tokens_seen} tokens]", file=sys.stderr)
    return 0


def cmd_init(args) -> int:
    eng = Engine.from_config(ModelConfig.preset(args.preset), seed=args.seed_weights, device="cpu")
    eng.save(args.out)
    params = sum(p.numel() for p in eng.model.parameters())
    print(f"wrote {args.out}: {args.preset}, {params:,} parameters, fingerprint {eng.fingerprint}")
    return 0


def cmd_train(args) -> int:
    from engine.train import TrainConfig, train

    cfg = TrainConfig.load(args.config)
    if args.out_dir:
        cfg = TrainConfig(**{**cfg.__dict__, "out_dir": args.out_dir})
    train(cfg, resume=not args.restart)
    return 0


def _suffixes(text: str | None) -> tuple[str, ...] | None:
    from engine.corpus import TEXT_SUFFIXES

    if text is None:
        return TEXT_SUFFIXES
    return None if text == "*" else tuple(s if s.startswith(".") else f".{s}" for s in text.split(","))


def cmd_tokenizer_train(args) -> int:
    from engine.corpus import train_tokenizer

    path = train_tokenizer(args.sources, args.out, args.vocab_size, _suffixes(args.suffixes), args.text_key)
    print(f"wrote {path} ({args.vocab_size:,} tokens) and {Path(args.out) / 'chat_template.json'}")
    return 0


def cmd_corpus_prepare(args) -> int:
    from engine.corpus import prepare

    index = prepare(args.sources, args.out, args.tokenizer, args.heldout, args.seed, args.chat, args.text_key,
                    _suffixes(args.suffixes))
    for split, info in index.splits.items():
        print(f"{split}: {info['documents']:,} documents, {info['tokens']:,} tokens in {len(info['shards'])} shards")
    print(f"wrote {args.out} ({index.tokenizer} tokenizer, vocabulary {index.vocab_size:,})")
    return 0


def cmd_eval(args) -> int:
    from engine.data import FILLER_KINDS
    from engine.evaluate import Progress, evaluate, expected_bytes, write_report

    eng = Engine.load(args.model, device=args.device)
    distances = [_bytes(d) for d in args.distances.split(",")]
    kinds = FILLER_KINDS if args.filler == "all" else args.filler.split(",")
    unknown = sorted(set(kinds) - set(FILLER_KINDS) - {"python"})
    if unknown:
        raise SystemExit(f"titans eval: unknown filler {unknown}: choose from {', '.join(FILLER_KINDS)} or all")
    mode = "separate" if args.separate_requests else "updates" if args.updates else "block"
    progress = Progress(expected_bytes(distances, args.facts, args.examples, mode, len(kinds)))
    result = evaluate(eng, distances, args.facts, args.examples, kinds, args.bpb_windows, args.seed, mode, progress)
    progress.close()
    write_report(result, args.out, args.plot)
    print(f"exact recall of {args.facts} facts ({mode}), memory carried / reset")
    print(f"{'distance':>9} {'windows':>8} " + " ".join(f"{kind:>13}" for kind in kinds))
    for distance in distances:
        cells = {r["filler"]: r for r in result["recall"] if r["distance"] == distance}
        print(f"{distance:>9} {cells[kinds[0]]['windows']:>8.1f} " + " ".join(
            f"{cells[k]['carried_exact']:>6.3f}/{cells[k]['reset_exact']:<6.3f}" for k in kinds))
    if result["bits_per_byte"] is not None:
        print(f"bits per byte, held-out code: {result['bits_per_byte']:.3f}, "
              f"prose: {result['bits_per_byte_prose']:.3f}")
    print(f"wrote {args.out}" + (f" and {args.plot}" if args.plot else ""))
    return 0


def _bytes(text: str) -> int:
    """'512', '16K', '1M' (binary units: 16K = 16,384 bytes)."""
    text = text.strip().upper()
    scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1:], 1)
    return int(text[:-1] if scale > 1 else text) * scale


def cmd_plot_training(args) -> int:
    from engine.evaluate import plot_training

    plot_training(args.metrics, args.out)
    print(f"wrote {args.out}")
    return 0


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    from server.settings import Settings

    for name, field in Settings.model_fields.items():
        if name == "api_keys":
            parser.add_argument("--api-key", dest="api_keys", action="append", metavar="KEY[:TENANT]",
                                help="repeatable; also TITANS_API_KEYS='k1:tenant-a,k2'. None: an open server")
            continue
        default = field.default
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, default=None, metavar=name.upper(),
                            help=f"{field.description or ''} (default {default}; env TITANS_{name.upper()})")
    parser.add_argument("--log-level", default="info")


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from server.app import create_app
    from server.settings import Settings

    overrides = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    settings = Settings(**overrides)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.api_keys:
        logging.getLogger("titans.server").warning(
            "API keys given with --api-key can be read in the process list; prefer --api-keys-file")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=args.log_level,
                timeout_graceful_shutdown=10, timeout_keep_alive=settings.keep_alive_s)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="titans", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text; --state-in/--state-out carry a session's memory")
    source = gen.add_mutually_exclusive_group()
    source.add_argument("--model", help="model directory (config.json + model.safetensors)")
    source.add_argument("--preset", default="tiny-mac", choices=sorted(PRESETS), help="random-weight preset")
    gen.add_argument("--seed-weights", type=int, default=0, help="initialisation seed for --preset")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.8)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=[])
    gen.add_argument("--state-in", help="session snapshot to continue from")
    gen.add_argument("--state-out", help="write the session snapshot after generation here")
    gen.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    gen.set_defaults(func=cmd_generate)

    init = sub.add_parser("init", help="write a randomly initialised model directory")
    init.add_argument("--preset", default="tiny-mac", choices=sorted(PRESETS))
    init.add_argument("--seed-weights", type=int, default=0)
    init.add_argument("--out", required=True)
    init.set_defaults(func=cmd_init)

    tr = sub.add_parser("train", help="train a model (outer loop through the memory updates)")
    tr.add_argument("--config", required=True, help="training config (JSON or YAML): see engine/train.py TrainConfig")
    tr.add_argument("--out-dir", help="override the config's out_dir")
    tr.add_argument("--restart", action="store_true", help="ignore a checkpoint in out_dir instead of resuming")
    tr.set_defaults(func=cmd_train)

    tok = sub.add_parser("tokenizer", help="tokenizers for training")
    tok_sub = tok.add_subparsers(dest="action", required=True)
    tt = tok_sub.add_parser("train", help="learn a byte-level BPE tokenizer.json (+ chat_template.json) from text")
    tt.add_argument("sources", nargs="+", help="files or folders (text, JSONL, Parquet)")
    tt.add_argument("--out", required=True, help="folder for tokenizer.json and chat_template.json")
    tt.add_argument("--vocab-size", type=int, default=8192)
    tt.set_defaults(func=cmd_tokenizer_train)

    corpus = sub.add_parser("corpus", help="training corpora")
    corpus_sub = corpus.add_subparsers(dest="action", required=True)
    cp = corpus_sub.add_parser("prepare", help="tokenize, shuffle and shard text, JSONL or Parquet for training")
    cp.add_argument("sources", nargs="+", help="files or folders")
    cp.add_argument("--out", required=True, help="the prepared corpus's folder (a training config's data)")
    cp.add_argument("--tokenizer", default=None, help="folder with tokenizer.json (default: bytes)")
    cp.add_argument("--heldout", type=float, default=0.01, help="share of documents held out for evaluation")
    cp.add_argument("--seed", type=int, default=0)
    cp.add_argument("--chat", action="store_true",
                    help="JSONL of {'messages': [{'role', 'content'}, ...]}: the loss counts on the assistant's turns")
    cp.set_defaults(func=cmd_corpus_prepare)
    for p in (tt, cp):
        p.add_argument("--suffixes", default=None,
                       help="file endings taken from folders, comma-separated (default: common text files; * for all)")
        p.add_argument("--text-key", default="text", help="the text field of JSONL lines and Parquet rows")

    ev = sub.add_parser("eval", help="recall by distance (memory carried vs reset) and bits per byte")
    ev.add_argument("--model", required=True)
    ev.add_argument("--distances", default="0,64,256,512,1024",
                    help="filler bytes between facts and queries, comma-separated; K and M suffixes (16K, 1M)")
    ev.add_argument("--facts", type=int, default=8)
    ev.add_argument("--examples", type=int, default=32, help="examples per distance (each asks every fact)")
    ev.add_argument("--filler", default="words",
                    help="filler kinds, comma-separated: words, prose, code, logs; or all (one curve each)")
    how = ev.add_mutually_exclusive_group()
    how.add_argument("--separate-requests", action="store_true",
                     help="each fact in a request of its own, followed by 2-8 KB of filler (then the distance)")
    how.add_argument("--updates", action="store_true",
                     help="every fact told again with a new value halfway; the new value must win")
    ev.add_argument("--bpb-windows", type=int, default=8, help="held-out text windows of 1024 bytes (0: skip)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--out", default="eval.json")
    ev.add_argument("--plot", default=None, help="PNG of recall vs distance (needs the 'plots' extra)")
    ev.add_argument("--device", default=None)
    ev.set_defaults(func=cmd_eval)

    pt = sub.add_parser("plot-training", help="loss and recall curves (PNG) from a training run's metrics.jsonl")
    pt.add_argument("--metrics", required=True, nargs="+", help="metrics.jsonl of each stage, in order")
    pt.add_argument("--out", default="training.png")
    pt.set_defaults(func=cmd_plot_training)

    srv = sub.add_parser("serve", help="run the OpenAI-compatible server with memory sessions")
    add_serve_arguments(srv)
    srv.set_defaults(func=serve)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
