"""Corpora, world-size-invariant sampling, and the StatefulDataLoader's exact resume."""

from __future__ import annotations

import json
import os
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
    check_data,
    dev_batches,
    load_corpus,
    stdlib_files,
)
from curry_train.token_files import TokenMeta, vocab_cache_path, write_sidecar

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
    assert "too few files" not in c.description


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
    # The fallback is said at start: the last 5% of the bytes, cut wherever that falls.
    assert "too few files for a split by file name: the last 5% of the data held out as dev" in c.description
    assert "the cut may fall inside a file" in c.description
    assert c.train.tobytes() + c.dev.tobytes() == book.read_bytes()


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
    assert "the last 10% of its tokens held out as dev (the cut may fall inside a document)" in c.description


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
        got = take(
            iter(build_train_loader(LOADER_TOKENS, loader_cfg(num_workers), slicing, 3, start_sample=step * 8)), 3
        )
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


# --- token files: the dtype, the sidecar, the vocabulary cache -------------------------------------------------

GPT2_VOCAB = 50_257


def gpt2_like_ids(n: int, vocab: int = GPT2_VOCAB, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, n)


def tokens_cfg(path: Path, dtype: str = "uint16", **kw) -> DataConfig:
    return DataConfig(name="tokens", path=str(path), token_dtype=dtype, seq_len=SEQ, **kw)


@pytest.mark.parametrize("vocab", [GPT2_VOCAB, 65, 200_019])
def test_uint32_file_read_as_uint16_is_refused_with_the_uint32_hint(tmp_path: Path, vocab: int) -> None:
    # GPT-2 ids, a character vocabulary and one past 2^16 (o200k): stored as uint32, read as uint16 each would
    # load as twice the tokens with every odd position 0 (or 1..3).
    path = tmp_path / "train.bin"
    ids = write_tokens(path, gpt2_like_ids(600_000, vocab).astype(np.uint32))
    for check in (lambda: load_corpus(tokens_cfg(path)), lambda: check_data(tokens_cfg(path), 1 << 20)):
        with pytest.raises(DataError) as err:
            check()
        message = str(err.value)
        assert str(path) in message and "read as uint16" in message
        assert "data.token_dtype=uint32" in message
    c = load_corpus(tokens_cfg(path, "uint32"))
    assert np.array_equal(np.concatenate([c.train, c.dev]), ids) and c.vocab_size == int(ids.max()) + 1


@pytest.mark.parametrize("vocab", [GPT2_VOCAB, 12])
def test_true_uint16_files_are_not_mistaken_for_uint32(tmp_path: Path, vocab: int) -> None:
    path = tmp_path / "train.bin"
    ids = write_tokens(path, gpt2_like_ids(600_000, vocab).astype(np.uint16))
    c = load_corpus(tokens_cfg(path))
    assert c.vocab_size == int(ids.max()) + 1
    check_data(tokens_cfg(path), vocab)


def test_uint16_file_read_as_uint32_is_refused_with_the_uint16_hint(tmp_path: Path) -> None:
    path = tmp_path / "train.bin"
    write_tokens(path, gpt2_like_ids(100_000).astype(np.uint16))
    with pytest.raises(DataError, match=r"read as uint32 .*likely data\.token_dtype=uint16") as err:
        load_corpus(tokens_cfg(path, "uint32"))
    assert str(path) in str(err.value)


def test_an_id_past_the_model_vocabulary_names_both_and_hints_the_dtype(tmp_path: Path) -> None:
    # Ids below 16 stored as uint16 and read as uint32 stay below 2^20, so only the model's vocabulary shows it.
    path = tmp_path / "train.bin"
    write_tokens(path, gpt2_like_ids(10_000, 16).astype(np.uint16))
    with pytest.raises(DataError, match=r"model\.vocab_size: 16 .*likely data\.token_dtype=uint16") as err:
        check_data(tokens_cfg(path, "uint32"), 16)
    assert str(path) in str(err.value)
    with pytest.raises(DataError, match=r"model\.vocab_size: 8 is smaller") as err:  # a real shortfall, no hint
        check_data(tokens_cfg(path), 8)
    assert "likely" not in str(err.value)
    check_data(tokens_cfg(path), 16)


