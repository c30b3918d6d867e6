"""A JPEG Lossless encoder (ITU T.81 Process 14, first-order prediction, selection value 1), in numpy.

pydicom cannot encode JPEG Lossless, the compressed transfer syntax of the competition's files
(1.2.840.10008.1.2.4.70); :func:`encode_jpeg_lossless` writes it so the synthetic studies exercise the readers'
decoders. numpy only.
"""

from __future__ import annotations

import heapq

import numpy as np


def _huffman_bits(freq: np.ndarray) -> tuple[list[int], list[int]]:
    """JPEG Huffman table (BITS[1..16], HUFFVAL) for symbol frequencies (ITU T.81 Annex K.2)."""
    symbols = [int(s) for s in np.flatnonzero(freq)]
    # code sizes from a Huffman tree, with a reserved symbol (-1, frequency 0) so no code is all ones
    heap = [(int(freq[s]), i, [s]) for i, s in enumerate(symbols)] + [(0, len(symbols), [-1])]
    heapq.heapify(heap)
    size = {s: 0 for s in symbols + [-1]}
    counter = len(symbols) + 1
    while len(heap) > 1:
        f1, _, a = heapq.heappop(heap)
        f2, _, b = heapq.heappop(heap)
        for s in a + b:
            size[s] += 1
        heapq.heappush(heap, (f1 + f2, counter, a + b))
        counter += 1
    bits = [0] * 33
    for s in size.values():
        bits[s] += 1
    # limit code lengths to 16 (Figure K.3)
    i = 32
    while i > 16:
        if bits[i] > 0:
            j = i - 2
            while bits[j] == 0:
                j -= 1
            bits[i] -= 2
            bits[i - 1] += 1
            bits[j + 1] += 2
            bits[j] -= 1
        else:
            i -= 1
    while bits[i] == 0:
        i -= 1
    bits[i] -= 1  # drop the reserved code point
    # symbols by decreasing frequency get the shortest codes
    huffval = sorted(symbols, key=lambda s: (-int(freq[s]), s))
    return bits[1:17], huffval


def encode_jpeg_lossless(pixels: np.ndarray, precision: int) -> bytes:
    """Encode one frame as a JPEG Lossless (Process 14, selection value 1) bytestream.

    Args:
        pixels: (rows, columns) unsigned samples below ``2 ** precision`` (for signed DICOM data: the two's
            complement bit pattern masked to ``precision`` bits).
        precision: sample precision P, 2..16 (= BitsStored).

    Returns:
        SOI, SOF3, DHT (one table fitted to the image), SOS (predictor 1, point transform 0), the Huffman coded
        differences with 0xFF byte stuffing, EOI.
    """
    x = np.asarray(pixels)
    if x.ndim != 2:
        raise ValueError(f"expected a (rows, columns) frame, got shape {x.shape}")
    if not 2 <= precision <= 16:
        raise ValueError(f"precision must be 2..16, got {precision}")
    x = x.astype(np.int64)
    if x.size and (x.min() < 0 or x.max() >= 1 << precision):
        raise ValueError(f"samples must be in [0, {(1 << precision) - 1}] for precision {precision}, "
                         f"got [{x.min()}, {x.max()}]")
    rows, cols = x.shape
    pred = np.empty_like(x)
    pred[:, 1:] = x[:, :-1]  # Ra, the sample to the left
    pred[1:, 0] = x[:-1, 0]  # first column: Rb, the sample above
    pred[0, 0] = 1 << (precision - 1)
    diff = (x - pred).ravel() & 0xFFFF
    diff = np.where(diff >= 0x8000, diff - 0x10000, diff)  # -32768 .. 32767; -32768 codes as category 16
    mag = np.abs(diff)
    ssss = np.frexp(mag.astype(np.float64))[1].astype(np.int64)  # bit length, 0 for 0; 16 for 32768
    freq = np.bincount(ssss, minlength=17)
    bits, huffval = _huffman_bits(freq)
    # canonical codes (Annex C)
    code_of = np.zeros(17, np.int64)
    len_of = np.zeros(17, np.int64)
    code, idx = 0, 0
    for length in range(1, 17):
        for _ in range(bits[length - 1]):
            code_of[huffval[idx]], len_of[huffval[idx]] = code, length
            code += 1
            idx += 1
        code <<= 1
    extra_len = np.where(ssss == 16, 0, ssss)
    extra = np.where(diff >= 0, diff, diff - 1) & ((np.int64(1) << extra_len) - 1)
    value = (code_of[ssss] << extra_len) | extra
    nbits = len_of[ssss] + extra_len  # <= 32
    end = np.cumsum(nbits)
    total = int(end[-1]) if end.size else 0
    start = end - nbits
    # place each code in a 64-bit window aligned to 32-bit words, then add the (disjoint) halves per word
    word = start >> 5
    off = start & 31
    shifted = value.astype(np.uint64) << (64 - off - nbits).astype(np.uint64)
    hi = (shifted >> np.uint64(32)).astype(np.float64)
    lo = (shifted & np.uint64(0xFFFFFFFF)).astype(np.float64)
    n_words = (total >> 5) + 2
    words = (np.bincount(word, weights=hi, minlength=n_words)
             + np.bincount(word + 1, weights=lo, minlength=n_words)).astype(np.uint64)
    data = words.astype(">u4").tobytes()
    n_bytes = (total + 7) // 8
    buf = np.frombuffer(data[:n_bytes], np.uint8).copy()
    if total % 8:
        buf[-1] |= (1 << (8 - total % 8)) - 1  # pad the last byte with 1-bits
    ff = np.flatnonzero(buf == 0xFF)
    if ff.size:
        buf = np.insert(buf, ff + 1, 0)  # byte stuffing
    sof = bytes([0xFF, 0xC3, 0, 11, precision]) + rows.to_bytes(2, "big") + cols.to_bytes(2, "big") + bytes(
        [1, 1, 0x11, 0])
    dht_body = bytes([0x00]) + bytes(bits) + bytes(huffval)
    dht = bytes([0xFF, 0xC4]) + (len(dht_body) + 2).to_bytes(2, "big") + dht_body
    sos = bytes([0xFF, 0xDA, 0, 8, 1, 1, 0x00, 1, 0, 0])
    return b"\xff\xd8" + sof + dht + sos + buf.tobytes() + b"\xff\xd9"

