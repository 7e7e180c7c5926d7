"""Pack/unpack of each quantized format: the engine's code (atom_stream.layers.quant) against the
test writers' independent code (tests/quant_writers.py), both ways, exactly; plus known answers
written by hand from model_spec §4 (nibble order, offsets, two's complement, e8m0)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from atom_stream.layers.quant.fp8_block import dequantize_fp8_block
from atom_stream.layers.quant.int4_pack import dequantize_int4, pack_int4, unpack_int4
from atom_stream.layers.quant.mxfp4 import (
    dequantize_mxfp4, mxfp4_qdq, quantize_mxfp4, unpack_fp4,
)
from atom_stream.layers.quant.w4a8 import dequantize_w4a8, pack_int4_reorder, unpack_int4_reorder
import quant_writers as qw

SEEDS = st.integers(0, 2**31 - 1)
ROWS = st.integers(1, 5)
WORDS = st.integers(1, 4)


def rand_q(seed, rows, words):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-8, 8, (rows, 8 * words), generator=g)


@settings(max_examples=30, deadline=None)
@given(SEEDS, ROWS, WORDS)
def test_int4_compressed_tensors_roundtrip(seed, rows, words):
    q = rand_q(seed, rows, words)
    assert torch.equal(unpack_int4(qw.ct_pack(q)).long(), q)
    assert torch.equal(qw.ct_unpack(pack_int4(q)), q)
    assert torch.equal(pack_int4(q), qw.ct_pack(q))


def test_int4_compressed_tensors_known_answer():
    q = torch.tensor([[-8, -7, -6, -5, -4, -3, -2, -1], [7, 0, 0, 0, 0, 0, 0, -8]])
    # q + 8 as nibbles, element c at bits 4c: 0x76543210; [15,8,8,8,8,8,8,0] -> 0x0888888F
    assert pack_int4(q).tolist() == [[0x76543210], [0x0888888F]]
    scale = torch.tensor([[0.5], [2.0]]).repeat(1, 1)
    w = dequantize_int4(pack_int4(q), scale, 8, torch.float32)
    assert torch.equal(w, q.float() * scale)


@settings(max_examples=30, deadline=None)
@given(SEEDS, ROWS, WORDS)
def test_w4a8_reorder_roundtrip(seed, rows, words):
    q = rand_q(seed, rows, words)
    assert torch.equal(unpack_int4_reorder(qw.quark_pack_reorder(q)).long(), q)
    assert torch.equal(qw.quark_unpack_reorder(pack_int4_reorder(q)), q)


def test_w4a8_reorder_known_answer():
    # elements [1..7, -8]; nibble i holds element [0,2,4,6,1,3,5,7][i], two's complement:
    # nibbles 1,3,5,7,2,4,6,8 -> 0x86427531 (a negative int32)
    q = torch.tensor([[1, 2, 3, 4, 5, 6, 7, -8]])
    word = pack_int4_reorder(q)
    assert word.tolist() == [[0x86427531 - 2**32]]
    w = dequantize_w4a8(word, torch.tensor(0.5), torch.tensor([3.0]))
    assert torch.equal(w, q.float() * 1.5)


@settings(max_examples=30, deadline=None)
@given(SEEDS, ROWS, st.integers(1, 3))
def test_mxfp4_pack_and_quantize_match_writer(seed, rows, groups):
    g = torch.Generator().manual_seed(seed)
    # magnitudes over many binades, plus exact e2m1 ties (x.25, x.75 steps) and zeros
    x = torch.randn(rows, 32 * groups, generator=g) * torch.exp2(
        torch.randint(-6, 6, (rows, 1), generator=g).float())
    x[:, :8] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.75])
    x[:, 8] = 0.0
    codes, scales = qw.mx_quantize(x)
    packed, s = quantize_mxfp4(x)
    assert torch.equal(packed, qw.mx_pack(codes)) and torch.equal(s, scales)
    assert torch.equal(dequantize_mxfp4(packed, s, torch.float32), qw.mx_dequant(codes, scales))
    assert torch.equal(mxfp4_qdq(x), qw.mx_qdq(x))


def test_mxfp4_known_answer():
    # element 2i in the low nibble; codes 0..7 = 0, .5, 1, 1.5, 2, 3, 4, 6; bit 3 = sign
    packed = torch.tensor([[0x21, 0xF7]], dtype=torch.uint8)
    assert unpack_fp4(packed).tolist() == [[0.5, 1.0, 6.0, -6.0]]
    # Quark "even" scale: amax 6 -> 2^0 ; amax 7 (>= 1.75 * 4) -> 2^1 ; amax 0 -> 2^-127
    x = torch.zeros(3, 32)
    x[0, 0], x[1, 0] = 6.0, 7.0
    _, s = quantize_mxfp4(x)
    assert s[:, 0].tolist() == [127, 128, 0]


def test_fp8_block_dequant_matches_writer():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(200, 300, generator=g)  # partial edge blocks on both dims
    q, s = qw.fp8_block_quantize(w)
    assert s.shape == (2, 3)
    assert torch.equal(dequantize_fp8_block(q, s, (128, 128), torch.float32),
                       qw.fp8_block_dequant(q, s))


def test_repack_chunked_equals_whole_layer():
    """The GPU load path repacks 4-bit experts 16 at a time (bounded temporaries): the result
    must equal repacking the whole layer at once, for an expert count not divisible by 16."""
    from atom_stream.kernels.moe_ref import repack_int4, repack_mxfp4
    from atom_stream.layers.quant.common import _repack_chunked

    g = torch.Generator().manual_seed(3)
    w4 = torch.randint(-2**31, 2**31 - 1, (37, 64, 32), generator=g, dtype=torch.int32)
    assert torch.equal(_repack_chunked(repack_int4, w4), repack_int4(w4))
    fp4 = torch.randint(0, 256, (37, 64, 128), generator=g, dtype=torch.int32).to(torch.uint8)
    assert torch.equal(_repack_chunked(repack_mxfp4, fp4), repack_mxfp4(fp4))