@pytest.mark.parametrize(("dtype", "size", "hint"), [("uint16", 1001, None), ("uint32", 1002, "uint16")])
def test_a_token_file_of_odd_size_is_refused_naming_the_file(tmp_path: Path, dtype: str, size: int, hint) -> None:
    path = tmp_path / "cut.bin"
    path.write_bytes(bytes(range(256)) * 3 + bytes(size - 768))
    with pytest.raises(DataError) as err:
        load_corpus(tokens_cfg(path, dtype))
    message = str(err.value)
    assert message.startswith("data.path: ") and str(path) in message and f"{size:,} bytes" in message
    assert (f"data.token_dtype={hint}" in message) if hint else "likely" not in message


def test_empty_and_too_short_token_files_name_what_is_wrong(tmp_path: Path) -> None:
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(DataError, match=r"data\.path: .*empty\.bin.* is empty"):
        load_corpus(tokens_cfg(tmp_path / "empty.bin"))
    write_tokens(tmp_path / "train.bin", np.arange(1000, dtype=np.uint16))
    write_tokens(tmp_path / "val.bin", np.arange(SEQ, dtype=np.uint16))
    cfg = tokens_cfg(tmp_path / "train.bin", dev_path=str(tmp_path / "val.bin"))
    with pytest.raises(DataError, match=r"data\.seq_len: the dev split \(.*val\.bin\) holds 16 tokens"):
        check_data(cfg, 1000)


def test_negative_seed_is_refused_naming_the_key() -> None:
    from curry_train.compose import resolve
    from curry_train.config import ConfigError
    from tests.conftest import compose_config

    with pytest.raises(ConfigError, match=r"^train\.seed: must be >= 0, got -1$"):
        resolve(compose_config(["train.seed=-1"]))
    assert resolve(compose_config(["train.seed=0"]))[0].train.seed == 0


