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

from . import distributed
from .compiled import compile_training_steps
from .config import ModelConfig
from .corpus import CorpusIndex, TokenSplit, WindowOrder, window_batch
from .data import FACT_BYTES, fact_mask, recall_example, text_window
from .distributed import World, full_state, load_full_state, rank_rows
from .engine import save_model_dir
from .evaluate import score_answers
from .model import Titans, batched
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
    betas: list = field(default_factory=lambda: [0.9, 0.95])  # AdamW's
    # a prepared corpus (titans corpus prepare): batches are windows of seq_len + 1 tokens of its train split, the
    # model's vocabulary, tokenizer and end-of-text come from it, and evals report its held-out loss. None: the
    # synthetic mix of recall examples and Python source below
    data: str | None = None
    eval_windows: int = 16  # held-out windows each eval reads (data runs)
    # batch_size is the global batch, in rows: under torchrun each of the N processes takes batch_size / N of them,
    # in grad_accum micro-batches, and the step's gradient is that of the whole batch's mean loss
    grad_accum: int = 1
    parallel: str = "ddp"  # ddp | fsdp (torch's fully_shard: each block a unit) when several processes run
    activation_checkpointing: bool = False  # recompute each block's activations in backward instead of keeping them
    # share of each batch that is recall examples (the rest: text windows); None: 0.5, or 0 with a corpus
    recall_fraction: float | None = None
    n_facts: int = 8
    filler: str | list[str] = "words"  # a kind of data.FILLER_KINDS, or a list to draw one from per example
    answer_weight: float = 4.0  # loss weight of answer digits relative to the other tokens
    # loss weight of predicting a recall example's filler bytes (neither fact nor query, data.fact_mask): below 1,
    # the language-model loss pays less for writing other text into the memory that keeps the facts (> 0: the
    # write prices take the weighted tokens as the trained ones)
    filler_weight: float = 1.0
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
    # a labelled price: loss += filler_price * write_cost over the trained bytes that are neither a fact nor a query
    # (data.fact_mask): the lasting writes of other text alone, which the facts' answers do not pay back
    filler_price: float = 0.0
    # both prices count each write with the momentum that carries it on: theta / (1 - eta), eta the head's mean
    # momentum gate on the priced tokens (with its gradient). A write of theta goes on landing for ~1 / (1 - eta)
    # tokens, and a price on theta alone is dodged by raising eta (models/titans-mal-recall/README.md, s9)
    price_momentum: bool = False
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
        """A JSON or YAML file (YAML needs PyYAML, which the dev extra installs). "extends": a file (relative to
        this one) whose options this one's override, "model" merged key by key."""
        data = _read_options(Path(path))
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"{path}: unknown training options {sorted(unknown)}")
        return cls(**data)

    def write_prices(self) -> WritePrices:
        return WritePrices(self.write_price, self.filler_price, self.price_momentum)

    def model_config(self) -> ModelConfig:
        """The model: its preset, overridden by the config's fields; with a corpus, the corpus's tokenizer, and its
        vocabulary and end-of-text unless the config sets them."""
        spec = dict(self.model)
        preset = spec.pop("preset", None)
        base = ModelConfig.preset(preset).to_dict() if preset else {}
        if self.data:
            corpus = CorpusIndex.load(self.data)
            base.update(tokenizer=corpus.tokenizer, vocab_size=corpus.vocab_size,
                        eos_token_id=corpus.end_of_text if corpus.tokenizer == "tokenizers" else None)
            if spec.get("vocab_size", corpus.vocab_size) < corpus.vocab_size:
                raise ValueError(f"vocab_size {spec['vocab_size']} is smaller than the corpus's {corpus.vocab_size}")
        return ModelConfig.from_dict({**base, **spec})

    def __post_init__(self):
        if self.recall_fraction is None:
            object.__setattr__(self, "recall_fraction", 0.0 if self.data else 0.5)
        if self.data and self.recall_fraction:
            raise ValueError("a corpus run (data) trains on the corpus alone: recall_fraction must be 0")
        if self.parallel not in distributed.PARALLEL_MODES:
            raise ValueError(f"parallel must be one of {distributed.PARALLEL_MODES}, got {self.parallel!r}")
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {self.grad_accum}")
        if not 0 < self.filler_weight <= 1:
            raise ValueError(f"filler_weight must be in (0, 1], got {self.filler_weight}")
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


