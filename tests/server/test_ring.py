"""server/ring.py: messages cross whole and in order, whatever their size against the ring's; a parked reader
is always woken."""

import multiprocessing
import random

from server.ring import Ring

SPAWN = multiprocessing.get_context("spawn")


def messages(seed: int, count: int, largest: int) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(rng.choice([0, 1, 7, 8, rng.randrange(largest)])) for _ in range(count)]


def test_messages_cross_whole_and_in_order_when_smaller_or_larger_than_the_ring():
    ring = Ring(SPAWN, 64)
    sent, received = messages(0, 200, 300), []
    for message in sent:  # the writer's wait drains the ring as the other process would
        ring.write(message, wake=lambda: None, wait=lambda: received.extend(ring.read()))
        received += ring.read()
    assert received == sent


def test_a_message_is_read_only_once_its_last_byte_is_written():
    ring = Ring(SPAWN, 16)
    seen = []
    ring.write(b"x" * 40, wake=lambda: None, wait=lambda: seen.append(ring.read()))
    assert seen and all(batch == [] for batch in seen)  # pieces arrived, no message yet
    assert ring.read() == [b"x" * 40]
    assert ring.read() == []


def test_a_parked_reader_is_woken_by_the_next_write_and_only_then():
    ring = Ring(SPAWN, 1024)
    wakes = []
    ring.write(b"a", wake=lambda: wakes.append(1), wait=lambda: None)
    assert wakes == []  # the reader was not parked
    assert not ring.park()  # unread data: it must not sleep
    assert ring.read() == [b"a"]
    assert ring.park()
    ring.write(b"b", wake=lambda: wakes.append(1), wait=lambda: None)
    ring.write(b"c", wake=lambda: wakes.append(1), wait=lambda: None)
    assert wakes == [1]  # one wake for a park
    assert ring.read() == [b"b", b"c"]


def _write_all(ring: Ring, conn, seed: int, count: int, largest: int) -> None:
    def wait():
        if conn.poll(0.001):
            conn.recv()  # a reader's note that it read; only here to pace the test
    for message in messages(seed, count, largest):
        ring.write(message, wake=lambda: conn.send("wake"), wait=wait)
    conn.send("done")


def test_another_process_writes_while_this_one_reads_and_parks():
    """The engine's and the API's protocol: read, park when empty, sleep on the pipe until woken."""
    ring = Ring(SPAWN, 4096)
    here, there = SPAWN.Pipe()
    writer = SPAWN.Process(target=_write_all, args=(ring, there, 1, 2000, 10_000))
    writer.start()
    received, done = [], False
    while not done or len(received) < 2000:
        batch = ring.read()
        received += batch
        if batch:
            here.send("read")
        elif ring.park():
            assert here.poll(10), "parked and never woken"
            done = done or here.recv() == "done"  # woken (or told the writer has finished)
        if here.poll():
            done = done or here.recv() == "done"
    writer.join(10)
    assert writer.exitcode == 0
    assert received == messages(1, 2000, 10_000)
