"""The disk reader (runtime/disk.py): byte-exact reads of any range, direct where the filesystem
allows it, buffered (and dropped from the page cache) elsewhere; a truncated or unreadable file is
an error naming it."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hscompile.errors import CheckpointError
from hscompile.runtime.disk import ALIGN, DiskReader, directory_read_bandwidth, read_bandwidth


@pytest.fixture
def data_file(tmp_path: Path) -> tuple[Path, bytes]:
    data = random.Random(3).randbytes(5 * ALIGN + 123)
    path = tmp_path / "weights.bin"
    path.write_bytes(data)
    return path, data


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "buffered"])
def test_any_range_reads_exactly_its_bytes(data_file, direct):
    path, data = data_file
    ranges = [(0, len(data)), (0, 1), (1, ALIGN), (ALIGN - 1, 2), (3 * ALIGN, ALIGN), (len(data) - 7, 7), (17, 0),
              (2 * ALIGN + 5, 2 * ALIGN + 100)]
    with DiskReader(path, direct=direct) as reader:
        assert direct or not reader.direct  # direct only when asked, and where the filesystem takes it (ext4 does)
        for offset, nbytes in ranges:
            buffer = DiskReader.buffer(nbytes)
            got = reader.read(offset, nbytes, buffer)
            assert got.numel() == nbytes and bytes(got.numpy()) == data[offset:offset + nbytes], (offset, nbytes)
            assert got.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr(), "a view, not a copy"


def test_a_safetensors_tensor_read_by_its_header_offsets_equals_the_stored_one(tmp_path):
    tensors = {"model.layers.0.mlp.weight": torch.randn(33, 65, dtype=torch.bfloat16),
               "model.norm.weight": torch.randn(65)}
    path = tmp_path / "model.safetensors"
    save_file(tensors, path)
    with path.open("rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(length))
    with DiskReader(path) as reader:
        for name, tensor in tensors.items():
            begin, end = header[name]["data_offsets"]
            raw = reader.read(8 + length + begin, end - begin, DiskReader.buffer(end - begin))
            assert torch.equal(raw.view(tensor.dtype).view(tensor.shape), tensor), name


def test_a_truncated_file_is_an_error_naming_it(data_file):
    path, _ = data_file
    with DiskReader(path) as reader:
        os.truncate(path, 2 * ALIGN)  # changed under a running reader
        with pytest.raises(CheckpointError, match=f"{path} ends before byte {4 * ALIGN}"):
            reader.read(3 * ALIGN, ALIGN, DiskReader.buffer(ALIGN))
    with DiskReader(path) as reader, pytest.raises(CheckpointError, match=f"{path} ends at byte {2 * ALIGN}"):
        reader.read(ALIGN, 2 * ALIGN, DiskReader.buffer(2 * ALIGN))


def test_a_missing_file_is_an_error_naming_it(tmp_path):
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'gone.safetensors'} cannot be read"):
        DiskReader(tmp_path / "gone.safetensors")


def test_a_buffer_without_the_alignment_slack_is_refused(data_file):
    path, _ = data_file
    with DiskReader(path) as reader, pytest.raises(ValueError, match=r"allocate it with DiskReader.buffer\(4096\)"):
        reader.read(1, ALIGN, torch.empty(ALIGN, dtype=torch.uint8))


def test_where_direct_reads_are_refused_reads_go_through_the_page_cache_and_leave_it(data_file, monkeypatch):
    # A filesystem that refuses O_DIRECT (some tmpfs and network filesystems; this machine's take it).
    path, data = data_file
    monkeypatch.setattr(DiskReader, "_probe", lambda self: False)
    dropped = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, offset, length, advice: dropped.append((offset, length, advice)))
    with DiskReader(path) as reader:
        assert not reader.direct
        assert bytes(reader.read(300, 10, DiskReader.buffer(10)).numpy()) == data[300:310]
    assert dropped == [(300, 10, os.POSIX_FADV_DONTNEED)], "what was read is dropped from the page cache"


def test_the_read_bandwidth_is_measured_as_the_reader_reads(data_file):
    path, data = data_file
    rate, direct = read_bandwidth(path)
    assert rate > 0 and direct == DiskReader(path).direct
    assert read_bandwidth(path, nbytes=len(data) // 2, direct=False)[1] is False


def test_a_directory_is_measured_by_its_largest_file_or_a_probe_written_there(tmp_path, monkeypatch):
    read = []
    original = read_bandwidth

    def recording(path, **kwargs):
        read.append(Path(path).name)
        return original(path, **kwargs)

    monkeypatch.setattr("hscompile.runtime.disk.read_bandwidth", recording)
    assert directory_read_bandwidth(tmp_path, nbytes=4 * ALIGN) > 0
    assert read[-1].startswith(".hscompile-disk-probe-") and list(tmp_path.iterdir()) == [], "the probe is removed"
    (tmp_path / "model.safetensors").write_bytes(bytes(8 * ALIGN))
    assert directory_read_bandwidth(tmp_path, nbytes=4 * ALIGN) > 0
    assert read[-1] == "model.safetensors" and len(list(tmp_path.iterdir())) == 1
    with pytest.raises(ValueError, match="is not a directory"):
        directory_read_bandwidth(tmp_path / "model.safetensors")


# -- the disk tier: staging slots read ahead in streaming order ---------------------------------


@pytest.mark.parametrize("threaded", [True, False], ids=["reader thread", "caller's thread"])
def test_the_disk_tier_reads_ahead_in_order_and_starts_over_when_asked_out_of_order(tmp_path, threaded):
    from hscompile.ir.layout import Extent, disk_extents
    from hscompile.runtime.device import CpuDevice
    from hscompile.runtime.disk import DiskTier

    data = random.Random(5).randbytes(600_000)
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    # Layer g: two pieces 1000 bytes apart (merged into one read) at an unaligned offset.
    extents = {g: disk_extents([(str(path), g * 100_000 + 7, 20_000), (str(path), g * 100_000 + 21_007, 30_000)])
               for g in range(5)}
    assert extents[2] == (Extent(str(path), 200_007, 51_000),)
    backend = CpuDevice()
    backend.host_threads = threaded
    tier = DiskTier(extents, backend, slots=3)

    def check(slot, group):
        assert slot.group == group
        got = slot.at(str(path), group * 100_000 + 21_007, 30_000)
        assert bytes(got.numpy()) == data[group * 100_000 + 21_007:group * 100_000 + 51_007]

    slot = tier.get(0, [1, 2, 3], backend)
    check(slot, 0)
    assert [s.group for s in tier._queue] == [1, 2]  # the third slot is the one handed over
    tier.copied(slot, None, [1, 2, 3])
    assert [s.group for s in tier._queue] == [1, 2, 3]
    slot = tier.get(1, [2, 3, 4], backend)
    check(slot, 1)
    tier.copied(slot, None, [2, 3, 4])
    slot = tier.get(4, [0], backend)  # out of order: the reads of 2 and 3 are dropped; 4 was read ahead
    check(slot, 4)
    tier.copied(slot, None, [0])
    check(tier.get(0, [], backend), 0)
    assert tier.reads == 6 and tier.read_bytes == 6 * 51_000  # 0, 1, 2, 3, 4 and 0 again: 2 and 3 wasted
    assert tier.host_bytes == 3 * tier.slot_bytes


def test_a_failed_read_of_the_disk_tier_names_the_file_and_frees_its_slot(tmp_path):
    from hscompile.ir.layout import Extent
    from hscompile.runtime.device import CpuDevice
    from hscompile.runtime.disk import DiskTier

    path = tmp_path / "model.safetensors"
    path.write_bytes(bytes(300_000))
    backend = CpuDevice()
    tier = DiskTier({g: (Extent(str(path), g * 100_000, 100_000),) for g in range(3)}, backend, slots=2)
    tier.copied(tier.get(0, [], backend), None)
    os.truncate(path, 150_000)
    for _ in range(3):  # the slot comes back each time: no "no free staging slot"
        with pytest.raises(CheckpointError, match=f"{path} ends before byte 300000: the file is truncated or changed"):
            tier.get(2, [], backend)
    # What the file still holds is refused too: it was written to since the tier opened it.
    for _ in range(3):
        with pytest.raises(CheckpointError, match=f"{path} was written to after hscompile opened it"):
            tier.get(0, [], backend)


def test_a_tier_reads_a_file_replaced_by_a_new_one_as_it_was_opened(tmp_path):
    # A checkpoint saved again (a new file renamed over the old) leaves the open one as it was.
    from hscompile.ir.layout import Extent
    from hscompile.runtime.device import CpuDevice
    from hscompile.runtime.disk import DiskTier

    path = tmp_path / "model.safetensors"
    path.write_bytes(bytes(range(256)) * 1000)
    backend = CpuDevice()
    tier = DiskTier({0: (Extent(str(path), 0, 100_000),)}, backend, slots=1)
    tier.copied(tier.get(0, [], backend), None)
    replacement = tmp_path / "new"
    replacement.write_bytes(bytes(256_000))
    os.replace(replacement, path)
    slot = tier.get(0, [], backend)
    assert bytes(slot.at(str(path), 0, 100_000).numpy()) == (bytes(range(256)) * 1000)[:100_000]