def _read_options(path: Path) -> dict:
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as e:
            raise RuntimeError(f"{path} is YAML: pip install pyyaml, or use a JSON config") from e
        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    base = data.pop("extends", None)
    if base is None:
        return data
    parent = _read_options(path.parent / base)
    return {**parent, **data, "model": {**parent.get("model", {}), **data.get("model", {})}}


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
            if cfg.filler_weight != 1:  # w[i] weighs predicting seq[i + 1]
                w[:-1][~fact_mask(torch.tensor([seq]))[0, 1:]] = cfg.filler_weight
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
    return [[batched(st, sessions) for st in layer] for layer in model.initial_state()]


CARRY_PIECE = 2048  # prefix ids read per call: the logits a call returns ([B, piece, V]) stay small
WRITE_HORIZON = 65536  # tokens a write must last to be priced in full: the distance the memory keeps facts across


@dataclass(frozen=True)
class WritePrices:
    """What batch_loss adds for the memories' lasting writes (TrainConfig's write_price, filler_price and
    price_momentum)."""
    write: float = 0.0
    filler: float = 0.0
    momentum: bool = False

    def __bool__(self) -> bool:
        return bool(self.write or self.filler)


def write_cost(model: Titans, log_gates: list[list[torch.Tensor]], mask: torch.Tensor,
               momentum: bool = False) -> torch.Tensor:
    """Mean over memories and heads of the inner learning rate theta on the tokens of mask [B, R], each head's
    weighted by the share of a write it still holds WRITE_HORIZON tokens later, exp(horizon * mean log(1 - alpha)),
    taken without gradient: a head that forgets within the horizon writes for free (a short-term memory serving
    language modelling), one that keeps everything pays for every write. With momentum, each head's theta is
    divided by 1 - eta, its mean momentum gate on those tokens: the sum of a write's echoes through the momentum.
    log_gates: Titans.watching_gates' lists."""
    mask = mask.to(torch.float32)[:, None, :]  # [B, 1, R]
    real = mask.sum()
    costs = []
    for memory, calls in zip(model.memories(), log_gates, strict=True):
        log_theta, log_eta, log_keep = torch.cat(calls, dim=2).float().unbind(-1)  # [B, H, R] each
        theta = (memory.theta(log_theta) * mask).sum((0, 2)) / real
        if momentum:
            theta = theta / (1 - (log_eta.exp() * mask).sum((0, 2)) / real)
        kept = torch.exp(WRITE_HORIZON * (log_keep * mask).sum((0, 2)) / real).detach()
        costs.append(kept * theta)
    return torch.cat(costs).mean()


def batch_loss(model: Titans, ids: torch.Tensor, weights: torch.Tensor, carried: int = 0,
               prices: WritePrices = WritePrices(), parts: dict | None = None,
               runner: torch.nn.Module | None = None, total: float | None = None,
               cost_share: float = 1.0) -> torch.Tensor:
    """Weighted mean next-token loss of a batch from make_batch, every sequence from a fresh state; with carried,
    the first `carried` ids are read without gradients and the state they leave goes on, detached. With
    prices.write, plus that times write_cost over the trained tokens; with prices.filler, plus that times
    write_cost over the trained tokens of other text (data.fact_mask). parts, when given, receives the terms.

    runner: the module to call (model wrapped by DDP or FSDP; the model itself by default). total: the weight of
    the whole step's batch when this is a part of it (a micro-batch, a rank's rows), so the parts' losses add up to
    the batch's; cost_share: this part's share of the write price."""
    runner = model if runner is None else runner
    state = None
    if carried:
        with torch.no_grad():
            for start in range(0, carried, CARRY_PIECE):
                _, state = runner(ids[:, start:min(carried, start + CARRY_PIECE)], state, start)
        ids, weights = ids[:, carried:], weights[:, carried:]
    with model.watching_gates() as log_gates:
        logits, _ = runner(ids, state, carried)
    logits = logits[:, :-1]  # [B, T - 1, V]
    nll = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten().to(logits.device), reduction="none")
    weights = weights.to(logits.device)
    loss = (nll * weights.flatten()).sum() / (weights.sum() if total is None else total)
    if parts is not None:
        parts["nll"] = parts.get("nll", 0.0) + float(loss.detach())
    if prices or parts is not None:
        real = torch.cat([torch.ones_like(weights[:, :1], dtype=torch.bool), weights > 0], 1)  # [B, T]: targets
        priced = {"write_cost": (real, prices.write)}
        if prices.filler:
            priced["filler_cost"] = (real & ~fact_mask(ids.cpu()).to(real.device), prices.filler)
        for name, (mask, price) in priced.items():
            cost = write_cost(model, log_gates, mask, prices.momentum)
            if parts is not None:
                parts[name] = parts.get(name, 0.0) + cost_share * float(cost.detach())
            if price:
                loss = loss + price * cost_share * cost
    return loss


