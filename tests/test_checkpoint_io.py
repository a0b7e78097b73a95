"""The writer's file path: O_DIRECT through a reused aligned buffer, with the checksum computed as bytes pass, and the
checksum algorithms (xxh3-64 for new checkpoints; CRC-32 and SHA-256 of older ones still read)."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from torch import nn

from curry_train.checkpoint import checksum
from curry_train.checkpoint.files import DirectFile, WriteBuffer
from curry_train.checkpoint.state import digest_algorithm, fidelity_record, param_digest

_rand = random.Random(0)  # the same pieces in the subprocess below
PIECES = [
    b"x",
    _rand.randbytes(5000),
    _rand.randbytes(3 * 8192 + 17),
    b"",
    _rand.randbytes(8192 - 1),
    _rand.randbytes(123),
    _rand.randbytes(700_001),  # several of the pieces the writer copies and checksums at a time
]


def write_pieces(path: Path, direct: bool, nbytes: int = 8192) -> DirectFile:
    f = DirectFile(path, WriteBuffer(nbytes), direct)  # a small buffer: pieces straddle and span whole buffers
    for piece in PIECES:
        assert f.write(piece) == len(piece)
        f.flush()  # DCP flushes after every item: that must not write a partial (unaligned) block
    assert f.tell() == sum(map(len, PIECES))
    f.close()
    f.close()  # DCP closes inside the stream's block, and the block closes again
    return f


@pytest.mark.parametrize("nbytes", [8192, 1 << 20], ids=["8KiB-buffer", "1MiB-buffer"])
@pytest.mark.parametrize("direct", [True, False], ids=["O_DIRECT", "buffered"])
def test_direct_file_writes_the_bytes_exactly_and_checksums_them(tmp_path: Path, direct: bool, nbytes: int) -> None:
    path = tmp_path / "__0_0.distcp"
    f = write_pieces(path, direct, nbytes)
    assert path.read_bytes() == b"".join(PIECES), "padding of the last block left in the file, or bytes lost"
    assert f.direct is direct  # the test's filesystem (the checkout's disk) accepts O_DIRECT
    assert f.digest.hexdigest() == checksum.of_file(path) == xxh3(b"".join(PIECES))


def test_direct_file_falls_back_to_the_page_cache_where_o_direct_is_refused(tmp_path: Path) -> None:
    """ramfs refuses O_DIRECT (EINVAL): mounted in a private user and mount namespace, so no root is needed."""
    if shutil.which("unshare") is None:
        pytest.fail("this test needs util-linux's unshare to mount a ramfs")
    mnt = tmp_path / "ramfs"
    mnt.mkdir()
    script = (
        "import sys; from pathlib import Path; sys.path.insert(0, sys.argv[2]); "
        "from tests.test_checkpoint_io import PIECES, write_pieces; "
        "p = Path(sys.argv[1]) / 'f.distcp'; f = write_pieces(p, True); "
        "print(f.direct, p.read_bytes() == b''.join(PIECES), f.digest.hexdigest())"
    )
    repo = str(Path(__file__).resolve().parents[1])
    out = subprocess.run(
        ["unshare", "-rm", "sh", "-c", 'mount -t ramfs ramfs "$1" && exec "$2" -c "$3" "$1" "$4"', "sh"]
        + [str(mnt), sys.executable, script, repo],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    direct, same, digest = out.stdout.split()
    assert (direct, same, digest) == ("False", "True", xxh3(b"".join(PIECES)))


def xxh3(data: bytes) -> str:
    h = checksum.running("xxh3_64")
    h.update(data)
    return h.hexdigest()


def test_checksums_stream_as_they_read_and_name_their_algorithm(tmp_path: Path) -> None:
    data = os.urandom(20 << 20)  # more than one of of_file's 8 MiB blocks
    path = tmp_path / "f"
    path.write_bytes(data)
    for algorithm in checksum.ALGORITHMS:
        h = checksum.running(algorithm)
        for i in range(0, len(data), 1 << 20):
            h.update(data[i : i + (1 << 20)])
        assert h.hexdigest() == checksum.of_file(path, algorithm)
    assert checksum.of_file(path, "crc32") == f"{zlib.crc32(data):08x}"
    assert checksum.of_file(path, "sha256_16") == hashlib.sha256(data).hexdigest()[:16]
    with pytest.raises(ValueError, match="unknown checksum algorithm 'md5'; known: xxh3_64, crc32, sha256_16"):
        checksum.running("md5")


def test_fidelity_digest_names_its_algorithm_and_older_records_are_checked_with_theirs() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    record = fidelity_record(model, torch.device("cpu"), [3, 4])
    assert record["params"].startswith("xxh3_64:") and digest_algorithm(record) == "xxh3_64"
    # A record written before the prefix: 16 hex digits of SHA-256 over each parameter's name and bytes.
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().numpy().tobytes())
    old = {"params": h.hexdigest()[:16]}
    assert digest_algorithm(old) == "sha256_16"
    assert param_digest(model, digest_algorithm(old)) == old["params"]
    with torch.no_grad():
        model[0].weight[0, 0] += 1e-6
    assert param_digest(model) != record["params"], "a changed parameter kept its digest"
