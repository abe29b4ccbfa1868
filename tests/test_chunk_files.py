"""Whole chunks written as files (`chunks.whole_chunk_files`) are byte for byte what zarr writes."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec

from dyfcli.chunks import checksum_codecs, whole_chunk_files


def _twins(tmp_path, shape, chunks, dtype, compressors, **extra):
    return [zarr.create_array(store=str(tmp_path / f"{name}.zarr"), shape=shape, chunks=chunks, dtype=dtype,
                              compressors=compressors, fill_value=0, **extra) for name in ("zarr", "files")]


def _chunk_bytes(array, key: str) -> bytes:
    path = array.store.root / array.path / "c" / key
    return path.read_bytes() if path.exists() else b""


@pytest.mark.parametrize("dtype,compressed", [("float32", True), ("float32", False), ("bool", True)])
def test_whole_chunk_files_equal_zarr_bytes(tmp_path, dtype, compressed):
    shape, chunks = (2, 3, 4, 5), (1, 1, 4, 5)
    by_zarr, by_files = _twins(tmp_path, shape, chunks, dtype, checksum_codecs(compressed))
    rng = np.random.default_rng(0)
    values = (rng.standard_normal((4, 5)) > 0) if dtype == "bool" else rng.standard_normal((4, 5)).astype(dtype)
    by_zarr[1, 2] = values
    files = whole_chunk_files(by_files)
    assert files is not None
    files.write((1, 2, 0, 0), values[None, None])
    assert _chunk_bytes(by_files, "1/2/0/0") == _chunk_bytes(by_zarr, "1/2/0/0") != b""
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "files.zarr"))[1, 2], values)


def test_whole_chunk_files_refuse_other_layouts(tmp_path):
    shape, chunks = (2, 4), (1, 4)
    blosc, _ = _twins(tmp_path, shape, chunks, "float32", [BloscCodec(), Crc32cCodec()])
    assert whole_chunk_files(blosc) is None
    unchecked = zarr.create_array(store=str(tmp_path / "plain.zarr"), shape=shape, chunks=chunks, dtype="float32",
                                  compressors=None)
    assert whole_chunk_files(unchecked) is None
    big = zarr.create_array(store=str(tmp_path / "big.zarr"), shape=shape, chunks=chunks, dtype="float32",
                            serializer=BytesCodec(endian="big"), compressors=[Crc32cCodec()])
    assert whole_chunk_files(big) is None
    sharded = zarr.create_array(store=str(tmp_path / "shard.zarr"), shape=shape, chunks=(1, 2), shards=(1, 4),
                                dtype="float32", compressors=[Crc32cCodec()])
    assert isinstance(sharded.metadata.codecs[0], ShardingCodec) and whole_chunk_files(sharded) is None
    files = whole_chunk_files(zarr.create_array(store=str(tmp_path / "ok.zarr"), shape=shape, chunks=chunks,
                                                dtype="float32", compressors=checksum_codecs()))
    with pytest.raises(ValueError, match="whole chunk"):
        files.write((0, 0), np.zeros((1, 2), dtype=np.float32))

