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

from .config import ConfigError, ModelConfig
from .model import Linear, State, Titans, flatten_state, nest_state
from .sampling import SamplingParams, sample
from .state import SessionState, read_snapshot
from .tokenizer import load_tokenizer

TokenIds = Sequence[int] | Tensor


@dataclass(frozen=True)
class Completion:
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (stop string or EOS) | "length"
    state: SessionState


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def stack_states(states: Sequence[SessionState]) -> State:
    return {k: torch.stack([s.tensors[k] for s in states]) for k in states[0].tensors}


def save_model_dir(model: Titans, model_dir: str | Path, tokenizer_dir: str | Path | None = None,
                   metadata: dict[str, str] | None = None) -> None:
    """A model directory Engine.load reads: config.json, model.safetensors and, for 'tokenizers' models,
    tokenizer.json copied from tokenizer_dir."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    model.cfg.save(model_dir / "config.json")
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(model_dir / "model.safetensors"), metadata=metadata)
    if tokenizer_dir is not None and model.cfg.tokenizer == "tokenizers":
        source = Path(tokenizer_dir) / "tokenizer.json"
        if source.resolve() != (model_dir / "tokenizer.json").resolve():
            shutil.copyfile(source, model_dir / "tokenizer.json")


class Engine:
    """A model ready to serve sessions. It takes ownership of `model`: moves it to the device, freezes its
    parameters and, with weight_dtype, casts its dense projections."""

    def __init__(self, model: Titans, tokenizer_dir: str | Path | None = None, device: torch.device | None = None,
                 weight_dtype: torch.dtype | None = None, compile: bool = False, aot_decode: bool = False):
        """weight_dtype: store the dense projections (not norms, memory or embeddings) in this dtype,
        e.g. torch.float16 to halve the bytes each decode step reads, or torch.int8 (weight-only, a scale per
        row: Linear.quantize_int8) to quarter them. Activations and the memory stay fp32. It is part of the
        fingerprint: snapshots are tied to the numerics that produced them.
        compile: run decode steps and prefill's memory chunks through torch.compile (Titans.compile_steps);
        the same function, so not part of the fingerprint. aot_decode (with compile): warm_up also compiles
        one session's decode step ahead of time (Titans.compile_decode_ahead_of_time)."""
        if aot_decode and not compile:
            raise ValueError("aot_decode needs compile=True")
        self.aot_decode = aot_decode
        self.device = device or default_device()
        self.config: ModelConfig = model.cfg
        self.model = model.to(self.device).eval()
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
            self.model.compile_steps()
        with torch.inference_mode():
            self._template = {k: v.detach().clone() for k, v in flatten_state(self.model.initial_state()).items()}

    # --- construction and checkpoints ----------------------------------------------------------

    @classmethod
    def from_config(cls, cfg: ModelConfig, seed: int = 0, device: torch.device | str | None = None,
                    tokenizer_dir: str | Path | None = None, weight_dtype: torch.dtype | None = None,
                    compile: bool = False, aot_decode: bool = False) -> Engine:
        """A randomly initialised model (seeded). tokenizer_dir holds tokenizer.json for 'tokenizers' configs."""
        with torch.random.fork_rng(devices=[]):  # seed the initialisation without touching the caller's RNG
            torch.manual_seed(seed)
            model = Titans(cfg)
        return cls(model, tokenizer_dir=tokenizer_dir, device=torch.device(device) if device else None,
                   weight_dtype=weight_dtype, compile=compile, aot_decode=aot_decode)

    @classmethod
    def load(cls, model_dir: str | Path, device: torch.device | str | None = None,
             weight_dtype: torch.dtype | None = None, compile: bool = False, aot_decode: bool = False) -> Engine:
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
                   weight_dtype=weight_dtype, compile=compile, aot_decode=aot_decode)

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
                self.model.compile_decode_ahead_of_time(batch._state, self._aot_dir.name)
            for _ in range(steps):
                batch.forward([[0]] * sessions)

    # --- sessions ---------------------------------------------------------------------------------

    def new_state(self) -> SessionState:
        return SessionState.fresh(self._template, self.fingerprint)

    def load_state(self, blob: bytes) -> SessionState:
        """Raises SnapshotError for a corrupted snapshot or one made by another model."""
        return read_snapshot(blob, self.fingerprint, self._template)

    def _ids(self, token_ids: TokenIds) -> Tensor:
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

    def _id_rows(self, token_ids: Sequence[TokenIds]) -> Tensor | None:
        """[B, 1] ids if every session gives a list of one id (a decode step), checked in Python and made in one
        tensor; None otherwise. A tensor per session and their stack were ~100 us of a 32-session step."""
        if not all(type(t) in (list, tuple) and len(t) == 1 for t in token_ids):
            return None
        flat = [t[0] for t in token_ids]
        if not all(type(t) is int and 0 <= t < self.config.vocab_size for t in flat):
            return None  # _ids says what is wrong
        return torch.tensor(flat, dtype=torch.long).view(-1, 1).to(self.device)

    def _check(self, state: SessionState) -> None:
        if state.model_fingerprint != self.fingerprint:
            raise ValueError("state belongs to another model (fingerprint mismatch)")

    def batch(self, states: Sequence[SessionState]) -> SessionBatch:
        """Keep these sessions stacked across calls (a scheduler's running batch); see SessionBatch."""
        if not states:
            raise ValueError("a batch needs at least one session")
        for s in states:
            self._check(s)
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
        ids = self._ids(prompt_ids)
        if ids.numel() == 0:
            raise ValueError("generation needs at least one prompt token")
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        session = self.batch([state])
        last, out = session.forward([ids])[0][0][-1], []
        for _ in range(params.max_tokens):
            token = sample(last, params, generator)
            out.append(token)
            yield token
            last = session.forward([[token]])[0][0][-1]
            if self._finished(out, params):
                break
        return session.states()[0]

    def _is_eos(self, token: int) -> bool:
        return self.config.eos_token_id is not None and token == self.config.eos_token_id

    def _finished(self, out: list[int], params: SamplingParams) -> bool:
        if self._is_eos(out[-1]):
            return True
        if params.stop:  # a stop string that just completed lies within the last len(stop) tokens
            tail = self.tokenizer.decode(out[-(max(len(s.encode()) for s in params.stop) + 1):])
            return any(s in tail for s in params.stop)
        return False

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
        eos = bool(out) and self._is_eos(out[-1])
        text = self.tokenizer.decode(out[:-1] if eos else out)  # the EOS token has no text of its own
        cuts = [text.index(s) for s in params.stop if s in text]
        reason = "stop" if cuts or eos else "length"
        return Completion(out, text[: min(cuts)] if cuts else text, reason, final)


