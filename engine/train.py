"""Outer-loop training: gradients flow through every memory update (the chunk updates are differentiable).

AdamW, linear warm-up then cosine decay, gradient clipping, deterministic seeds, a progress line with loss
and tokens/s, metrics as JSONL, checkpoints (a model directory Engine.load reads, plus trainer.safetensors)
and resume. Batches mix synthetic recall examples (engine/data.py) with Python-source text; a curriculum
moves the recall distance outward as training proceeds.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .compiled import compile_training_steps
from .config import ModelConfig
from .data import FACT_BYTES, recall_example, text_window
from .engine import save_model_dir
from .evaluate import score_answers
from .model import Titans
from .tokenizer import load_tokenizer


@dataclass(frozen=True)
class TrainConfig:
    model: dict  # ModelConfig fields, or {"preset": name, **overrides}
    out_dir: str = "runs/train"
    steps: int = 1000
    batch_size: int = 16
    seq_len: int = 512  # text examples; recall examples are as long as their facts + distance + queries
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    # a step whose gradient norm is above this (or not finite) is skipped, not clipped: a long carried state can
    # make the memory's backward explode (the model card's "What limits the horizon"), and such a gradient's
    # direction is the explosion's, not the batch's. None: a non-finite norm stops the run
    skip_grad_norm_above: float | None = None
    # bound on the gradient through each memory state between chunks (per session, head and matrix; see
    # kernels/memory/naive.bound_gradient): what keeps a long trained span after a long carried prefix trainable
    state_grad_bound: float | None = None
    seed: int = 0
    recall_fraction: float = 0.5  # share of each batch that is recall examples (the rest: text windows)
    n_facts: int = 8
    filler: str | list[str] = "words"  # a kind of data.FILLER_KINDS, or a list to draw one from per example
    answer_weight: float = 4.0  # loss weight of answer digits relative to the other tokens
    # in this share of recall examples, query_gap bytes of filler before every query but the first (data.py)
    query_gap: int = 0
    query_gap_share: float = 0.0
    # in this share of recall examples, the fact is asked right after it was told (distance 0: the query in the
    # attention window of its fact, where a model that learnt to read only from the memory can fail)
    near_share: float = 0.0
    # in this share of recall examples, 1..n_facts facts are told again with new values part-way through the
    # filler, and the queries answer the new values
    updates_share: float = 0.0
    # in this share of recall examples, each fact is followed by filler of its own (facts told in separate
    # requests): spread_bytes [fewest, most] after each in a short example; in a carried one, the prefix's filler is
    # shared out between the facts at random
    spread_share: float = 0.0
    spread_bytes: list = field(default_factory=lambda: [0, 64])
    # long contexts by truncated backpropagation: in this share of steps, every row starts with a prefix of
    # carry_bytes [fewest, most] bytes (drawn log-uniformly, one length for the whole batch) read without
    # gradients, the memory state carried from it (detached) into the rest of the row, which is trained. A recall
    # row's prefix holds its facts (and updates) and all but the last carry_graded bytes of its filler; a text row's,
    # the text before its seq_len trained bytes. The gates that write and forget along the trained part learn what
    # their writes cost the facts read there; being functions of each token, they do the same at any distance.
    carry_share: float = 0.0
    carry_bytes: list = field(default_factory=lambda: [512, 4096])
    carry_graded: int = 128
    # in this share of carried recall rows, the prefix is filler alone and the facts, up to carry_graded bytes of
    # filler and the queries all come in the trained part: facts told to a memory that other text has filled (a
    # long session, facts in separate requests), where the gates must still write them hard enough to keep
    lead_share: float = 0.0
    # in this share of carried recall rows with updates, the new values come in the trained part (the old ones in
    # the prefix): the gradient reaches the writes that must overrule what the memory holds
    late_updates_share: float = 0.0
    # an unlabeled price on lasting writes: loss += write_price * write_cost (below), so the gates learn to write
    # where the loss pays for it. A head writes on every token it reads, and filler that the memory keeps for 64 KB
    # drowns the facts written before it (models/titans-mal-recall/README.md, "What limits the horizon"); a
    # carried prefix is read without gradients, so only this price reaches the gates with the whole distance's
    # weight.
    write_price: float = 0.0
    # this share of the filler's characters replaced by characters outside ASCII (data.sprinkle): the corpora are
    # ASCII, and a memory that never read other bytes writes them over everything it holds
    unicode_rate: float = 0.0
    # stages [from_step, min_distance, max_distance] or [..., n_facts]: facts that must cross the memory are
    # learned one fact first (8 facts from scratch stayed at chance; 1 -> 4 facts climbs), so stages may raise both.
    # n_facts may be [fewest, most], drawn per example: a stage of 8 facts at 16+ bytes never puts a fact in the
    # attention window of its query, and a model trained only so failed a single fact told just before its query
    curriculum: list = field(default_factory=lambda: [[0, 0, 0]])
    # > 0: a stage ends only once held-out recall (exact, at the last eval) has reached this; until then it goes
    # on, and every later stage starts that many steps later (a run that learns a stage slowly is not pushed
    # into the next one unlearnt: seed 1 of the default recipe never left chance after a fixed 500-step stage)
    advance_at: float = 0.0
    log_every: int = 10
    eval_every: int = 100
    eval_examples: int = 32
    checkpoint_every: int = 500
    device: str = "auto"
    # torch's CPU threads (0: its default, one per core). Sums split over threads round differently, and a
    # recall run's outcome follows rounding (models/titans-mal-recall/README.md, "Runs"): with the same
    # threads, CPU type and torch, a config gives the same run again
    threads: int = 0
    bf16: bool = False  # autocast on CUDA
    compile: bool = False  # the memory's chunk step through torch.compile (compiled.compile_training_steps)
    tokenizer_dir: str | None = None  # holds tokenizer.json for 'tokenizers' models
    # a run (or model) directory whose weights, and optimizer moments when it has them, start this run at step 0:
    # a later stage with its own steps, schedule, curriculum and seed (a run's own checkpoint still wins)
    init_from: str | None = None

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        """A JSON or YAML file (YAML needs PyYAML, which the dev extra installs)."""
        text = Path(path).read_text()
        if str(path).endswith((".yaml", ".yml")):
            try:
                import yaml
            except ImportError as e:
                raise RuntimeError(f"{path} is YAML: pip install pyyaml, or use a JSON config") from e
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"{path}: unknown training options {sorted(unknown)}")
        return cls(**data)

    def model_config(self) -> ModelConfig:
        spec = dict(self.model)
        preset = spec.pop("preset", None)
        base = ModelConfig.preset(preset).to_dict() if preset else {}
        return ModelConfig.from_dict({**base, **spec})

    def __post_init__(self):
        for stage in self.curriculum:
            facts = stage[3] if len(stage) == 4 else self.n_facts
            fewest, most = facts if isinstance(facts, (list, tuple)) and len(facts) == 2 else (facts, facts)
            if len(stage) not in (3, 4) or not 0 <= stage[1] <= stage[2] or not (
                    isinstance(fewest, int) and isinstance(most, int) and 1 <= fewest <= most):
                raise ValueError(f"curriculum stage {stage}: expected [from_step, min_distance, max_distance] or "
                                 "[..., n_facts] with 0 <= min <= max and n_facts a count >= 1 or [fewest, most]")

    def stage(self, step: int) -> tuple[int, int, int | list[int]]:
        """(min_distance, max_distance, n_facts) in force at this step of the curriculum (a run's step less the
        steps its stages were held, with advance_at); n_facts is a count or [fewest, most]."""
        stage = [s for s in self.curriculum if s[0] <= step][-1]
        return stage[1], stage[2], stage[3] if len(stage) > 3 else self.n_facts

    def starts_stage(self, step: int) -> bool:
        """Whether a stage after the first begins at this step of the curriculum."""
        return any(s[0] == step for s in self.curriculum[1:])


def draw_facts(n_facts: int | list[int], rng: random.Random) -> int:
    """A stage's fact count for one example: a fixed count draws nothing (a recipe's data stream stays as it was)."""
    return rng.randint(*n_facts) if isinstance(n_facts, (list, tuple)) else n_facts


def lr_at(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def carried_bytes(cfg: TrainConfig, rng: random.Random, multiple: int) -> int:
    """The prefix read without gradients for this step's batch (0: none), a multiple of the memory chunk."""
    if not cfg.carry_share or rng.random() >= cfg.carry_share:  # no draw when off: recipes' data stay as they were
        return 0
    fewest, most = cfg.carry_bytes
    length = math.exp(rng.uniform(math.log(fewest), math.log(most)))
    return max(multiple, round(length / multiple) * multiple)


