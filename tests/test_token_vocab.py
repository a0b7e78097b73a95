"""Token data that cannot be tokens, and the vocabulary a token file declares: text given as `data=tokens` is
refused naming `data=text` and `curry-train prepare`; a sidecar (or nanoGPT's meta.pkl) sets `model.vocab_size`
unless the command line set it, and a value set there that is too small is refused."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from curry_train.cli import compose_config
from curry_train.compose import compose, resolve
from curry_train.config import DataError
from curry_train.data import check_data, load_corpus
from curry_train.token_files import TokenMeta, adopt_data_vocab, text_excerpt, write_sidecar

TEXT = "The quick brown fox jumps over the lazy dog. Ünïcödé is text too: 日本語.\n" * 400


def _tokens(path: Path, vocab: int, sidecar: bool = True) -> Path:
    ids = np.random.default_rng(0).integers(0, vocab, 20_000).astype(np.uint16)
    ids.tofile(path)
    if sidecar:
        write_sidecar(path, TokenMeta("uint16", vocab, len(ids)))
    return path


def _launch(*overrides: str):
    args = ["logger.wandb.mode=disabled", "data=tokens", "data.seq_len=64", *overrides]
    return adopt_data_vocab(*resolve(compose(args), args))


def test_a_text_file_given_as_tokens_is_refused_naming_data_text_and_prepare(tmp_path: Path) -> None:
    path = tmp_path / "book.txt"
    path.write_text(TEXT, encoding="utf-8")
    cfg, _ = _launch(f"data.path={path}")
    with pytest.raises(DataError) as err:
        check_data(cfg.data, 1 << 16)
    message = str(err.value)
    assert message.startswith(f"data.path: {path} is text, not token ids (it reads 'The quick brown fox")
    assert f"data=text data.path={path}" in message and f"`curry-train prepare {path} --out DIR`" in message
    with pytest.raises(DataError, match="is text, not token ids"):
        load_corpus(cfg.data)
    # Token ids never read as text: small ids hold zero bytes, large ones byte pairs that are not UTF-8.
    for vocab in (256, 50_257):
        assert text_excerpt(_tokens(tmp_path / f"ids{vocab}.bin", vocab, sidecar=False)) is None


def test_a_sidecar_sets_the_vocabulary_over_the_preset_and_says_so(tmp_path: Path) -> None:
    path = _tokens(tmp_path / "train.bin", 300)
    cfg, launch = _launch(f"data.path={path}")
    assert cfg.model.vocab_size == 300
    assert launch.notes == (
        "model.vocab_size=300 from train.bin.meta.json, the token files' own (model=tiny says 256; "
        "model.vocab_size=N on the command line sets another)",
    )
    check_data(cfg.data, cfg.model.vocab_size)
    # A preset larger than the data's vocabulary yields too: the model must match the tokenizer.
    cfg, _ = _launch(f"data.path={path}", "model=small")
    assert cfg.model.vocab_size == 300
    # `curry-train plan` counts the model training will build.
    assert compose_config(["data=tokens", f"data.path={path}"])[0].model.vocab_size == 300


def test_a_vocabulary_given_on_the_command_line_wins_and_too_small_is_refused(tmp_path: Path) -> None:
    path = _tokens(tmp_path / "train.bin", 300)
    cfg, launch = _launch(f"data.path={path}", "model.vocab_size=512")
    assert cfg.model.vocab_size == 512 and launch.notes == ()
    cfg, _ = _launch(f"data.path={path}", "model.vocab_size=256")
    assert cfg.model.vocab_size == 256
    with pytest.raises(
        DataError,
        match=r"^model\.vocab_size: 256 is smaller than the vocabulary of token file .*"
        r"\(300, from sidecar train\.bin\.meta\.json\)",
    ):
        check_data(cfg.data, cfg.model.vocab_size)


def test_nanogpt_meta_pkl_sets_the_vocabulary(tmp_path: Path) -> None:
    path = _tokens(tmp_path / "train.bin", 65, sidecar=False)
    (tmp_path / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": 65, "itos": {0: "a"}, "stoi": {"a": 0}}))
    cfg, launch = _launch(f"data.path={path}")
    assert cfg.model.vocab_size == 65 and launch.notes[0].startswith("model.vocab_size=65 from meta.pkl")
    # Without a sidecar or meta.pkl the largest id is only a floor: the preset stays.
    (tmp_path / "meta.pkl").unlink()
    cfg, launch = _launch(f"data.path={path}")
    assert cfg.model.vocab_size == 256 and launch.notes == ()
