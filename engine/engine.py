"""Engine: a loaded Titans model with the session API of DESIGN.md §4.

The engine works on token ids; `engine.tokenizer` converts text. Every call is pure: states go in,
new states come out, and nothing is written into a state that was passed in.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from .compiled import AotDecode, GraphDecode, compile_steps
from .config import ConfigError, ModelConfig
from .model import Titans
from .quant import Linear
from .sampling import SamplingParams, sample
from .state import ModelState, SessionState, State, flatten_state, nest_state, read_snapshot, write_into
from .tokenizer import StopStrings, load_tokenizer

TokenIds = Sequence[int] | Tensor


@dataclass(frozen=True)
class Completion:
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (stop string or EOS) | "length"
    state: SessionState


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def save_model_dir(model: Titans, model_dir: str | Path, tokenizer_dir: str | Path | None = None,
                   metadata: dict[str, str] | None = None, weights: dict[str, torch.Tensor] | None = None) -> None:
    """A model directory Engine.load reads: config.json, model.safetensors (the model's, or `weights`: whole
    tensors gathered from a sharded model) and, from tokenizer_dir, tokenizer.json ('tokenizers' models) and the
    chat template when it has one."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    model.cfg.save(model_dir / "config.json")
    weights = model.state_dict() if weights is None else weights
    save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(model_dir / "model.safetensors"),
              metadata=metadata)
    names = ["chat_template.json"] + (["tokenizer.json"] if model.cfg.tokenizer == "tokenizers" else [])
    for name in names if tokenizer_dir is not None else []:
        source = Path(tokenizer_dir) / name
        if source.exists() and source.resolve() != (model_dir / name).resolve():
            shutil.copyfile(source, model_dir / name)