def _updates(cfg: TrainConfig, facts: int, rng: random.Random) -> int:
    return rng.randint(1, facts) if cfg.updates_share and rng.random() < cfg.updates_share else 0


def _update_span(cfg: TrainConfig, rng: random.Random, in_prefix: bool, distance: int, updates: int
                 ) -> tuple[int, int]:
    """Where in the distance's filler the block of updates may start: anywhere, or (a carried row) within the
    prefix, or, in late_updates_share of carried rows, where the whole block lands in the trained part."""
    if not in_prefix:
        return 0, distance
    if cfg.late_updates_share and rng.random() < cfg.late_updates_share:  # no draw when off
        # + 1: words filler may end a byte short (data.filler), which moves the block a byte earlier
        return min(distance, max(0, distance + FACT_BYTES * updates - cfg.carry_graded + 1)), distance
    return 0, distance - cfg.carry_graded


def make_batch(cfg: TrainConfig, step: int, rng: random.Random, tokenizer, multiple: int = 1, carried: int = 0):
    """Token ids [B, T] and loss weights [B, T - 1] (weights[s, i] weighs predicting ids[s, i + 1]).

    Sequences end in padding (id 0, weight 0) up to the longest rounded up to `multiple` (the memory chunk):
    a batch of equal rows runs as long aligned steps of whole chunks, and padding after the end of a sequence
    changes nothing before it (causality). carried > 0: every row's first `carried` ids are its prefix (see
    TrainConfig.carry_share), weighted 0, and a recall row's distance is whatever puts carry_graded bytes of
    filler after the prefix.
    """
    low, high, n_facts = cfg.stage(step)
    ids, weights = [], []
    for _ in range(cfg.batch_size):
        if rng.random() < cfg.recall_fraction:
            lead = 0
            if carried:
                facts = draw_facts(n_facts, rng)
                updates = _updates(cfg, facts, rng)
                lead = carried if cfg.lead_share and rng.random() < cfg.lead_share else 0  # no draw when off
                if lead:
                    distance = rng.randint(0, max(0, cfg.carry_graded - FACT_BYTES * (facts + updates)))
                else:
                    distance = carried + cfg.carry_graded - FACT_BYTES * (facts + updates)
                    if distance < cfg.carry_graded:
                        raise ValueError(
                            f"carry_bytes {cfg.carry_bytes} too short for {facts} facts and their updates")
            else:
                distance = 0 if cfg.near_share and rng.random() < cfg.near_share else rng.randint(low, high)
            gap = cfg.query_gap if cfg.query_gap and rng.random() < cfg.query_gap_share else 0  # no draw when off
            if not carried:  # drawn in this order since the first recipes: their data stay as they were
                facts = draw_facts(n_facts, rng)
                updates = _updates(cfg, facts, rng)
            spread = None
            if cfg.spread_share and rng.random() < cfg.spread_share:  # no draw when off
                if carried and not lead:  # the prefix's filler, shared out between the facts
                    room = (distance - cfg.carry_graded) // facts
                    spread = [rng.randint(0, room) for _ in range(facts)]
                    distance -= sum(spread)
                else:
                    spread = [rng.randint(*cfg.spread_bytes) for _ in range(facts)]
            update_at = rng.randint(*_update_span(cfg, rng, carried and not lead, distance, updates)) if updates else 0
            ex = recall_example(rng, facts, distance, cfg.filler, query_gap=gap, updates=updates, update_at=update_at,
                                spread=spread, lead=lead, unicode_rate=cfg.unicode_rate)
            seq = tokenizer.encode(ex.text)
            w = torch.ones(len(seq))
            for a, b in ex.answer_spans:
                if cfg.unicode_rate:  # character offsets to byte offsets
                    a, b = (len(tokenizer.encode(ex.text[:c])) for c in (a, b))
                w[a - 1:b - 1] = cfg.answer_weight
        else:
            seq = tokenizer.encode(text_window(rng, carried + cfg.seq_len))
            w = torch.ones(len(seq))
        w[:carried] = 0.0  # the prefix and the prediction of the first trained id from it
        ids.append(torch.tensor(seq, dtype=torch.long))
        weights.append(w[:-1])
    length = -(-max(len(t) for t in ids) // multiple) * multiple
    return (torch.stack([F.pad(t, (0, length - len(t))) for t in ids]),
            torch.stack([F.pad(w, (0, length - 1 - len(w))) for w in weights]))


def sequence_lengths(weights: torch.Tensor) -> list[int]:
    """Each sequence's real length in a batch from make_batch: every real token but the first is weighted (> 0),
    padding never is. weights [B, T - 1]."""
    return [int(w.nonzero().max()) + 2 for w in weights]


def fresh_state(model: Titans, sessions: int):
    """The model's initial state for a batch of sessions (views of one copy: the model never writes into them)."""
    return [[{k: v.unsqueeze(0).expand(sessions, *v.shape) for k, v in st.items()} for st in layer]
            for layer in model.initial_state()]


CARRY_PIECE = 2048  # prefix ids read per call: the logits a call returns ([B, piece, V]) stay small
WRITE_HORIZON = 65536  # tokens a write must last to be priced in full: the distance the memory keeps facts across


def write_cost(model: Titans, log_gates: list[list[torch.Tensor]], mask: torch.Tensor) -> torch.Tensor:
    """Mean over memories and heads of the inner learning rate theta on the tokens of mask [B, R], each head's
    weighted by the share of a write it still holds WRITE_HORIZON tokens later, exp(horizon * mean log(1 - alpha)),
    taken without gradient: a head that forgets within the horizon writes for free (a short-term memory serving
    language modelling), one that keeps everything pays for every write. log_gates: Titans.watching_gates' lists."""
    mask = mask.to(torch.float32)[:, None, :]  # [B, 1, R]
    real = mask.sum()
    costs = []
    for memory, calls in zip(model.memories(), log_gates, strict=True):
        log_theta, _, log_keep = torch.cat(calls, dim=2).float().unbind(-1)  # [B, H, R] each
        theta = (memory.theta(log_theta) * mask).sum((0, 2)) / real
        kept = torch.exp(WRITE_HORIZON * (log_keep * mask).sum((0, 2)) / real).detach()
        costs.append(kept * theta)
    return torch.cat(costs).mean()


def batch_loss(model: Titans, ids: torch.Tensor, weights: torch.Tensor, carried: int = 0,
               write_price: float = 0.0, parts: dict | None = None) -> torch.Tensor:
    """Weighted mean next-token loss of a batch from make_batch, every sequence from a fresh state; with carried,
    the first `carried` ids are read without gradients and the state they leave goes on, detached. With
    write_price, plus that times write_cost over the trained tokens. parts, when given, receives both terms."""
    B = ids.shape[0]
    state = fresh_state(model, B)
    if carried:
        with torch.no_grad():
            for start in range(0, carried, CARRY_PIECE):
                _, state, _ = model.forward_tokens(ids[:, start:min(carried, start + CARRY_PIECE)], state, [start] * B)
        ids, weights = ids[:, carried:], weights[:, carried:]
    with model.watching_gates() as log_gates:
        logits, _, _ = model.forward_tokens(ids, state, [carried] * B)
    logits = torch.stack(logits)[:, :-1]  # [B, T - 1, V]
    nll = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten().to(logits.device), reduction="none")
    weights = weights.to(logits.device)
    loss = (nll * weights.flatten()).sum() / weights.sum()
    if parts is not None:
        parts["nll"] = float(loss.detach())
    if write_price or parts is not None:
        real = torch.cat([torch.ones_like(weights[:, :1], dtype=torch.bool), weights > 0], 1)  # [B, T]: targets
        cost = write_cost(model, log_gates, real)
        if parts is not None:
            parts["write_cost"] = float(cost.detach())
        if write_price:
            loss = loss + write_price * cost
    return loss