def test_sidecar_gives_the_vocabulary_and_must_agree_with_token_dtype(tmp_path: Path) -> None:
    path = tmp_path / "train.bin"
    ids = write_tokens(path, gpt2_like_ids(10_000, 500).astype(np.uint32))
    write_sidecar(path, TokenMeta("uint32", 1000, len(ids), "tokenizer.json"))
    c = load_corpus(tokens_cfg(path, "uint32"))
    assert c.vocab_size == 1000  # the tokenizer's vocabulary, not max id + 1
    assert "sidecar train.bin.meta.json" in c.description
    assert not vocab_cache_path(path).exists()  # nothing scanned
    with pytest.raises(DataError) as err:
        load_corpus(tokens_cfg(path, "uint16"))
    message = str(err.value)
    assert "data.token_dtype=uint16" in message and "uint32" in message and str(path) in message

    write_tokens(path, np.concatenate([ids, ids[:10]]).astype(np.uint32))  # the file changed, the sidecar did not
    with pytest.raises(DataError, match=r"holds 10,010 ids but train\.bin\.meta\.json says 10,000"):
        load_corpus(tokens_cfg(path, "uint32"))
    write_sidecar(path, TokenMeta("uint32", 400, 10_010))
    with pytest.raises(DataError, match=r"past the vocab_size 400 of its sidecar"):
        load_corpus(tokens_cfg(path, "uint32"))


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_nanogpt_meta_pkl_gives_the_vocabulary_and_runs_no_code(tmp_path: Path) -> None:
    import pickle

    path = tmp_path / "train.bin"
    write_tokens(path, gpt2_like_ids(10_000, 60).astype(np.uint16))
    chars = [chr(32 + i) for i in range(65)]
    meta = {"vocab_size": 65, "itos": dict(enumerate(chars)), "stoi": {c: i for i, c in enumerate(chars)}}
    (tmp_path / "meta.pkl").write_bytes(pickle.dumps(meta))
    c = load_corpus(tokens_cfg(path))
    assert c.vocab_size == 65 and "meta.pkl" in c.description
    (tmp_path / "meta.pkl").write_bytes(pickle.dumps({**meta, "vocab_size": 30}))  # another dataset's meta.pkl
    with pytest.raises(DataError, match=r"past the vocab_size 30 of .*meta\.pkl"):
        load_corpus(tokens_cfg(path))

    marker = tmp_path / "code-ran"
    (tmp_path / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": 65, "x": _RunsCode(marker)}))
    c = load_corpus(tokens_cfg(path))
    assert not marker.exists()  # the pickle's code was refused, not run
    assert c.vocab_size == 60 and "meta.pkl" not in c.description  # scanned instead


def test_scanned_vocabulary_is_cached_beside_the_file_keyed_by_size_and_mtime(tmp_path: Path) -> None:
    path = tmp_path / "train.bin"
    ids = write_tokens(path, gpt2_like_ids(50_000, 3000).astype(np.uint16))
    first = load_corpus(tokens_cfg(path))
    cache = vocab_cache_path(path)
    record = json.loads(cache.read_text())
    st = path.stat()
    assert record == {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "dtype": "uint16", "vocab_size": 3000}
    assert first.vocab_size == 3000 and "vocabulary 3,000 from scan" in first.description

    # The second start reads the cache, not the file: a cache saying otherwise is believed while the key holds.
    cache.write_text(json.dumps({**record, "vocab_size": 4321}))
    second = load_corpus(tokens_cfg(path))
    assert second.vocab_size == 4321 and "from cache train.bin.vocab-cache.json" in second.description

    # A changed file (new mtime, same size) invalidates it.
    write_tokens(path, (ids % 2000).astype(np.uint16))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    third = load_corpus(tokens_cfg(path))
    assert third.vocab_size == 2000
    assert json.loads(cache.read_text())["mtime_ns"] == st.st_mtime_ns + 1_000_000_000


def test_an_unwritable_cache_location_means_no_cache_not_an_error(tmp_path: Path) -> None:
    # Tests may run as root, which writes through permissions; a directory where the cache file would go makes
    # both the read and the write fail as they would in a read-only data directory.
    path = tmp_path / "train.bin"
    write_tokens(path, gpt2_like_ids(20_000, 777).astype(np.uint16))
    vocab_cache_path(path).mkdir()
    assert load_corpus(tokens_cfg(path)).vocab_size == 777
    assert load_corpus(tokens_cfg(path)).vocab_size == 777
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.bin", "train.bin.vocab-cache.json"]


# --- evaluation at the training micro-batch size -----------------------------------------------------------------


@pytest.fixture
def one_process_group():
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_eval_with_grad_accum_uses_training_micro_batches_and_gives_the_big_batch_loss(one_process_group) -> None:
    import torch.nn.functional as F

    from curry_train.config import ModelConfig
    from curry_train.distributed import materialize
    from curry_train.loop import evaluate
    from curry_train.model import build_model

    model_cfg = ModelConfig(dim=32, n_layers=2, n_heads=2, ffn_dim=64, vocab_size=1000, max_seq_len=64)
    model = build_model(model_cfg)
    materialize(model, model_cfg, torch.device("cpu"), seed=0)
    cfg, batch, n_batches = loader_cfg(0), 16, 3

    # The reference: every sampled dev window of all ranks in one forward.
    one_big = dev_batches(LOADER_TOKENS, cfg, Slicing(batch, 1, 0, 1), seed=4, n_batches=n_batches)
    inputs = torch.cat([b["input"] for b in one_big])
    targets = torch.cat([b["target"] for b in one_big])
    with torch.no_grad():
        logits = model(inputs)
        reference = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1)).item()

    for world, grad_accum in [(1, 4), (2, 4), (4, 4), (2, 1)]:
        per_rank = []
        for rank in range(world):
            slicing = Slicing(batch, world, rank, grad_accum)
            micro = dev_batches(LOADER_TOKENS, cfg, slicing, seed=4, n_batches=n_batches)
            assert len(micro) == n_batches * grad_accum
            assert all(b["input"].shape == (slicing.micro_batch, SEQ) for b in micro)  # never more than a step
            per_rank.append(evaluate(model, micro, torch.device("cpu")))  # one rank's mean; ranks then average
        got = sum(per_rank) / world
        assert abs(got - reference) <= 1e-6 * abs(reference), (world, grad_accum, got, reference)