@torch.no_grad()
def recall_accuracy(model: torch.nn.Module, tokenizer, examples, device: torch.device | str = "cpu"
                    ) -> dict[str, float]:
    """Teacher-forced exact match of the 4 answer digits (equal to greedy decoding getting them right). model: a
    Titans, or one wrapped for training (every rank of a sharded model calls this on the same examples)."""
    correct = digits = queries = 0
    for ex in examples:
        seq = torch.tensor(tokenizer.encode(ex.text), dtype=torch.long)
        logits = model(seq[None].to(device))[0][0]
        exact, right = score_answers(logits, seq.to(logits.device), ex.answer_spans)
        correct, digits, queries = correct + exact, digits + right, queries + len(ex.answer_spans)
    return {"exact": correct / max(1, queries), "digit": digits / max(1, 4 * queries)}


@dataclass
class Progress:
    """Where a run stands, beyond its weights and optimizer: saved with every checkpoint."""
    step: int = 0
    held: int = 0  # steps the curriculum's stages were held (advance_at): the curriculum's step is step - held
    recall: float | None = None  # exact recall at the last eval
    skipped: int = 0  # steps skipped for their gradient (TrainConfig.skip_grad_norm_above)


def _save(model: Titans, wrapped: torch.nn.Module, optimizer: torch.optim.Optimizer, progress: Progress,
          out_dir: Path, tokenizer_dir: str | None, world: World) -> None:
    """A model directory Engine.load reads, plus the optimizer and progress in trainer.safetensors (no pickle), both
    as whole tensors keyed by parameter name, whatever the number of processes (every rank calls this)."""
    weights, optim = full_state(wrapped, optimizer)
    if not world.main:
        return
    save_model_dir(model, out_dir, tokenizer_dir, weights=weights)
    tensors = {f"{name}.{key}": t.contiguous() for name, s in optim["state"].items() for key, t in s.items()}
    save_file(tensors, str(out_dir / "trainer.safetensors"),
              metadata={"step": str(progress.step), "held": str(progress.held), "recall": json.dumps(progress.recall),
                        "skipped": str(progress.skipped), "param_groups": json.dumps(optim["param_groups"])})


def _load_checkpoint(model: Titans, wrapped: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     directory: Path) -> Progress | None:
    """Load a model directory's weights and, if it has trainer.safetensors, the optimizer; its progress or None.
    Optimizer state saved by position in the parameter groups (checkpoints before names) is read too."""
    from safetensors import safe_open

    weights = load_file(str(directory / "model.safetensors"))
    path = directory / "trainer.safetensors"
    if not path.exists():
        load_full_state(wrapped, None, weights, None)
        return None
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    groups = json.loads(meta["param_groups"])
    names = {id(p): n for n, p in model.named_parameters()}
    by_position = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    state: dict = {}
    for key, t in load_file(str(path)).items():
        name, field_name = key.rsplit(".", 1)
        state.setdefault(by_position[int(name)] if name.isdigit() else name, {})[field_name] = t
    for group in groups:
        group["params"] = [by_position[p] if isinstance(p, int) else p for p in group["params"]]
    load_full_state(wrapped, optimizer, weights, {"state": state, "param_groups": groups})
    return Progress(int(meta["step"]), int(meta.get("held", 0)), json.loads(meta.get("recall", "null")),
                    int(meta.get("skipped", 0)))