@torch.no_grad()
def recall_accuracy(model: Titans, tokenizer, examples) -> dict[str, float]:
    """Teacher-forced exact match of the 4 answer digits (equal to greedy decoding getting them right)."""
    correct = digits = queries = 0
    for ex in examples:
        seq = torch.tensor(tokenizer.encode(ex.text), dtype=torch.long)
        logits = model.forward_tokens([seq], fresh_state(model, 1), [0])[0][0]
        exact, right = score_answers(logits, seq, ex.answer_spans)
        correct, digits, queries = correct + exact, digits + right, queries + len(ex.answer_spans)
    return {"exact": correct / max(1, queries), "digit": digits / max(1, 4 * queries)}


@dataclass
class Progress:
    """Where a run stands, beyond its weights and optimizer: saved with every checkpoint."""
    step: int = 0
    held: int = 0  # steps the curriculum's stages were held (advance_at): the curriculum's step is step - held
    recall: float | None = None  # exact recall at the last eval
    skipped: int = 0  # steps skipped for their gradient (TrainConfig.skip_grad_norm_above)


def _save(model: Titans, optimizer: torch.optim.Optimizer, progress: Progress, out_dir: Path,
          tokenizer_dir: str | None) -> None:
    """A model directory Engine.load reads, plus the optimizer and progress in trainer.safetensors (no pickle)."""
    save_model_dir(model, out_dir, tokenizer_dir)
    state = optimizer.state_dict()
    tensors = {f"{i}.{name}": t.detach().cpu().contiguous() for i, s in state["state"].items() for name, t in s.items()}
    save_file(tensors, str(out_dir / "trainer.safetensors"),
              metadata={"step": str(progress.step), "held": str(progress.held), "recall": json.dumps(progress.recall),
                        "skipped": str(progress.skipped),
                        "param_groups": json.dumps(state["param_groups"])})