class Engine:
    """A model ready to serve sessions. It takes ownership of `model`: moves it to the device, freezes its
    parameters and, with weight_dtype, casts its dense projections."""

    def __init__(self, model: Titans, tokenizer_dir: str | Path | None = None, device: torch.device | None = None,
                 weight_dtype: torch.dtype | None = None, compile: bool = False, aot_decode: bool = False,
                 decode_graphs: str = "auto"):
        """weight_dtype: store the dense projections (not norms, memory or embeddings) in this dtype,
        e.g. torch.float16 to halve the bytes each decode step reads, or torch.int8 (weight-only, a scale per
        row: Linear.quantize_int8) to quarter them. Activations and the memory stay fp32. It is part of the
        fingerprint: snapshots are tied to the numerics that produced them.
        compile: run decode steps and prefill's memory chunks through torch.compile (engine/compiled.py);
        the same function, so not part of the fingerprint. aot_decode (with compile): warm_up also compiles
        one session's decode step ahead of time (compiled.AotDecode).
        decode_graphs: how a SessionBatch runs its one-token decode steps (compiled.GraphDecode): "cuda" replays
        CUDA graphs; "static" runs the same step on the same static buffers without capturing (what tests check on
        a CPU); "off" (and "auto", for now: no GPU has run the capture yet) steps as any other call does."""
        if aot_decode and not compile:
            raise ValueError("aot_decode needs compile=True")
        if decode_graphs not in ("auto", "cuda", "static", "off"):
            raise ValueError(f"decode_graphs must be auto, cuda, static or off, got {decode_graphs!r}")
        self.aot_decode = aot_decode
        self.device = device or default_device()
        self.config: ModelConfig = model.cfg
        self.model = model.to(self.device).eval()
        if decode_graphs == "auto":
            decode_graphs = "off"
        if decode_graphs == "cuda" and self.device.type != "cuda":
            raise ValueError("decode_graphs='cuda' needs a CUDA device")
        self.decode_graphs = decode_graphs
        for p in self.model.parameters():
            p.requires_grad_(False)
        if weight_dtype is not None:
            for module in self.model.modules():
                if isinstance(module, Linear):
                    if weight_dtype == torch.int8:
                        module.quantize_int8()
                    else:
                        module.to(weight_dtype)
        self.tokenizer = load_tokenizer(self.config.tokenizer, tokenizer_dir)
        if self.tokenizer.vocab_size > self.config.vocab_size:
            raise ConfigError(f"tokenizer has {self.tokenizer.vocab_size} tokens but the model only "
                              f"{self.config.vocab_size}")
        self._tokenizer_dir = tokenizer_dir
        self.fingerprint = self._fingerprint()
        if compile:
            if self.device.type == "cpu" and not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "c++")):
                raise RuntimeError("compiled steps on a CPU need a C++ compiler (g++ or $CXX); install one "
                                   "or run without compile")
            compile_steps(self.model)
        with torch.inference_mode():
            self.state_template = {k: v.detach().clone() for k, v in flatten_state(self.model.initial_state()).items()}

    # --- construction and checkpoints ----------------------------------------------------------

    @classmethod
    def from_config(cls, cfg: ModelConfig, seed: int = 0, device: torch.device | str | None = None,
                    tokenizer_dir: str | Path | None = None, weight_dtype: torch.dtype | None = None,
                    compile: bool = False, aot_decode: bool = False, decode_graphs: str = "auto") -> Engine:
        """A randomly initialised model (seeded). tokenizer_dir holds tokenizer.json for 'tokenizers' configs."""
        with torch.random.fork_rng(devices=[]):  # seed the initialisation without touching the caller's RNG
            torch.manual_seed(seed)
            model = Titans(cfg)
        return cls(model, tokenizer_dir=tokenizer_dir, device=torch.device(device) if device else None,
                   weight_dtype=weight_dtype, compile=compile, aot_decode=aot_decode, decode_graphs=decode_graphs)

    @classmethod
    def load(cls, model_dir: str | Path, device: torch.device | str | None = None,
             weight_dtype: torch.dtype | None = None, compile: bool = False, aot_decode: bool = False,
             decode_graphs: str = "auto") -> Engine:
        """A model directory: config.json + model.safetensors (+ tokenizer.json for 'tokenizers')."""
        model_dir = Path(model_dir)
        cfg = ModelConfig.load(model_dir)
        weights_path = model_dir / "model.safetensors"
        if not weights_path.exists():
            raise FileNotFoundError(f"no model.safetensors in {model_dir}")
        model = Titans(cfg)
        weights = load_file(str(weights_path))
        expected = model.state_dict()
        missing, extra = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
        if missing or extra:
            raise ConfigError(f"{weights_path} does not match config.json: missing {missing[:5]}, extra {extra[:5]}")
        for name, ref in expected.items():
            if weights[name].shape != ref.shape:
                raise ConfigError(f"{weights_path}: {name} has shape {tuple(weights[name].shape)}, "
                                  f"config.json implies {tuple(ref.shape)}")
        model.load_state_dict(weights)
        return cls(model, tokenizer_dir=model_dir, device=torch.device(device) if device else None,
                   weight_dtype=weight_dtype, compile=compile, aot_decode=aot_decode, decode_graphs=decode_graphs)

    def save(self, model_dir: str | Path) -> None:
        if any(isinstance(m, Linear) and m.weight.dtype == torch.int8 for m in self.model.modules()):
            raise ValueError("an engine with int8 weights cannot be saved as a model: save the one it was loaded "
                             "from (Engine.load quantises at load time)")
        save_model_dir(self.model, model_dir, self._tokenizer_dir, metadata={"fingerprint": self.fingerprint})

    def _fingerprint(self) -> str:
        """Hash of the config, the tokenizer and every weight: a snapshot is valid only for the model that made it."""
        h = hashlib.sha256(self.config.to_json().encode())
        if self.config.tokenizer == "tokenizers":
            h.update((Path(self._tokenizer_dir) / "tokenizer.json").read_bytes())
        for name, tensor in sorted(self.model.state_dict().items()):
            t = tensor.detach().cpu().contiguous()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return h.hexdigest()[:32]

    def warm_up(self) -> None:
        """With compiled steps, compile their graphs now rather than in someone's request: one session and
        batches (whose size then stays dynamic; half-precision dense layers switch GEMMs at Linear.UPCAST_ROWS
        rows), each prefilling whole memory chunks, then decoding through steps that end a memory chunk and a
        MAC segment."""
        if self.model.decode_step is None:
            return
        steps = (self.config.segment_size if self.config.variant == "mac" else self.config.chunk_size) + 1
        upcasts = self.device.type == "cpu" and any(  # half-precision dense layers: a big batch takes other GEMMs
            isinstance(m, Linear) and m.weight.dtype != self.model.embed.weight.dtype for m in self.model.modules())
        for sessions in (1, 2, Linear.UPCAST_ROWS) if upcasts else (1, 2):
            batch = self.batch([self.new_state()] * sessions)
            batch.forward([[0] * 2 * self.config.chunk_size] * sessions)  # two chunks: one alone takes the decode path
            if sessions == 1 and self.aot_decode and self.model.aot_decode is None:
                self._aot_dir = tempfile.TemporaryDirectory(prefix="titans-aot-")  # removed with the engine
                self.model.aot_decode = AotDecode(self.model, batch.live_state(), self._aot_dir.name)
            for _ in range(steps):
                batch.forward([[0]] * sessions)

    # --- sessions ---------------------------------------------------------------------------------

    def new_state(self) -> SessionState:
        return SessionState.fresh(self.state_template, self.fingerprint)

    def load_state(self, blob: bytes) -> SessionState:
        """Raises SnapshotError for a corrupted snapshot or one made by another model."""
        return read_snapshot(blob, self.fingerprint, self.state_template)

    def ids(self, token_ids: TokenIds) -> Tensor:
        listed = not isinstance(token_ids, Tensor)
        if listed:
            token_ids = list(token_ids)
        ids = torch.tensor(token_ids, dtype=torch.long) if listed else token_ids.to(torch.long)
        if ids.dim() != 1:
            raise ValueError(f"token ids must be 1-D, got shape {tuple(ids.shape)}")
        if ids.numel():  # a list is checked in Python: for a decode step's one id, cheaper than two reductions
            low, high = (min(token_ids), max(token_ids)) if listed else (int(ids.min()), int(ids.max()))
            if not (low >= 0 and high < self.config.vocab_size):
                raise ValueError(f"token ids must be in [0, {self.config.vocab_size})")
        return ids.to(self.device)

    def id_rows(self, token_ids: Sequence[TokenIds]) -> Tensor | None:
        """[B, 1] ids if every session gives a list of one id (a decode step), checked in Python and made in one
        tensor; None otherwise (a tensor per session and their stack cost a large batch's step more)."""
        if not all(type(t) in (list, tuple) and len(t) == 1 for t in token_ids):
            return None
        flat = [t[0] for t in token_ids]
        if not all(type(t) is int and 0 <= t < self.config.vocab_size for t in flat):
            return None  # ids says what is wrong
        return torch.tensor(flat, dtype=torch.long).view(-1, 1).to(self.device)

    def check(self, state: SessionState) -> None:
        if state.model_fingerprint != self.fingerprint:
            raise ValueError("state belongs to another model (fingerprint mismatch)")

    def batch(self, states: Sequence[SessionState]) -> SessionBatch:
        """Keep these sessions stacked across calls (a scheduler's running batch); see SessionBatch."""
        if not states:
            raise ValueError("a batch needs at least one session")
        for s in states:
            self.check(s)
        return SessionBatch(self, states)

    def forward_batch(self, token_ids: Sequence[TokenIds], states: Sequence[SessionState],
                      return_surprise: bool = False) -> list[tuple]:
        """Many sessions at once; each result equals forward() of that session alone.

        Returns [(logits [T_s, V], new_state)] or with return_surprise [(logits, new_state, surprise [T_s])].
        """
        if len(token_ids) != len(states):
            raise ValueError(f"{len(token_ids)} token sequences for {len(states)} states")
        if not states:
            return []
        batch = self.batch(states)
        out = batch.forward(token_ids, return_surprise)
        new = batch.states()
        if return_surprise:
            return [(logits, state, surprise) for (logits, surprise), state in zip(out, new)]
        return [(logits, state) for (logits, _), state in zip(out, new)]

    def forward(self, token_ids: TokenIds, state: SessionState, return_surprise: bool = False):
        """logits [T, V] after each token and the new state (+ surprise [T]); `state` is left untouched."""
        return self.forward_batch([token_ids], [state], return_surprise)[0]

    # --- generation -------------------------------------------------------------------------------

    def generate(self, prompt_ids: TokenIds, state: SessionState,
                 params: SamplingParams = SamplingParams()) -> Generator[int, None, SessionState]:
        """Yield sampled token ids; return (StopIteration.value) the state after prompt + generated tokens.

        Every yielded token is absorbed into the returned state, including a matched stop string or EOS.
        """
        ids = self.ids(prompt_ids)
        if ids.numel() == 0:
            raise ValueError("generation needs at least one prompt token")
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        session = self.batch([state])
        stops = StopStrings(self.tokenizer, params.stop)
        last = session.forward([ids])[0][0][-1]
        for _ in range(params.max_tokens):
            token = sample(last, params, generator)
            yield token
            last = session.forward([[token]])[0][0][-1]
            if self.is_eos(token) or stops.push(token)[1]:
                break
        return session.states()[0]

    def is_eos(self, token: int) -> bool:
        return self.config.eos_token_id is not None and token == self.config.eos_token_id

    def complete(self, prompt_ids: TokenIds, state: SessionState,
                 params: SamplingParams = SamplingParams()) -> Completion:
        """Run generate() to the end. The text is cut before the first stop string."""
        gen = self.generate(prompt_ids, state, params)
        out = []
        while True:
            try:
                out.append(next(gen))
            except StopIteration as stop:
                final = stop.value
                break
        eos = bool(out) and self.is_eos(out[-1])
        stops, pieces = StopStrings(self.tokenizer, params.stop), []
        for token in out[:-1] if eos else out:  # the EOS token has no text of its own
            piece, stopped = stops.push(token)
            pieces.append(piece)
            if stopped:
                break
        else:
            pieces.append(stops.finish())
        reason = "stop" if stops.matched is not None or eos else "length"
        return Completion(out, "".join(pieces), reason, final)