# options a resumed run may change: how long it goes on and what it logs, not what it computes
RESUMABLE_CHANGES = {"steps", "out_dir", "log_every", "eval_every", "eval_examples", "checkpoint_every",
                     "eval_windows", "grad_accum", "parallel", "activation_checkpointing", "data"}


def _check_same_run(cfg: TrainConfig, out_dir: Path) -> None:
    """A checkpoint is resumed only by the config that wrote it (otherwise, say, a rerun of a changed recipe would
    silently continue the old run, or count an old finished run as done)."""
    path = out_dir / "train_config.json"
    if not path.exists():
        return
    saved = json.loads(path.read_text())
    known = {f.name for f in fields(TrainConfig)}
    their_cfg = TrainConfig(**{k: v for k, v in saved.items() if k in known})
    theirs, ours = (json.loads(json.dumps(asdict(c))) for c in (their_cfg, cfg))
    changed = sorted(k for k in ours if k not in RESUMABLE_CHANGES | {"model"} and ours[k] != theirs[k])
    if cfg.model_config() != their_cfg.model_config():  # the model, not how its config is spelt
        changed.append("model")
    if changed:
        raise ValueError(f"{out_dir} holds a checkpoint of another training config (it differs in {changed}): "
                         "resume it with its own config, or start over with --restart or another out_dir")


def _start(cfg: TrainConfig, model: Titans, wrapped: torch.nn.Module, optimizer: torch.optim.Optimizer,
           out_dir: Path, resume: bool) -> Progress:
    """Where to start: resume from this run's checkpoint, else begin from init_from, else from scratch."""
    if resume and (out_dir / "trainer.safetensors").exists():
        _check_same_run(cfg, out_dir)
        return _load_checkpoint(model, wrapped, optimizer, out_dir)
    if cfg.init_from:
        source = Path(cfg.init_from)
        theirs = ModelConfig.load(source / "config.json")
        if theirs != model.cfg:
            raise ValueError(f"init_from {source}: its model config differs from this run's")
        _load_checkpoint(model, wrapped, optimizer, source)
    return Progress()