def _load_checkpoint(model: Titans, optimizer: torch.optim.Optimizer, directory: Path) -> Progress | None:
    """Load a model directory's weights and, if it has trainer.safetensors, the optimizer; its progress or None."""
    from safetensors import safe_open

    model.load_state_dict(load_file(str(directory / "model.safetensors")))
    path = directory / "trainer.safetensors"
    if not path.exists():
        return None
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    state: dict = {}
    for key, t in load_file(str(path)).items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = t
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
    return Progress(int(meta["step"]), int(meta.get("held", 0)), json.loads(meta.get("recall", "null")),
                    int(meta.get("skipped", 0)))


# options a resumed run may change: how long it goes on and what it logs, not what it computes
RESUMABLE_CHANGES = {"steps", "out_dir", "log_every", "eval_every", "eval_examples", "checkpoint_every"}


def _check_same_run(cfg: TrainConfig, out_dir: Path) -> None:
    """A checkpoint is resumed only by the config that wrote it (otherwise, say, a rerun of a changed recipe would
    silently continue the old run, or count an old finished run as done)."""
    path = out_dir / "train_config.json"
    if not path.exists():
        return
    saved = json.loads(path.read_text())
    known = {f.name for f in fields(TrainConfig)}
    theirs = json.loads(json.dumps(asdict(TrainConfig(**{k: v for k, v in saved.items() if k in known}))))
    ours = json.loads(json.dumps(asdict(cfg)))
    changed = sorted(k for k in ours if k not in RESUMABLE_CHANGES and ours[k] != theirs[k])
    if changed:
        raise ValueError(f"{out_dir} holds a checkpoint of another training config (it differs in {changed}): "
                         "resume it with its own config, or start over with --restart or another out_dir")


