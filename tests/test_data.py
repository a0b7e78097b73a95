"""Corpora, world-size-invariant sampling, and the StatefulDataLoader's exact resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from curry_train.config import DataConfig, DataError
from curry_train.data import (
    Slicing,
    WindowDataset,
    _is_dev,
    build_train_loader,
    dev_batches,
    load_corpus,
    stdlib_files,
)

# --- Slicing: the global batch of a step does not depend on the world size ------------------------------------


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("grad_accum", [1, 2])
def test_slicing_partitions_each_global_batch_exactly(world: int, grad_accum: int) -> None:
    batch = 8
    for step in (0, 1, 7):
        taken: list[int] = []
        for rank in range(world):
            s = Slicing(batch, world, rank, grad_accum)
            assert s.micro_batch == batch // (world * grad_accum)
            for micro in range(grad_accum):
                ids = s.indices(step, micro)
                assert len(ids) == s.micro_batch
                taken.extend(ids)
        assert len(taken) == len(set(taken)) == batch  # disjoint
        assert set(taken) == set(range(step * batch, step * batch + batch))


def test_slicing_rank_order_concatenates_to_the_single_rank_batch() -> None:
    # Rank r's micro-batches, in order, are the r-th contiguous slice of the one-rank batch.
    one = Slicing(8, 1, 0, 1).indices(3, 0)
    four = [i for r in range(4) for m in range(2) for i in Slicing(8, 4, r, 2).indices(3, m)]
    assert four == one


# --- WindowDataset ---------------------------------------------------------------------------------------------

TOKENS = np.arange(1000, dtype=np.uint16)  # token value == its position: a sample shows where it came from
SEQ = 16
WINDOWS = (len(TOKENS) - 1) // SEQ


def test_window_dataset_samples_are_shifted_contiguous_windows() -> None:
    ds = WindowDataset(TOKENS, SEQ, seed=0)
    assert len(ds) == WINDOWS
    for i in (0, 1, 5, WINDOWS - 1, WINDOWS, 3 * WINDOWS + 2):
        item = ds[i]
        x, y = item["input"], item["target"]
        assert x.dtype == y.dtype == torch.int64
        assert x.shape == y.shape == (SEQ,)
        start = int(x[0])
        assert start % SEQ == 0 and start + SEQ + 1 <= len(TOKENS)  # a whole, non-overlapping window
        assert torch.equal(x, torch.arange(start, start + SEQ))
        assert torch.equal(y, x + 1)
        assert int(item["index"]) == i


def test_window_dataset_same_index_same_sample_in_any_order_and_instance() -> None:
    a = WindowDataset(TOKENS, SEQ, seed=5)
    order = [3, 200, 3, 0, 7 * WINDOWS + 1, 200, 61]
    first = [a[i]["input"] for i in order]
    b = WindowDataset(TOKENS, SEQ, seed=5)
    for i, x in zip(reversed(order), reversed(first), strict=True):
        assert torch.equal(b[i]["input"], x)
        assert torch.equal(a[i]["input"], x)


def test_window_dataset_each_epoch_is_a_permutation_of_all_windows() -> None:
    ds = WindowDataset(TOKENS, SEQ, seed=1)
    orders = []
    for epoch in range(3):
        starts = [int(ds[epoch * WINDOWS + p]["input"][0]) // SEQ for p in range(WINDOWS)]
        assert sorted(starts) == list(range(WINDOWS))  # every window once, none repeated
        orders.append(starts)
    assert orders[0] != list(range(WINDOWS))  # shuffled
    assert orders[0] != orders[1] != orders[2]  # reshuffled each epoch


def test_window_dataset_seed_changes_the_order() -> None:
    a, b = WindowDataset(TOKENS, SEQ, seed=1), WindowDataset(TOKENS, SEQ, seed=2)
    assert [int(a[i]["input"][0]) for i in range(WINDOWS)] != [int(b[i]["input"][0]) for i in range(WINDOWS)]


def test_window_dataset_too_short_corpus_is_an_error() -> None:
    with pytest.raises(ValueError, match="seq_len"):
        WindowDataset(np.arange(SEQ, dtype=np.uint16), SEQ, seed=0)


# --- the stdlib corpus ---------------------------------------------------------------------------------------

MAX_BYTES = 2_000_000


@pytest.fixture(scope="module")
def stdlib_corpus():
    return load_corpus(DataConfig(max_bytes=MAX_BYTES))


def test_stdlib_corpus_is_deterministic_and_has_both_splits(stdlib_corpus) -> None:
    c = stdlib_corpus
    assert c.vocab_size == 256
    assert c.train.dtype == c.dev.dtype == np.uint8
    assert len(c.train) > 0 and len(c.dev) > 0
    assert len(c.dev) < len(c.train)
    # max_bytes bounds the file bytes read (the splits add only "\n\n" separators).
    assert MAX_BYTES <= len(c.train) + len(c.dev) < MAX_BYTES * 1.05
    again = load_corpus(DataConfig(max_bytes=MAX_BYTES))
    assert np.array_equal(again.train, c.train) and np.array_equal(again.dev, c.dev)


def test_stdlib_dev_is_roughly_dev_fraction_of_files() -> None:
    files = stdlib_files()
    assert len(files) > 100
    share = sum(_is_dev(rel, 0.05) for rel, _ in files) / len(files)
    assert 0.02 < share < 0.1
    share = sum(_is_dev(rel, 0.3) for rel, _ in files) / len(files)
    assert 0.2 < share < 0.4


def test_stdlib_split_is_by_file_name_hash(stdlib_corpus) -> None:
    train, dev = stdlib_corpus.train.tobytes(), stdlib_corpus.dev.tobytes()
    total, checked = 0, {True: 0, False: 0}
    for rel, path in stdlib_files():
        data = path.read_bytes()
        if total + len(data) > MAX_BYTES:
            break
        total += len(data)
        if len(data) < 2000:  # short files could occur inside others by chance
            continue
        in_dev = _is_dev(rel, 0.05)
        home, other = (dev, train) if in_dev else (train, dev)
        assert data in home, f"{rel} is not whole in its split"
        assert data not in other, f"{rel} is in both splits"
        checked[in_dev] += 1
    assert checked[True] >= 1 and checked[False] >= 10


# --- data=text ---------------------------------------------------------------------------------------------------


def write_text_folder(root: Path, n: int) -> dict[str, bytes]:
    contents = {}
    for i in range(n):
        rel = f"doc_{i:02d}.txt" if i % 3 else f"sub/page_{i:02d}.md"
        data = f"file {i}: marker-{i:03d}-{'x' * i}\n".encode() * 5
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
        contents[rel] = data
    return contents


def test_text_folder_is_split_by_file_name_hash(tmp_path: Path) -> None:
    contents = write_text_folder(tmp_path, 30)
    (tmp_path / "image.bin").write_bytes(b"NOT-TEXT-SUFFIX")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "secret.txt").write_bytes(b"HIDDEN-DIRECTORY")
    cfg = DataConfig(name="text", path=str(tmp_path), dev_fraction=0.3)
    c = load_corpus(cfg)
    train, dev = c.train.tobytes(), c.dev.tobytes()
    assert c.vocab_size == 256
    assert any(_is_dev(rel, 0.3) for rel in contents) and not all(_is_dev(rel, 0.3) for rel in contents)
    for rel, data in contents.items():
        home, other = (dev, train) if _is_dev(rel, 0.3) else (train, dev)
        assert data in home and data not in other, rel
    for junk in (b"NOT-TEXT-SUFFIX", b"HIDDEN-DIRECTORY"):
        assert junk not in train and junk not in dev
    assert np.array_equal(load_corpus(cfg).train, c.train)


def test_text_adding_a_file_moves_no_other_file_between_splits(tmp_path: Path) -> None:
    contents = write_text_folder(tmp_path, 20)
    cfg = DataConfig(name="text", path=str(tmp_path), dev_fraction=0.3)
    before = load_corpus(cfg)
    (tmp_path / "aaa_new.txt").write_bytes(b"a new file sorted first\n")
    after = load_corpus(cfg)
    for data in contents.values():
        assert (data in before.dev.tobytes()) == (data in after.dev.tobytes())
        assert (data in before.train.tobytes()) == (data in after.train.tobytes())


def test_text_comma_separated_paths(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    one = write_text_folder(tmp_path / "a", 10)
    single = tmp_path / "single.txt"
    single.write_bytes(b"THE-SINGLE-FILE\n")
    c = load_corpus(DataConfig(name="text", path=f"{tmp_path / 'a'}, {single}", dev_fraction=0.3))
    everything = c.train.tobytes() + c.dev.tobytes()
    assert b"THE-SINGLE-FILE" in everything
    assert all(data in everything for data in one.values())


def test_text_single_file_gives_train_and_dev(tmp_path: Path) -> None:
    book = tmp_path / "book.txt"
    book.write_bytes(b"It was a dark and stormy night. " * 2000)
    c = load_corpus(DataConfig(name="text", path=str(book), seq_len=64))
    assert len(c.train) > 64 and len(c.dev) > 64


def test_text_missing_path_names_data_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data\.path"):
        load_corpus(DataConfig(name="text", path=str(tmp_path / "nowhere")))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.bin").write_bytes(b"\0")
    with pytest.raises(DataError, match=r"data\.path"):
        load_corpus(DataConfig(name="text", path=str(tmp_path / "empty")))


# --- data=tokens ---------------------------------------------------------------------------------------------


def write_tokens(path: Path, values: np.ndarray) -> np.ndarray:
    values.tofile(path)  # nanoGPT's format: raw little-endian ids, no header
    return values


def test_tokens_file_is_memory_mapped_with_tail_held_out(tmp_path: Path) -> None:
    ids = write_tokens(tmp_path / "train.bin", (np.arange(5000) * 7 % 3000).astype(np.uint16))
    c = load_corpus(DataConfig(name="tokens", path=str(tmp_path / "train.bin"), dev_fraction=0.1))
    assert isinstance(c.train, np.memmap) and isinstance(c.dev, np.memmap)
    assert c.train.dtype == np.uint16
    assert len(c.train) == 4500 and len(c.dev) == 500
    assert np.array_equal(np.concatenate([c.train, c.dev]), ids)  # dev is the tail, nothing lost or repeated
    assert c.vocab_size == int(ids.max()) + 1


def test_tokens_with_dev_path_and_uint32(tmp_path: Path) -> None:
    train = write_tokens(tmp_path / "train.bin", np.arange(70_000, 72_000, dtype=np.uint32))
    dev = write_tokens(tmp_path / "val.bin", np.arange(100, 400, dtype=np.uint32))
    cfg = DataConfig(
        name="tokens", path=str(tmp_path / "train.bin"), dev_path=str(tmp_path / "val.bin"), token_dtype="uint32"
    )
    c = load_corpus(cfg)
    assert isinstance(c.train, np.memmap) and isinstance(c.dev, np.memmap)
    assert np.array_equal(c.train, train) and np.array_equal(c.dev, dev)
    assert c.vocab_size == 72_000
    # A memory-mapped corpus feeds the dataset like an in-memory one.
    item = WindowDataset(c.train, 8, seed=0)[0]
    assert torch.equal(item["target"], item["input"] + 1)


def test_tokens_missing_file_names_data_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data\.path"):
        load_corpus(DataConfig(name="tokens", path=str(tmp_path / "missing.bin")))


def test_tokens_missing_dev_file_names_data_dev_path(tmp_path: Path) -> None:
    write_tokens(tmp_path / "train.bin", np.arange(100, dtype=np.uint16))
    cfg = DataConfig(name="tokens", path=str(tmp_path / "train.bin"), dev_path=str(tmp_path / "missing.bin"))
    with pytest.raises(DataError, match=r"data\.dev_path"):
        load_corpus(cfg)


# --- the StatefulDataLoader ----------------------------------------------------------------------------------

LOADER_TOKENS = np.arange(20_000, dtype=np.uint16) % 997


def loader_cfg(num_workers: int) -> DataConfig:
    return DataConfig(seq_len=SEQ, num_workers=num_workers)


def take(it, n: int) -> list[dict]:
    return [next(it) for _ in range(n)]


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x["index"], y["index"])
        assert torch.equal(x["input"], y["input"])
        assert torch.equal(x["target"], y["target"])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_resumes_exactly_from_its_state_dict(num_workers: int) -> None:
    slicing = Slicing(batch_size=8, world_size=2, rank=1, grad_accum=2)
    cfg = loader_cfg(num_workers)
    loader = build_train_loader(LOADER_TOKENS, cfg, slicing, seed=11)
    it = iter(loader)
    first = take(it, 3)  # mid-step: the 2nd micro-batch of step 1 comes next
    state = loader.state_dict()
    rest = take(it, 5)
    expected = [slicing.indices(s, m) for s in range(4) for m in range(2)]
    assert [b["index"].tolist() for b in first + rest] == expected

    resumed = build_train_loader(LOADER_TOKENS, cfg, slicing, seed=11)
    resumed.load_state_dict(state)
    assert_same_batches(take(iter(resumed), 5), rest)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_start_step_resumes_on_another_world_size(num_workers: int) -> None:
    # The world-size-change path: a run of one rank resumed on two ranks from the step alone sees the same samples.
    step = 5
    one = build_train_loader(LOADER_TOKENS, loader_cfg(0), Slicing(8, 1, 0, 1), seed=3)
    reference = take(iter(one), step + 1)[-1]
    parts = []
    for rank in range(2):
        slicing = Slicing(8, 2, rank, 2)
        got = take(iter(build_train_loader(LOADER_TOKENS, loader_cfg(num_workers), slicing, 3, start_step=step)), 3)
        assert [b["index"].tolist() for b in got] == [
            slicing.indices(step, 0),
            slicing.indices(step, 1),
            slicing.indices(step + 1, 0),
        ]
        parts.extend(got[:2])
    assert torch.equal(torch.cat([p["index"] for p in parts]), reference["index"])
    assert torch.equal(torch.cat([p["input"] for p in parts]), reference["input"])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_creating_a_loader_iterator_does_not_consume_the_global_rng(num_workers: int) -> None:
    loader = build_train_loader(LOADER_TOKENS, loader_cfg(num_workers), Slicing(8, 1, 0, 1), seed=0)
    torch.manual_seed(0)
    a = torch.rand(1)
    torch.manual_seed(0)
    it = iter(loader)
    b = torch.rand(1)
    assert torch.equal(a, b)
    next(it)  # and the iterator works
    del it


def test_dev_batches_are_fixed_and_sliced_by_rank() -> None:
    cfg = loader_cfg(0)
    whole = dev_batches(LOADER_TOKENS, cfg, Slicing(8, 1, 0, 1), seed=2, n_batches=3)
    again = dev_batches(LOADER_TOKENS, cfg, Slicing(8, 1, 0, 1), seed=2, n_batches=3)
    assert_same_batches(whole, again)
    halves = [dev_batches(LOADER_TOKENS, cfg, Slicing(8, 2, r, 1), seed=2, n_batches=3) for r in range(2)]
    for b in range(3):
        assert whole[b]["input"].shape == (8, SEQ)
        assert torch.equal(torch.cat([halves[0][b]["input"], halves[1][b]["input"]]), whole[b]["input"])