def train(cfg: TrainConfig, resume: bool = True, log=print) -> dict:
    """Run (or resume) a training. Under torchrun, every process calls this; rank 0 logs and writes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads or threads)
    world, device = distributed.join(cfg.device)
    try:
        last = _train(cfg, resume, log if world.main else (lambda *_: None), world, device)
        distributed.leave(world)
        return last
    finally:  # the caller's setting again (tests train in-process)
        torch.set_num_threads(threads)


class SyntheticBatches:
    """make_batch's recall examples and Python-source windows: every rank draws the step's whole batch (its seed is
    the step's) and takes its own rows."""

    def __init__(self, cfg: TrainConfig, tokenizer, chunk: int):
        self.cfg, self.tokenizer, self.chunk = cfg, tokenizer, chunk

    def rows(self, step: int, curriculum_step: int, world: World) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """This rank's ids [b, T], weights [b, T - 1], the prefix read without gradients, and the tokens read."""
        rng = random.Random(self.cfg.seed * 1_000_003 + step)  # the batch of a step does not depend on resumes
        carried = carried_bytes(self.cfg, rng, self.chunk)
        ids, weights = make_batch(self.cfg, curriculum_step, rng, self.tokenizer, self.chunk, carried)
        rows = rank_rows(self.cfg.batch_size, world.rank, world.size)
        share = slice(rows.start, rows.stop)
        return ids[share], weights[share], carried, sum(sequence_lengths(weights[share]))  # real tokens, no padding


class CorpusBatches:
    """Windows of a prepared corpus's train split, in the order of corpus.WindowOrder."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.split = TokenSplit(cfg.data, "train")
        self.order = WindowOrder(self.split.tokens, cfg.seq_len, cfg.batch_size, cfg.seed)
        has_heldout = self.split.index.splits["heldout"]["tokens"] > 0
        self.heldout = TokenSplit(cfg.data, "heldout") if has_heldout else None  # None: nothing held out

    def rows(self, step: int, curriculum_step: int, world: World) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        windows = [self.order.window(slot) for slot in self.order.slots(step, world.rank, world.size)]
        ids, weights = window_batch(self.split, windows, self.cfg.seq_len)
        return ids, weights, 0, ids.numel()


@torch.no_grad()
def heldout_loss(runner: torch.nn.Module, tokenizer, split: TokenSplit, seq_len: int, windows: int,
                 device: torch.device) -> dict[str, float]:
    """Mean next-token loss (nats) and bits per byte over the first `windows` windows of a corpus's held-out
    split, each from a fresh state."""
    count = min(windows, max(1, math.ceil((split.tokens - 1) / seq_len)))
    nats = targets = n_bytes = 0.0
    for w in range(count):
        ids, weights = window_batch(split, [w], seq_len)
        logits, _ = runner(ids.to(device))
        nll = F.cross_entropy(logits[0, :-1].float(), ids[0, 1:].to(device), reduction="none")
        weights = weights[0].to(device)
        nats += float((nll * weights).sum())
        targets += float(weights.sum())
        n_bytes += len(tokenizer.decode_bytes(ids[0, 1:][weights.cpu() > 0].tolist()))
    return {"loss": nats / max(1.0, targets), "bits_per_byte": nats / math.log(2) / max(1.0, n_bytes)}


# dense bf16 tensor-core peak FLOP/s by device name, for model FLOPs utilisation
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12}


def flops_per_token(model: Titans, seq_len: int) -> float:
    """Training FLOPs per token: 6 per weight (forward and backward) of every matrix but the embedding, plus
    attention's scores and values over its span (window or segment, at most the sequence). The memory's inner
    gradient is left out, as attention's softmax is: a lower bound."""
    cfg = model.cfg
    weights = sum(p.numel() for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n)
    span = min(seq_len, cfg.segment_size if cfg.variant == "mac" else cfg.window)
    attention = 0 if cfg.variant == "lmm" else 12 * cfg.n_layers * cfg.dim * span
    return 6.0 * weights + attention


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_FLOPS.items() if key in name), None)


