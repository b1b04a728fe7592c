"""A one-way stream of messages between two processes in shared memory: how the engine loop and the API process
talk (server/engine_process.py), with no system call in the engine's steady state.

Why not the pipe alone: a system call costs the engine loop far more than its own few microseconds. On the 2-vCPU
VM this project is measured on, one `poll` of the pipe per iteration made a one-session generation 3% slower and
one `send` per iteration another 5-8% (bench/engine_probes.py, probe 11: the same scheduler loop in one process,
with and without them, paired with Engine.generate) -- the steps themselves run slower after each trip into the
kernel, not just the call. A Ring is written and read with plain memory copies; the pipe remains for what has to
wake a sleeping process, and for noticing that the other one has died.

    writer                                         reader
    write(message) -> frame copied in, published   read() -> the complete messages published so far, in order
                      if the reader was parked:    park() -> True if nothing is left to read: it then sleeps
                      wake() it (the pipe)                  on the pipe until the writer's wake()

Frames are an 8-byte length and the message; a message larger than the ring crosses in pieces (the writer waits
for room, the reader keeps what has arrived until the rest does). The positions written and read count bytes
since the start; both change under one lock (uncontended it is an atomic instruction, not a system call), which
also orders the frames' bytes before the positions that publish them on any CPU. One writer and one reader:
neither end is shared between threads.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from multiprocessing.context import BaseContext

LENGTH_BYTES = 8


class Ring:
    def __init__(self, context: BaseContext, capacity: int):
        self.capacity = capacity
        self._bytes = context.RawArray(ctypes.c_uint8, capacity)
        self._positions = context.RawArray(ctypes.c_uint64, 2)  # [bytes written, bytes read], ever
        self._parked = context.RawValue(ctypes.c_bool)  # the reader sleeps until the writer wakes it
        self._lock = context.Lock()
        self._attach()

    def __getstate__(self) -> dict:  # to the spawned process, with multiprocessing's reducers for the shared parts
        return {k: getattr(self, k) for k in ("capacity", "_bytes", "_positions", "_parked", "_lock")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._attach()

    def _attach(self) -> None:
        self._view = memoryview(self._bytes).cast("B")
        self._pending = bytearray()  # the reader's bytes of frames not yet complete

    # --- writer ---------------------------------------------------------------------------------------------

    def write(self, message: bytes, wake: Callable[[], None], wait: Callable[[], None]) -> bool:
        """Append one message; True if it woke the reader. wake(): called when the reader was parked (at most once
        per piece published); wait(): called while the ring is full, to let the reader drain it (it may raise to
        give up)."""
        parts = [memoryview(len(message).to_bytes(LENGTH_BYTES, "little")), memoryview(message).cast("B")]
        woke = False
        while parts:
            with self._lock:
                written, read = self._positions
            room = self.capacity - (written - read)
            if room == 0:
                wait()
                continue
            position = written
            while parts and room:  # as much of the frame as fits, then one publication
                piece, parts[0] = parts[0][:room], parts[0][room:]
                self._copy_in(position % self.capacity, piece)
                position, room = position + len(piece), room - len(piece)
                if not parts[0]:
                    parts.pop(0)
            with self._lock:
                self._positions[0] = position
                parked, self._parked.value = self._parked.value, False
            if parked:
                wake()
                woke = True
        return woke

    def _copy_in(self, start: int, piece: memoryview) -> None:
        first = min(len(piece), self.capacity - start)
        self._view[start:start + first] = piece[:first]
        self._view[:len(piece) - first] = piece[first:]

    # --- reader ---------------------------------------------------------------------------------------------

    def read(self) -> list[bytes]:
        """The messages whose last byte has been published, oldest first; the start of a later one is kept."""
        with self._lock:
            written, read = self._positions
        if written != read:
            start, size = read % self.capacity, written - read
            first = min(size, self.capacity - start)
            self._pending += self._view[start:start + first]
            self._pending += self._view[:size - first]
            with self._lock:
                self._positions[1] = written
        messages, pending = [], self._pending
        while len(pending) >= LENGTH_BYTES:
            end = LENGTH_BYTES + int.from_bytes(pending[:LENGTH_BYTES], "little")
            if len(pending) < end:
                break
            messages.append(bytes(pending[LENGTH_BYTES:end]))
            del pending[:end]  # from the front of a bytearray: an offset moves, nothing is copied
        return messages

    def park(self) -> bool:
        """Before the reader sleeps: True if nothing is published that it has not read, and the writer's next
        publication will call wake(); False if there is more to read (it must not sleep)."""
        with self._lock:
            written, read = self._positions
            if written != read:
                return False
            self._parked.value = True
            return True