class SessionBatch:
    """Sessions stacked once and advanced in place, call after call: what a scheduler decodes with.

    forward() returns, per session, (logits [T_s, V], surprise [T_s] or None); states() snapshots the
    current states as SessionStates (copies). The SessionStates it was built from are never touched.
    A step that raises leaves the batch half-written: it then refuses further use, and the sessions
    must be rebuilt from their last SessionStates.
    """

    def __init__(self, engine: Engine, states: Sequence[SessionState]):
        self.engine = engine
        self.positions = [s.tokens_seen for s in states]
        self._failed: BaseException | None = None
        with torch.inference_mode():
            self._state = nest_state(stack_states(states))  # stacking copies: the model may write into it

    @torch.inference_mode()
    def forward(self, token_ids: Sequence[TokenIds], return_surprise: bool = False) -> list[tuple]:
        self._usable()
        if len(token_ids) != len(self.positions):
            raise ValueError(f"{len(token_ids)} token sequences for {len(self.positions)} sessions")
        rows = self.engine._id_rows(token_ids)
        ids = [self.engine._ids(t) for t in token_ids] if rows is None else rows
        try:
            logits, self._state, surprise = self.engine.model.forward_tokens(
                ids, self._state, self.positions, return_surprise, owned=True)
        except BaseException as e:
            self._failed = e
            raise
        self.positions = [p + 1 for p in self.positions] if rows is not None else \
            [p + len(t) for p, t in zip(self.positions, ids)]
        return [(lg, surprise[i] if return_surprise else None) for i, lg in enumerate(logits)]

    def __len__(self) -> int:
        return len(self.positions)

    def _usable(self) -> None:
        if self._failed is not None:
            raise RuntimeError("this batch failed in an earlier step; rebuild it from the sessions' states") \
                from self._failed

    @torch.inference_mode()
    def add(self, states: Sequence[SessionState]) -> None:
        """Sessions join at the end of the batch (continuous batching: between steps)."""
        self._usable()
        for s in states:
            self.engine._check(s)
        if states:
            flat, new = flatten_state(self._state), stack_states(states)
            self._state = nest_state({k: torch.cat([flat[k], new[k]]) for k in flat})
            self.positions += [s.tokens_seen for s in states]

    @torch.inference_mode()
    def remove(self, indices: Sequence[int]) -> None:
        """Sessions leave; the others keep their order."""
        self._usable()
        gone = set(indices)
        keep = [i for i in range(len(self.positions)) if i not in gone]
        index = torch.tensor(keep, dtype=torch.long, device=self.engine.device)
        self._state = nest_state({k: v.index_select(0, index) for k, v in flatten_state(self._state).items()})
        self.positions = [self.positions[i] for i in keep]

    @torch.inference_mode()
    def state(self, i: int) -> SessionState:
        """A copy of session i's current state."""
        flat = flatten_state(self._state)
        return SessionState({k: v[i].clone() for k, v in flat.items()}, self.positions[i], self.engine.fingerprint)

    def states(self) -> list[SessionState]:
        return [self.state(i) for i in range(len(self.positions))]