def _train(cfg: TrainConfig, resume: bool, log, world: World, device: torch.device) -> dict:
    torch.manual_seed(cfg.seed)
    model = Titans(cfg.model_config()).to(device).train()
    if cfg.compile:
        compile_training_steps(model)
    for memory in model.memories():
        memory.state_grad_bound = cfg.state_grad_bound
    model.checkpoint_blocks = cfg.activation_checkpointing
    wrapped = distributed.wrap(model, world, cfg.parallel, device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "init_weights" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or "init_weights" in n]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=tuple(cfg.betas))
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    progress = _start(cfg, model, wrapped, optimizer, out, resume)
    if world.main:
        (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    tokenizer_dir = cfg.tokenizer_dir or cfg.data
    tokenizer = load_tokenizer(model.cfg.tokenizer, tokenizer_dir)
    if cfg.recall_fraction > 0 and model.cfg.tokenizer != "byte":  # answer spans are byte offsets
        raise ValueError("recall examples need the byte tokenizer; set recall_fraction to 0 for other tokenizers")
    batches = CorpusBatches(cfg) if cfg.data else SyntheticBatches(cfg, tokenizer, model.cfg.chunk_size)
    flops, peak = flops_per_token(model, cfg.seq_len), peak_flops(device)
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
        ids, weights, carried, tokens = batches.rows(step, at, world)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(cfg, step)
        optimizer.zero_grad(set_to_none=True)
        parts = {} if cfg.write_prices() else None
        loss_value = accumulate_gradients(cfg, model, wrapped, ids, weights, carried, world, device, parts)
        grad_norm = _full_float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
        if cfg.skip_grad_norm_above is not None and not grad_norm <= cfg.skip_grad_norm_above:
            progress.skipped += 1
            log(f"step {step:6d}  skipped: gradient norm {grad_norm:.3g} (loss {loss_value:.4f})")
        elif not math.isfinite(loss_value) or not math.isfinite(grad_norm):  # never step on a NaN
            raise FloatingPointError(f"loss {loss_value}, gradient norm {grad_norm} at step {step}")
        else:
            optimizer.step()
        tokens_done += tokens
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            elapsed = time.perf_counter() - t0
            rate = distributed.all_sum(tokens_done, world, device) / elapsed
            last = {"step": step, "loss": loss_value, "lr": lr_at(cfg, step), "grad_norm": grad_norm,
                    "tokens_per_s": rate, "elapsed_s": elapsed, "stage": list(cfg.stage(at))}
            if cfg.data:
                last["epoch"] = batches.order.epoch(step + 1)
            if peak:
                last["mfu"] = rate * flops / (peak * world.size)
            if cfg.carry_share:
                last["carried"] = carried
            if parts is not None:
                last.update(parts)
            if cfg.advance_at:
                last["held"] = progress.held
            if cfg.skip_grad_norm_above is not None:
                last["skipped"] = progress.skipped
            if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps - 1):
                model.eval()
                if cfg.data and batches.heldout is not None:
                    last["heldout"] = heldout_loss(wrapped, tokenizer, batches.heldout, cfg.seq_len,
                                                   cfg.eval_windows, device)
                if model.cfg.tokenizer == "byte" and cfg.eval_examples:
                    low, high, n_facts = cfg.stage(at)
                    eval_rng = random.Random(10_000 + step)
                    examples = [recall_example(eval_rng, draw_facts(n_facts, eval_rng), eval_rng.randint(low, high),
                                               cfg.filler, "heldout")
                                for _ in range(cfg.eval_examples)]
                    last["recall"] = recall_accuracy(wrapped, tokenizer, examples, device)
                    progress.recall = last["recall"]["exact"]
                model.train()
            if world.main:
                with metrics_path.open("a") as f:
                    f.write(json.dumps(last) + "\n")
            log(f"step {step:6d}  loss {last['loss']:.4f}  lr {last['lr']:.2e}  {rate:,.0f} tok/s"
                + (f"  mfu {last['mfu']:.1%}" if "mfu" in last else "")
                + (f"  held-out {last['heldout']['loss']:.4f} ({last['heldout']['bits_per_byte']:.3f} bits/byte)"
                   if "heldout" in last else "")
                + (f"  recall {last['recall']}" if "recall" in last else ""))
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
            _save(model, wrapped, optimizer, replace(progress, step=step + 1), out, tokenizer_dir, world)
    _save(model, wrapped, optimizer, replace(progress, step=cfg.steps), out, tokenizer_dir, world)
    return last


def accumulate_gradients(cfg: TrainConfig, model: Titans, wrapped: torch.nn.Module, ids: torch.Tensor,
                         weights: torch.Tensor, carried: int, world: World, device: torch.device,
                         parts: dict | None = None) -> float:
    """Backward of this rank's rows of a step, in cfg.grad_accum micro-batches, leaving in the parameters' grads
    (after the ranks' average) the gradient of the whole global batch's loss; returns that loss."""
    total = distributed.all_sum(float(weights.sum()), world, device)
    micro = _micro_batches(len(ids), cfg.grad_accum)
    loss_sum = 0.0
    for i, rows in enumerate(micro):
        with (distributed.no_sync(wrapped, world, i == len(micro) - 1),
              torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16 and device.type == "cuda")):
            loss = batch_loss(model, ids[rows].to(device), weights[rows], carried, cfg.write_prices(), parts,
                              runner=wrapped, total=total, cost_share=(rows.stop - rows.start) / cfg.batch_size)
            (loss * distributed.gradient_scale(world)).backward()
        loss_sum += float(loss.detach())
    return distributed.all_sum(loss_sum, world, device)


def _micro_batches(rows: int, accum: int) -> list[slice]:
    if rows % accum:
        raise ValueError(f"{rows} rows per process do not split into grad_accum={accum} micro-batches")
    size = rows // accum
    return [slice(i * size, (i + 1) * size) for i in range(accum)]


def _full_float(value: torch.Tensor) -> float:
    """A norm as a float (a sharded model's clip_grad_norm_ returns it as a DTensor)."""
    return float(value.full_tensor() if hasattr(value, "full_tensor") else value)