class SessionBatch:
    """Sessions advanced together, call after call, in a pool of slots: what a scheduler steps.

    Layout: for every state tensor (its flat name, engine/state.py) one pool tensor [capacity, ...] on the
    engine's device. The batch's n sessions hold slots 0..n-1 in batch order, so a step reads and writes the
    leading n slots of every pool tensor in place: views, never a gather. Joining writes the newcomers' states
    into the next free slots; leaving moves the last sessions into the freed slots (vLLM's condense), so a change
    of membership copies the sessions that move, never the batch. A full pool doubles (one copy of the live
    slots, amortised over the joins).

    forward() returns, per session, (logits [T_s, V], surprise [T_s] or None); state(i) copies session i out and
    to_bytes(i) serialises its slot. The SessionStates it was built from are never touched. A step that raises
    leaves the batch half-written: it then refuses further use, and the sessions must be rebuilt from their
    last SessionStates.
    """

    def __init__(self, engine: Engine, states: Sequence[SessionState] = (), capacity: int = 0):
        self.engine = engine
        self.positions: list[int] = []
        self._failed: BaseException | None = None
        self._pool: State = {}
        self._live: ModelState | None = None  # nested views of slots [0, n), made when n changes
        self._graphs: GraphDecode | None = None  # decode steps (Engine.decode_graphs), over this pool
        self._reserve(max(capacity, len(states), 1))
        self.add(states)

    @torch.inference_mode()
    def forward(self, token_ids: Sequence[TokenIds], return_surprise: bool = False) -> list[tuple]:
        self._usable()
        if len(token_ids) != len(self.positions):
            raise ValueError(f"{len(token_ids)} token sequences for {len(self.positions)} sessions")
        rows = self.engine.id_rows(token_ids)
        ids = [self.engine.ids(t) for t in token_ids] if rows is None else rows
        live = self.live_state()
        try:
            if rows is not None and not return_surprise and self.engine.decode_graphs != "off":
                logits, surprise = list(self._graph_decode()(rows, self.positions).unbind(0)), None
            else:
                logits, new, surprise = self.engine.model.forward_tokens(ids, live, self.positions, return_surprise,
                                                                         owned=True)
                write_into(live, new)
        except BaseException as e:
            self._failed = e
            raise
        self.positions = [p + 1 for p in self.positions] if rows is not None else \
            [p + len(t) for p, t in zip(self.positions, ids)]
        return [(lg, surprise[i] if return_surprise else None) for i, lg in enumerate(logits)]

    def __len__(self) -> int:
        return len(self.positions)

    @property
    def capacity(self) -> int:
        return next(iter(self._pool.values())).shape[0]

    def live_state(self) -> ModelState:
        """The batch's sessions as the model takes them: nested views of slots [0, n) of the pool."""
        if self._live is None:
            n = len(self.positions)
            self._live = nest_state({k: v[:n] for k, v in self._pool.items()})
        return self._live

    def prepare_decode_graphs(self) -> None:
        """Capture the decode graphs of every batch size this pool holds now (Engine.decode_graphs on), not at the
        first step of each size."""
        if self.engine.decode_graphs != "off":
            self._graph_decode().prepare()

    def _graph_decode(self) -> GraphDecode:
        if self._graphs is None or self._graphs.pool is not self._pool:  # a grown pool is new tensors
            self._graphs = GraphDecode(self.engine.model, self._pool, capture=self.engine.decode_graphs == "cuda")
        return self._graphs

    def _usable(self) -> None:
        if self._failed is not None:
            raise RuntimeError("this batch failed in an earlier step; rebuild it from the sessions' states") \
                from self._failed

    @torch.inference_mode()
    def _reserve(self, more: int) -> None:
        """Room for `more` sessions beyond the live ones (capacity doubles when it runs out)."""
        n = len(self.positions)
        if self._pool and n + more <= self.capacity:
            return
        capacity = max(n + more, 2 * self.capacity if self._pool else 0)
        old, self._pool = self._pool, {k: v.new_empty((capacity, *v.shape))
                                       for k, v in self.engine.state_template.items()}
        for k, v in old.items():
            self._pool[k][:n] = v[:n]
        self._live = None

    @torch.inference_mode()
    def add(self, states: Sequence[SessionState]) -> None:
        """Sessions join at the end of the batch (continuous batching: between steps), each written into its
        slot."""
        self._usable()
        for s in states:
            self.engine.check(s)
        self._reserve(len(states))
        n = len(self.positions)
        for i, s in enumerate(states):
            for k, v in s.tensors.items():
                self._pool[k][n + i] = v
        self.positions += [s.tokens_seen for s in states]
        self._live = None

    @torch.inference_mode()
    def move(self, indices: Sequence[int], into: SessionBatch) -> list[int]:
        """Sessions leave this batch and join the end of `into` (a prefill batch handing sessions to the decode
        batch), slot to slot. Returns this batch's new order, as remove() does."""
        self._usable()
        into._usable()
        into._reserve(len(indices))
        n, index = len(into.positions), torch.tensor(indices, dtype=torch.long, device=self.engine.device)
        for k, v in into._pool.items():
            v[n:n + len(indices)] = self._pool[k].index_select(0, index)
        into.positions += [self.positions[i] for i in indices]
        into._live = None
        return self.remove(indices)

    @torch.inference_mode()
    def remove(self, indices: Sequence[int]) -> list[int]:
        """Sessions leave; the last sessions move into the slots they free. Returns the new order: order[j] is
        the index, before this call, of the session now at j."""
        self._usable()
        gone = set(indices)
        n, left = len(self.positions), len(self.positions) - len(gone)
        holes = [i for i in sorted(gone) if i < left]
        movers = [i for i in range(left, n) if i not in gone]
        order = list(range(left))
        if holes:
            device = self.engine.device
            to, source = (torch.tensor(x, dtype=torch.long, device=device) for x in (holes, movers))
            for v in self._pool.values():
                v.index_copy_(0, to, v.index_select(0, source))
            for hole, mover in zip(holes, movers):
                order[hole] = mover
        self.positions = [self.positions[i] for i in order]
        self._live = None
        return order

    def slot_state(self, i: int) -> SessionState:
        """Session i as a SessionState over its slot (views: valid until the next call that changes the batch)."""
        return SessionState({k: v[i] for k, v in self._pool.items()}, self.positions[i], self.engine.fingerprint)

    @torch.inference_mode()
    def state(self, i: int) -> SessionState:
        """A copy of session i's current state."""
        slot = self.slot_state(i)
        return SessionState({k: v.clone() for k, v in slot.tensors.items()}, slot.tokens_seen, slot.model_fingerprint)

    def to_bytes(self, i: int) -> bytes:
        """Session i's snapshot, serialised from its slot."""
        return self.slot_state(i).to_bytes()

    def states(self) -> list[SessionState]:
        return [self.state(i) for i in range(len(self.positions))]
