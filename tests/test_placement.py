"""Placements: a tensor's bytes where they lie on disk, cut and moved without reading the tensor
(checkpoint/placement.py, checkpoint/distcp_records.py). Each cut is checked against torch indexing of the same
tensor; the byte-moving import and export against the tensor-reading ones, file for file."""

import filecmp
import io
import os

import pytest
import torch

from megagrow.checkpoint import placement
from megagrow.checkpoint.distcp_records import DistcpFile, stored_placement
from megagrow.checkpoint.placement import Box, Placement, SourceFiles, concat


def _file_of(path, *tensors) -> list[Placement]:
    """Write the tensors' bytes one after another into `path`; their placements."""
    out, offset = [], 0
    with open(path, "wb") as f:
        for t in tensors:
            f.write(t.contiguous().view(torch.uint8).numpy().tobytes())
            out.append(Placement.stored(str(path), offset, t.shape, t.dtype))
            offset += t.numel() * t.element_size()
    return out


def _moved(p: Placement, tmp_path) -> torch.Tensor:
    """What copy_to writes, read back (at a nonzero offset, after a byte of something else)."""
    target = tmp_path / "target.bin"
    with open(target, "wb") as f:
        f.write(b"x")
    fd = os.open(target, os.O_WRONLY)
    try:
        with SourceFiles() as files:
            p.copy_to(fd, 1, files)
    finally:
        os.close(fd)
    data = bytearray(open(target, "rb").read()[1:])
    assert len(data) == p.nbytes
    return torch.frombuffer(data, dtype=p.dtype).view(p.shape)


@pytest.mark.parametrize("block", [placement.GATHER_BLOCK, 64])  # 64 bytes: many blocks, a row split across none
def test_cuts_match_torch_indexing(tmp_path, monkeypatch, block):
    monkeypatch.setattr(placement, "GATHER_BLOCK", block)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(12, 10, generator=g), torch.randn(4, 10, generator=g)
    pq, pk = _file_of(tmp_path / "qk.bin", q, k)
    rows = torch.randperm(16, generator=g)
    fused, expected = concat([pq, pk]).take_rows(rows.tolist()), torch.cat([q, k])[rows]
    assert torch.equal(_moved(fused, tmp_path), expected)
    for offsets, sizes in [((0, 0), (16, 10)), ((3, 2), (7, 5)), ((0, 5), (16, 5)), ((15, 9), (1, 1))]:
        cut = fused.crop(offsets, sizes)
        want = expected[offsets[0]:offsets[0] + sizes[0], offsets[1]:offsets[1] + sizes[1]]
        assert torch.equal(_moved(cut, tmp_path), want), (offsets, sizes)

    # A row-parallel weight as torch_dist stores it: column halves in two files, joined; cut across the seam.
    w = torch.randn(9, 8, generator=g).to(torch.bfloat16)
    (left,), (right,) = _file_of(tmp_path / "l.bin", w[:, :4]), _file_of(tmp_path / "r.bin", w[:, 4:])
    halves = Placement((9, 8), torch.bfloat16, (Box(0, 9, 0, 4, left.boxes[0].path, 0, 8),
                                                 Box(0, 9, 4, 4, right.boxes[0].path, 0, 8)))
    assert torch.equal(_moved(halves, tmp_path), w)
    assert torch.equal(_moved(halves.crop((2, 3), (5, 2)), tmp_path), w[2:7, 3:5])
    assert torch.equal(_moved(halves.take_rows([8, 0, 1]), tmp_path), w[[8, 0, 1]])

    # 1-D (biases, norms): every element a row; a fused bias interleaved like Megatron's QKV.
    b = torch.randn(12, generator=g, dtype=torch.float64)
    (pb,) = _file_of(tmp_path / "b.bin", b)
    order = [0, 1, 2, 3, 8, 9, 4, 5, 6, 7, 10, 11]
    assert torch.equal(_moved(pb.take_rows(order).crop((6,), (6,)), tmp_path), b[order][6:])


