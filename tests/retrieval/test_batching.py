"""Micro-batching: concurrent queries for one submodel are encoded together, each gets its own rows, and a
lone query is encoded at once."""

import threading

import numpy as np
import pytest
import torch

from matvit import data
from retrieval import build
from retrieval.batching import Batcher
from retrieval.encoder import Encoder
from retrieval.retriever import Retriever

WAIT = 30  # seconds a test waits for a thread; batches never wait that long unless something is wrong


class RecordingEncode:
    """An encode function that returns each image's pixel sum and records the batches it saw; while `hold` is
    clear it blocks, so later requests pile up behind the batch it is encoding."""

    def __init__(self) -> None:
        self.batches: list[tuple[str, int]] = []
        self.hold = threading.Event()
        self.hold.set()
        self.fail = False

    def __call__(self, images: torch.Tensor, spec: str) -> np.ndarray:
        self.batches.append((spec, len(images)))
        assert self.hold.wait(WAIT)
        if self.fail:
            raise RuntimeError("the encoder broke")
        return images.flatten(1).sum(1, keepdim=True).numpy().astype(np.float32)


def image(value: int, n: int = 1) -> torch.Tensor:
    return torch.full((n, 1, 2, 2), value, dtype=torch.uint8)


def run_threads(batcher: Batcher, calls: list[tuple], results: dict) -> list[threading.Thread]:
    def call(key, images, spec):
        try:
            results[key] = batcher.encode(lambda: images, spec)
        except RuntimeError as e:
            results[key] = e

    threads = [threading.Thread(target=call, args=c) for c in calls]
    for t in threads:
        t.start()
    return threads


def wait_until(predicate) -> None:
    done = threading.Event()
    for _ in range(WAIT * 100):
        if predicate():
            return
        done.wait(0.01)
    raise AssertionError("timed out")


def test_requests_arriving_during_an_encode_form_one_batch_with_their_own_rows():
    encode = RecordingEncode()
    batcher = Batcher(encode, slots=1, max_wait_ms=0)
    encode.hold.clear()
    results: dict = {}
    first = run_threads(batcher, [("first", image(1), "S")], results)
    wait_until(lambda: encode.batches)  # the first request is encoding alone
    rest = run_threads(batcher, [(i, image(i, n=1 + i % 2), "S") for i in range(2, 9)], results)
    wait_until(lambda: len(batcher._gathering.get("S", [])) == 7)
    encode.hold.set()
    for t in first + rest:
        t.join(WAIT)
    assert encode.batches == [("S", 1), ("S", sum(1 + i % 2 for i in range(2, 9)))]
    for i in range(2, 9):
        got = results[i]
        assert got.embeddings.shape == (1 + i % 2, 1) and np.all(got.embeddings == 4 * i)
        assert got.batch_images == 10 and got.queue_s > 0 and got.encode_s > 0
    assert results["first"].batch_images == 1


def test_submodels_are_never_mixed_in_a_batch():
    encode = RecordingEncode()
    batcher = Batcher(encode, slots=1, max_wait_ms=0)
    encode.hold.clear()
    results: dict = {}
    threads = run_threads(batcher, [("busy", image(1), "XL")], results)
    wait_until(lambda: encode.batches)
    threads += run_threads(batcher, [("s1", image(2), "S"), ("m", image(3), "M"), ("s2", image(4), "S")], results)
    wait_until(lambda: len(batcher._gathering.get("S", [])) == 2 and "M" in batcher._gathering)
    encode.hold.set()
    for t in threads:
        t.join(WAIT)
    assert sorted(encode.batches) == [("M", 1), ("S", 2), ("XL", 1)]
    assert float(results["s2"].embeddings[0, 0]) == 16 and float(results["m"].embeddings[0, 0]) == 12


def test_a_batch_waits_for_requests_still_decoding_but_a_lone_request_does_not():
    encode = RecordingEncode()
    batcher = Batcher(encode, slots=1, max_wait_ms=WAIT * 1e3)
    alone = batcher.encode(lambda: image(5), "S")  # nobody else is decoding: no wait, or this would take 30 s
    assert alone.batch_images == 1 and encode.batches == [("S", 1)]

    decoding, results = threading.Event(), {}

    def slow_load():
        assert decoding.wait(WAIT)
        return image(7)

    slow = threading.Thread(target=lambda: results.setdefault("slow", batcher.encode(slow_load, "S")))
    slow.start()
    wait_until(lambda: batcher._decoding == 1)
    quick = run_threads(batcher, [("quick", image(6), "S")], results)
    wait_until(lambda: len(batcher._gathering.get("S", [])) == 1)  # the quick one leads and waits
    decoding.set()
    for t in [slow, *quick]:
        t.join(WAIT)
    assert encode.batches[1:] == [("S", 2)]
    assert results["quick"].batch_images == 2 and float(results["slow"].embeddings[0, 0]) == 28


def test_an_encode_error_reaches_every_request_of_its_batch_and_the_next_batch_works():
    encode = RecordingEncode()
    batcher = Batcher(encode, slots=1, max_wait_ms=0)
    encode.hold.clear()
    results: dict = {}
    threads = run_threads(batcher, [("first", image(1), "S")], results)
    wait_until(lambda: encode.batches)
    encode.fail = True
    threads += run_threads(batcher, [("a", image(2), "S"), ("b", image(3), "S")], results)
    wait_until(lambda: len(batcher._gathering.get("S", [])) == 2)
    encode.hold.set()
    for t in threads:
        t.join(WAIT)
    assert all(isinstance(results[k], RuntimeError) for k in ("first", "a", "b"))
    encode.fail = False
    assert float(batcher.encode(lambda: image(4), "S").embeddings[0, 0]) == 16


def test_a_decode_error_fails_only_its_own_request():
    batcher = Batcher(RecordingEncode(), slots=1, max_wait_ms=0)

    def broken():
        raise ValueError("not an image")

    with pytest.raises(ValueError, match="not an image"):
        batcher.encode(broken, "S")
    assert batcher._decoding == 0 and batcher.encode(lambda: image(1), "S").batch_images == 1


def test_concurrent_searches_find_what_each_finds_alone(trained_dir, tmp_path):
    encoder = Encoder.load(trained_dir)
    build.build(encoder, build.DatasetSource("digits", "train", 8, 1), tmp_path)
    retriever = Retriever(tmp_path, encoder=encoder, encode_slots=1, batch_wait_ms=50)
    queries = data.load("digits", "test", 8, 1).images[:12]
    alone = [retriever.search(q[None], k=3, submodel="S")[0] for q in queries]
    together: dict = {}
    start = threading.Barrier(len(queries))

    def query(i):
        start.wait(WAIT)
        together[i] = retriever.search(queries[i][None], k=3, submodel="S")[0]

    threads = [threading.Thread(target=query, args=(i,)) for i in range(len(queries))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert max(together[i].encode_batch for i in together) > 1  # some were encoded together
    for i, single in enumerate(alone):
        assert [n["id"] for n in together[i].neighbours][:1] == [n["id"] for n in single.neighbours][:1]
        assert [n["score"] for n in together[i].neighbours] == pytest.approx([n["score"] for n in single.neighbours],
                                                                            abs=1e-4)
        assert {"decode", "queue", "encode", "search", "metadata", "total"} == set(together[i].timings_ms)