def _start(cfg: TrainConfig, model: Titans, optimizer: torch.optim.Optimizer, out_dir: Path,
           resume: bool) -> Progress:
    """Where to start: resume from this run's checkpoint, else begin from init_from, else from scratch."""
    if resume and (out_dir / "trainer.safetensors").exists():
        _check_same_run(cfg, out_dir)
        return _load_checkpoint(model, optimizer, out_dir)
    if cfg.init_from:
        source = Path(cfg.init_from)
        theirs = ModelConfig.load(source / "config.json")
        if theirs != model.cfg:
            raise ValueError(f"init_from {source}: its model config differs from this run's")
        _load_checkpoint(model, optimizer, source)
    return Progress()


def train(cfg: TrainConfig, resume: bool = True, log=print) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads or threads)
    try:
        return _train(cfg, resume, log)
    finally:  # the caller's setting again (tests train in-process)
        torch.set_num_threads(threads)


def _train(cfg: TrainConfig, resume: bool, log) -> dict:
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if cfg.device == "auto" else cfg.device))
    torch.manual_seed(cfg.seed)
    model = Titans(cfg.model_config()).to(device).train()
    if cfg.compile:
        compile_training_steps(model)
    for memory in model.memories():
        memory.state_grad_bound = cfg.state_grad_bound
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "init_weights" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or "init_weights" in n]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    progress = _start(cfg, model, optimizer, out, resume)
    (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    tokenizer = load_tokenizer(model.cfg.tokenizer, cfg.tokenizer_dir)
    if cfg.recall_fraction > 0 and model.cfg.tokenizer != "byte":  # answer spans are byte offsets
        raise ValueError("recall examples need the byte tokenizer; set recall_fraction to 0 for other tokenizers")
    metrics_path = out / "metrics.jsonl"
    last: dict = {}
    tokens_done, t0 = 0, time.perf_counter()
    for step in range(progress.step, cfg.steps):
        if cfg.advance_at and cfg.starts_stage(step - progress.held):
            if (progress.recall or 0.0) < cfg.advance_at:
                progress.held += 1  # the stage in force is not learnt yet: it goes on
            else:
                progress.recall = None  # the next stage is judged by its own evals
        at = step - progress.held  # the curriculum's step
        rng = random.Random(cfg.seed * 1_000_003 + step)  # the batch of a step does not depend on resumes
        parts = {} if cfg.write_price else None
        carried = carried_bytes(cfg, rng, model.cfg.chunk_size)
        ids, weights = make_batch(cfg, at, rng, tokenizer, model.cfg.chunk_size, carried)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(cfg, step)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16 and device.type == "cuda"):
            loss = batch_loss(model, ids.to(device), weights, carried, cfg.write_price, parts)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
        loss_value = loss.item()
        if cfg.skip_grad_norm_above is not None and not grad_norm <= cfg.skip_grad_norm_above:
            progress.skipped += 1
            log(f"step {step:6d}  skipped: gradient norm {grad_norm:.3g} (loss {loss_value:.4f})")
        elif not math.isfinite(loss_value) or not math.isfinite(grad_norm):  # never step on a NaN
            raise FloatingPointError(f"loss {loss_value}, gradient norm {grad_norm} at step {step}")
        else:
            optimizer.step()
        tokens_done += sum(sequence_lengths(weights))  # real tokens, not padding
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            elapsed = time.perf_counter() - t0
            last = {"step": step, "loss": loss_value, "lr": lr_at(cfg, step), "grad_norm": grad_norm,
                    "tokens_per_s": tokens_done / elapsed, "elapsed_s": elapsed,
                    "stage": list(cfg.stage(at))}
            if cfg.carry_share:
                last["carried"] = carried
            if cfg.write_price:
                last.update(parts)
            if cfg.advance_at:
                last["held"] = progress.held
            if cfg.skip_grad_norm_above is not None:
                last["skipped"] = progress.skipped
            if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps - 1):
                low, high, n_facts = cfg.stage(at)
                eval_rng = random.Random(10_000 + step)
                model.eval()
                examples = [recall_example(eval_rng, draw_facts(n_facts, eval_rng), eval_rng.randint(low, high),
                                           cfg.filler, "heldout")
                            for _ in range(cfg.eval_examples)]
                last["recall"] = recall_accuracy(model, tokenizer, examples)
                progress.recall = last["recall"]["exact"]
                model.train()
            with metrics_path.open("a") as f:
                f.write(json.dumps(last) + "\n")
            log(f"step {step:6d}  loss {last['loss']:.4f}  lr {last['lr']:.2e}  "
                f"{last['tokens_per_s']:,.0f} tok/s" + (f"  recall {last['recall']}" if "recall" in last else ""))
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
            _save(model, optimizer, replace(progress, step=step + 1), out, cfg.tokenizer_dir)
    _save(model, optimizer, replace(progress, step=cfg.steps), out, cfg.tokenizer_dir)
    return last
