"""saefast.data.buffer.ShuffleBuffer: every row once, mixed across chunks, deterministic, exact resume."""
import json

import pytest
import torch

from saefast.data.buffer import ShuffleBuffer


class RangeChunks:
    """Rows 0..n-1 (value = row id, in column 0 of a [rows, 3] tensor) in chunks of varied size."""

    def __init__(self, sizes):
        self.sizes = list(sizes)
        self.i = 0
        self.reads = 0

    def position(self):
        return {"chunk": self.i}

    def seek(self, position):
        self.i = position["chunk"]

    def next_chunk(self):
        if self.i >= len(self.sizes):
            return None
        start = sum(self.sizes[:self.i])
        n = self.sizes[self.i]
        self.i += 1
        self.reads += 1
        ids = torch.arange(start, start + n)
        return ids[:, None].expand(n, 3).to(torch.bfloat16), ids


def chunk_sizes(seed, n_chunks=23):
    return torch.randint(0, 17, (n_chunks,), generator=torch.Generator().manual_seed(seed)).tolist()


def drain(buffer):
    return [tuple(c.clone() for c in b) for b in buffer]


@pytest.mark.parametrize("capacity,batch_size", [(20, 4), (13, 5), (64, 8), (1, 3), (500, 7)])
@pytest.mark.parametrize("background", [False, True])
def test_every_row_served_once(capacity, batch_size, background):
    sizes = chunk_sizes(capacity)
    total = sum(sizes)
    buf = ShuffleBuffer(RangeChunks(sizes), capacity, batch_size, seed=3, background=background)
    assert buf.capacity % batch_size == 0 and buf.capacity >= capacity
    batches = drain(buf)
    assert all(a.shape == (batch_size, 3) and a.dtype == torch.float32 for a, _ in batches)
    ids = torch.cat([i for _, i in batches])
    assert torch.equal(torch.cat([a[:, 0] for a, _ in batches]).long(), ids)  # columns stay aligned
    assert ids.unique().numel() == ids.numel()
    # Only the last block's remainder (< batch_size rows) may be dropped.
    last_block = total % buf.capacity
    assert total - ids.numel() == last_block % batch_size


def test_rows_are_mixed_across_chunks_within_a_block():
    sizes = [8] * 16
    buf = ShuffleBuffer(RangeChunks(sizes), 128, 16, seed=0, background=False)
    first = next(buf)[1]
    assert (first // 8).unique().numel() >= 6  # rows from many different chunks
    assert not torch.equal(first, torch.arange(16))


def test_no_shuffle_keeps_stream_order():
    sizes = chunk_sizes(1)
    buf = ShuffleBuffer(RangeChunks(sizes), 12, 4, shuffle=False, background=False)
    ids = torch.cat([i for _, i in drain(buf)])
    assert torch.equal(ids, torch.arange(ids.numel()))


def test_deterministic_given_seed_and_independent_of_background():
    sizes = chunk_sizes(2)
    a = drain(ShuffleBuffer(RangeChunks(sizes), 24, 4, seed=5, background=False))
    b = drain(ShuffleBuffer(RangeChunks(sizes), 24, 4, seed=5, background=True))
    c = drain(ShuffleBuffer(RangeChunks(sizes), 24, 4, seed=6, background=False))
    assert all(torch.equal(x[1], y[1]) for x, y in zip(a, b)) and len(a) == len(b)
    assert not all(torch.equal(x[1], y[1]) for x, y in zip(a, c))


@pytest.mark.parametrize("background", [False, True])
def test_resume_at_every_batch_matches_uninterrupted(background):
    sizes = chunk_sizes(4)
    full = torch.cat([i for _, i in drain(ShuffleBuffer(RangeChunks(sizes), 20, 4, seed=1, background=False))])
    n_batches = full.numel() // 4
    for k in range(n_batches + 1):
        first = ShuffleBuffer(RangeChunks(sizes), 20, 4, seed=1, background=background)
        head = [next(first)[1] for _ in range(k)]
        state = json.loads(json.dumps(first.state_dict()))
        first.close()
        second = ShuffleBuffer(RangeChunks(sizes), 20, 4, seed=1, background=background)
        second.load_state_dict(state)
        rest = [i for _, i in drain(second)]
        assert torch.equal(torch.cat(head + rest), full), f"resume after {k} batches"


def test_chunks_straddling_blocks_are_read_once_in_sequence():
    stream = RangeChunks([10] * 6)
    drain(ShuffleBuffer(stream, 16, 4, background=False))
    assert stream.reads == 6


def test_settings_must_match_on_resume_and_bad_arguments():
    buf = ShuffleBuffer(RangeChunks([5]), 8, 4)
    state = buf.state_dict()
    with pytest.raises(ValueError, match="saved buffer has batch_size=4 but this one has batch_size=2"):
        ShuffleBuffer(RangeChunks([5]), 8, 2).load_state_dict(state)
    with pytest.raises(ValueError, match="saved buffer has seed=0 but this one has seed=1"):
        ShuffleBuffer(RangeChunks([5]), 8, 4, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="batch_size=0 must be a positive integer"):
        ShuffleBuffer(RangeChunks([5]), 8, 0)
    with pytest.raises(ValueError, match="capacity=0"):
        ShuffleBuffer(RangeChunks([5]), 0, 4)


def test_producer_errors_reach_the_consumer():
    class Failing(RangeChunks):
        def next_chunk(self):
            if self.i == 2:
                raise RuntimeError("disk on fire")
            return super().next_chunk()

    buf = ShuffleBuffer(Failing([4, 4, 4]), 4, 4, background=True)
    next(buf)
    with pytest.raises(RuntimeError, match="disk on fire"):
        drain(buf)
    with pytest.raises(RuntimeError, match="disk on fire"):  # raised again, not a hang
        next(buf)