def test_archives_load_in_torch_and_are_found_again(tmp_path):
    """Archives written from memory and from a placement are what torch.load reads (as DCP's reader does, from a
    slice of the file); stored_placement finds the data of those and of torch.save's own, and refuses others."""
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(6, 5, generator=g), torch.randn(3, 7, generator=g).to(torch.bfloat16)
    (pb,) = _file_of(tmp_path / "src.bin", b)
    with SourceFiles() as files:
        out = DistcpFile(str(tmp_path), "__0_0.distcp", files)
        out.tensor("a", a, (1, 6, 5))  # a layer's chunk: stored with the leading 1
        out.tensor("b", pb, (3, 7))
        out.raw("bytes", b"raw item")
        end = out.pos
        storage = out.close()
        with open(tmp_path / "__0_0.distcp", "ab") as f:  # then torch.save's own archives, CRC and all
            torch.save(a, f)
            torch.save(a.t(), f)  # a transposed (not contiguous) tensor: not placeable
        blob, path = open(tmp_path / "__0_0.distcp", "rb").read(), str(tmp_path / "__0_0.distcp")
        for key, want in (("a", a.view(1, 6, 5)), ("b", b)):
            info = storage[key]
            assert torch.equal(torch.load(io.BytesIO(blob[info.offset:info.offset + info.length])), want)
            start = stored_placement(files, path, info.offset, info.length, want.dtype, want.numel())
            got = torch.frombuffer(bytearray(blob[start:start + want.numel() * want.element_size()]), dtype=want.dtype)
            assert torch.equal(got.view(want.shape), want)
        info = storage["bytes"]
        assert blob[info.offset:info.offset + info.length] == b"raw item"
        length = _archive_length(blob, end)
        start = stored_placement(files, path, end, length, torch.float32, 30)
        assert torch.equal(torch.frombuffer(bytearray(blob[start:start + 120]), dtype=torch.float32).view(6, 5), a)
        assert stored_placement(files, path, end + length, len(blob) - end - length, torch.float32, 30) is None
        assert stored_placement(files, str(tmp_path / "src.bin"), 0, 42, torch.float32, 10) is None


def _archive_length(blob: bytes, start: int) -> int:
    """Length of the zip archive starting at `start`: up to the end of its end-of-central-directory record."""
    end = blob.index(b"PK\x05\x06", start)
    return end + 22 - start


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    pytest.importorskip("transformers")
    from test_hf import make_hf
    return make_hf("qwen2", tmp_path_factory.mktemp("hf") / "qwen2")  # QKV biases: 1-D rows interleaved


def test_byte_moving_import_and_export_match_reading(qwen2, tmp_path, monkeypatch):
    """Import at TP=2 PP=2 and export back, with placements (the sources' tensors never read) and without (read,
    then written): the same tensors in the checkpoints, byte-identical safetensors files."""
    from test_megatron_lm import assert_same_tensors
    from megagrow.checkpoint.convert import convert
    from megagrow.checkpoint.dcp_stream import TorchDistView
    from megagrow.checkpoint.export import export
    from megagrow.checkpoint.hf_stream import HFView
    from megagrow.checkpoint.view import CheckpointView

    def unread(self, *a):
        raise AssertionError("read although its tensors are placed")

    with monkeypatch.context() as m:  # (the import reads the globals: the vocabulary is padded for TP=2)
        for view in (HFView, TorchDistView):
            m.setattr(view, "read_layer", unread)
        m.setattr(TorchDistView, "read_globals", unread)
        convert(str(qwen2), str(tmp_path / "placed"), 2, 2, progress=False)
        export(str(tmp_path / "placed"), str(tmp_path / "placed_hf"), max_shard_size="100KB", progress=False)
    with monkeypatch.context() as m:
        for view in (HFView, TorchDistView):
            m.setattr(view, "placements", CheckpointView.placements)
        convert(str(qwen2), str(tmp_path / "read"), 2, 2, progress=False)
        export(str(tmp_path / "read"), str(tmp_path / "read_hf"), max_shard_size="100KB", progress=False)
    assert_same_tensors(tmp_path / "placed", tmp_path / "read", with_optimizer=False)
    names = sorted(n for n in os.listdir(tmp_path / "read_hf") if n.endswith((".safetensors", ".json")))
    assert names == sorted(n for n in os.listdir(tmp_path / "placed_hf") if n.endswith((".safetensors", ".json")))
    match, mismatch, errors = filecmp.cmpfiles(tmp_path / "read_hf", tmp_path / "placed_hf", names, shallow=False)
    assert not mismatch and not errors and len(match) > 3


@pytest.mark.parametrize("name", ["torch_dist_tp2", "distopt_dp2", "distopt_dp2_fully_reshardable"])
def test_megatron_lm_chunks_are_placed(name, tmp_path):
    """The chunks Megatron-LM's own pretrain_gpt.py wrote are found where they lie: every model tensor's placed
    bytes are the tensor DCP's reader reads (the files are only read)."""
    from test_megatron_lm import MEGATRON_LM
    from megagrow.checkpoint.io import open_checkpoint
    from megagrow.model.shape import expected_shapes
    if not os.path.isdir(os.path.join(MEGATRON_LM, name)):
        pytest.skip(f"Megatron-LM fixtures not found at {MEGATRON_LM}")
    view = open_checkpoint(os.path.join(MEGATRON_LM, name))
    try:
        glob, layer = expected_shapes(view.args)
        for index, names in [(None, glob), (0, layer), (view.num_layers - 1, layer)]:
            placed = view.placements(index)
            read = (view.read_globals() if index is None else view.read_layer(index))["model"]
            assert sorted(placed) == sorted(names)
            for key, p in placed.items():
                assert torch.equal(_moved(p, tmp_path), read[key]), (index, key)
    finally:
        view.close()
