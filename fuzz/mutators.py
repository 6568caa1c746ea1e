"""Structure-aware mutations of real sample files, one family per reader.

Every mutator takes a ``random.Random`` and the seed's bytes (or, for WFDB, its files) and
returns mutated content; the same ``(seed, case)`` pair always gives the same bytes, so a
finding can be reproduced from its case number alone.
"""

from __future__ import annotations

import gzip
import io
import random
import struct
import zlib

#: Values that break size arithmetic: zero, one, powers of two and their neighbours, sign bits.
INTERESTING = (0, 1, 2, 3, 7, 8, 12, 15, 16, 17, 24, 31, 32, 64, 127, 128, 255, 256, 1023, 4096,
               32767, 32768, 65535, 65536, 2**24, 2**31 - 1, 2**31, 2**32 - 1)


def interesting(rng: random.Random, bits: int = 32) -> int:
    """An interesting unsigned integer that fits ``bits``."""
    v = rng.choice(INTERESTING) if rng.random() < 0.85 else rng.getrandbits(bits)
    return v & ((1 << bits) - 1)


# ------------------------------------------------------------------------------ generic bytes
def flip_bytes(rng: random.Random, data: bytes) -> bytes:
    """Overwrite 1-8 random bytes (half the time a single bit flip)."""
    b = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(len(b))
        b[i] = b[i] ^ (1 << rng.randrange(8)) if rng.random() < 0.5 else rng.randrange(256)
    return bytes(b)


def truncate(rng: random.Random, data: bytes) -> bytes:
    """Cut the file: anywhere, in the first kilobyte (headers) or near the end."""
    r = rng.random()
    if r < 0.3:
        n = rng.randrange(min(len(data), 1024))
    elif r < 0.6:
        n = len(data) - rng.randint(1, min(len(data), 4096))
    else:
        n = rng.randrange(len(data))
    return data[:n]


def splice_int(rng: random.Random, data: bytes) -> bytes:
    """Write an interesting 16/32-bit integer (either endianness) at a random offset."""
    size = rng.choice((2, 4))
    if len(data) < size:
        return data
    i = rng.randrange(len(data) - size + 1)
    fmt = rng.choice("<>") + ("H" if size == 2 else "I")
    return data[:i] + struct.pack(fmt, interesting(rng, 8 * size)) + data[i + size:]


def chunk_edit(rng: random.Random, data: bytes) -> bytes:
    """Delete, duplicate or insert random bytes in a block of the file."""
    i = rng.randrange(len(data))
    n = rng.randint(1, 256)
    r = rng.random()
    if r < 0.4:
        return data[:i] + data[i + n:]
    if r < 0.7:
        return data[:i] + data[i:i + n] + data[i:]
    return data[:i] + bytes(rng.randrange(256) for _ in range(n)) + data[i:]


GENERIC = (flip_bytes, truncate, splice_int, chunk_edit)


def generic(rng: random.Random, data: bytes) -> bytes:
    """One generic byte-level mutation."""
    return rng.choice(GENERIC)(rng, data) if data else data


# ------------------------------------------------------------------------------ TIFF (IFD aware)
TIFF_TAGS = (256, 257, 258, 259, 262, 270, 273, 277, 278, 279, 284, 322, 323, 324, 325, 338, 339, 347)


def tiff_entries(data: bytes) -> list[tuple[int, int, int, int, str]]:
    """``(offset of entry, tag, type, count, byte order)`` of every IFD entry (classic TIFF)."""
    if len(data) < 8 or data[:2] not in (b"II", b"MM"):
        return []
    bo = "<" if data[:2] == b"II" else ">"
    if struct.unpack(bo + "H", data[2:4])[0] != 42:
        return []
    out, seen = [], set()
    off = struct.unpack(bo + "I", data[4:8])[0]
    while 8 <= off < len(data) - 2 and off not in seen and len(seen) < 64:
        seen.add(off)
        n = struct.unpack(bo + "H", data[off:off + 2])[0]
        for k in range(n):
            e = off + 2 + 12 * k
            if e + 12 > len(data):
                break
            tag, typ, count = struct.unpack(bo + "HHI", data[e:e + 8])
            out.append((e, tag, typ, count, bo))
        nxt = off + 2 + 12 * n
        if nxt + 4 > len(data):
            break
        off = struct.unpack(bo + "I", data[nxt:nxt + 4])[0]
    return out


def tiff_tag(rng: random.Random, data: bytes) -> bytes:
    """Change the value, count or type of a size/offset/layout tag in any IFD."""
    entries = tiff_entries(data)
    picks = [e for e in entries if e[1] in TIFF_TAGS] or entries
    if not picks:
        return generic(rng, data)
    e, _tag, typ, count, bo = rng.choice(picks)
    b = bytearray(data)
    r = rng.random()
    if r < 0.7:  # value field (inline SHORT/LONG or the offset of out-of-line values)
        if typ == 3 and count <= 2:
            b[e + 8:e + 10] = struct.pack(bo + "H", interesting(rng, 16))
        else:
            b[e + 8:e + 12] = struct.pack(bo + "I", interesting(rng, 32))
    elif r < 0.85:
        b[e + 4:e + 8] = struct.pack(bo + "I", interesting(rng, 32))
    else:
        b[e + 2:e + 4] = struct.pack(bo + "H", rng.randint(0, 20))
    return bytes(b)


def tiff_description(rng: random.Random, data: bytes) -> bytes:
    """Rewrite numbers in the ImageDescription text (Aperio ``AppMag``/``MPP``, the level sizes)."""
    import re

    for e, tag, _typ, count, bo in tiff_entries(data):
        if tag != 270 or count <= 4:
            continue
        off = struct.unpack(bo + "I", data[e + 8:e + 12])[0]
        count = min(count, len(data) - off)  # a count damaged by an earlier mutation padded the file to it
        if count <= 4:
            continue
        text = data[off:off + count]
        repl = rng.choice([b"0", b"-1", b"nan", b"inf", b"1e308", b"0.0000001", b"99999999999", b"abc", b""])
        nums = list(re.finditer(rb"\d+(\.\d+)?", text))
        if not nums:
            break
        m = rng.choice(nums)
        new = (text[:m.start()] + repl + text[m.end():])[:count].ljust(count, b"\x00")
        return data[:off] + new + data[off + count:]
    return tiff_tag(rng, data)


# ------------------------------------------------------------------------------ PNG / JPEG
def _png_chunks(data: bytes) -> list[tuple[int, int, bytes]]:
    out, i = [], 8
    while i + 8 <= len(data):
        n = struct.unpack(">I", data[i:i + 4])[0]
        out.append((i, n, data[i + 4:i + 8]))
        i += 12 + n
    return out


def png_chunk(rng: random.Random, data: bytes) -> bytes:
    """Mutate IHDR fields (with a valid CRC), a chunk length, or IDAT's zlib data (CRC fixed)."""
    chunks = _png_chunks(data)
    if not chunks:
        return generic(rng, data)
    b = bytearray(data)
    r = rng.random()
    if r < 0.45 and chunks[0][2] == b"IHDR":
        i = chunks[0][0]
        field = rng.choice([(8, ">I", 32), (12, ">I", 32), (16, "B", 8), (17, "B", 8), (20, "B", 8)])
        b[i + field[0]:i + field[0] + struct.calcsize(field[1])] = struct.pack(field[1], interesting(rng, field[2]))
        body = bytes(b[i + 4:i + 8 + 13])
        b[i + 21:i + 25] = struct.pack(">I", zlib.crc32(body))
        return bytes(b)
    i, n, _typ = rng.choice(chunks)
    if r < 0.7:
        b[i:i + 4] = struct.pack(">I", interesting(rng, 32))
        return bytes(b)
    if n > 0:  # corrupt the chunk body but keep its CRC valid, so the decoder sees the damage
        j = i + 8 + rng.randrange(n)
        b[j] = rng.randrange(256)
        b[i + 8 + n:i + 12 + n] = struct.pack(">I", zlib.crc32(bytes(b[i + 4:i + 8 + n])))
    return bytes(b)


def _jpeg_segments(data: bytes) -> list[tuple[int, int, int]]:
    out, i = [], 2
    while i + 4 <= len(data) and data[i] == 0xFF:
        marker = data[i + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        n = struct.unpack(">H", data[i + 2:i + 4])[0]
        out.append((i, marker, n))
        if marker == 0xDA:
            break
        i += 2 + n
    return out


def jpeg_segment(rng: random.Random, data: bytes) -> bytes:
    """Mutate SOF height/width/components/precision, a segment length, or a table byte."""
    segs = _jpeg_segments(data)
    if not segs:
        return generic(rng, data)
    b = bytearray(data)
    sof = [s for s in segs if s[1] in (0xC0, 0xC1, 0xC2)]
    r = rng.random()
    if r < 0.5 and sof:
        i = sof[0][0]
        off, fmt, bits = rng.choice([(4, "B", 8), (5, ">H", 16), (7, ">H", 16), (9, "B", 8), (11, "B", 8)])
        b[i + off:i + off + struct.calcsize(fmt)] = struct.pack(fmt, interesting(rng, bits))
    elif r < 0.75:
        i = rng.choice(segs)[0]
        b[i + 2:i + 4] = struct.pack(">H", interesting(rng, 16))
    else:
        i, _m, n = rng.choice(segs)
        if n > 2 and i + 4 + n - 2 <= len(b):
            b[i + 4 + rng.randrange(n - 2)] = rng.randrange(256)
    return bytes(b)


# ------------------------------------------------------------------------------ NIfTI-1 header
#: (offset, struct format, name) of NIfTI-1 header fields that drive decoding.
NIFTI_FIELDS = [(40 + 2 * k, "h", f"dim[{k}]") for k in range(8)] + [
    (70, "h", "datatype"), (72, "h", "bitpix"), (108, "f", "vox_offset"), (112, "f", "scl_slope"),
    (116, "f", "scl_inter"), (123, "B", "xyzt_units"), (252, "h", "qform_code"), (254, "h", "sform_code"),
] + [(76 + 4 * k, "f", f"pixdim[{k}]") for k in range(8)] + [(256 + 4 * k, "f", f"quatern[{k}]") for k in range(6)] \
  + [(280 + 4 * k, "f", f"srow[{k}]") for k in range(12)]
NIFTI_DTYPES = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024, 1280, 1536, 1792, 2048, 2304, 255, 9999)
FLOATS = (0.0, -1.0, 1e-30, 1e30, 3.4e38, float("nan"), float("inf"), -float("inf"), 352.0, 348.0, 1e9, 0.5)


def nifti_header(rng: random.Random, raw: bytes) -> tuple[bytes, str]:
    """Mutate one header field of an (uncompressed) NIfTI-1 image; returns bytes and the field."""
    bo = "<" if struct.unpack("<i", raw[:4])[0] == 348 else ">"
    off, fmt, name = rng.choice(NIFTI_FIELDS)
    if name == "datatype":
        v = rng.choice(NIFTI_DTYPES)
    elif fmt == "f":
        v = rng.choice(FLOATS) if rng.random() < 0.8 else rng.uniform(-1e6, 1e6)
    elif fmt == "B":
        v = rng.randrange(256)
    else:
        v = rng.choice((0, 1, 2, 3, 4, 5, 7, 8, 9, -1, -32768, 32767, 1024, 4096)) if rng.random() < 0.85 \
            else rng.randint(-32768, 32767)
    b = bytearray(raw)
    b[off:off + struct.calcsize(fmt)] = struct.pack(bo + fmt, v)
    return bytes(b), f"{name}={v}"


def gz(data: bytes) -> bytes:
    """gzip ``data`` quickly (level 1)."""
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=1, mtime=0) as f:
        f.write(data)
    return buf.getvalue()


# ------------------------------------------------------------------------------ WFDB header
WFDB_FMTS = ("8", "16", "24", "32", "61", "80", "160", "212", "310", "311", "508", "516", "524", "0", "99", "")
WFDB_NAME_ATTACKS = ("../outside.dat", "../../../../../../etc/hostname", "/etc/hostname", "missing.dat",
                     "sub/rec.dat", "rec.dat", "-", "..", ".", "rec.hea")


def wfdb_header(rng: random.Random, text: str) -> tuple[str, str]:
    """Mutate one field of a WFDB header (record line or a signal line); returns text and what changed."""
    lines = text.splitlines()
    idx = [i for i, ln in enumerate(lines) if ln.strip() and not ln.lstrip().startswith("#")]
    r = rng.random()
    if r < 0.35:  # record line: name n_sig fs sig_len [time date]
        i = idx[0]
        f = lines[i].split()
        k = rng.randrange(1, min(len(f), 4) + 1) if len(f) > 1 else 1
        val = rng.choice({
            1: ("0", "1", "13", "1000", "-1", "99999999", "x", "3/2"),
            2: ("0", "-500", "1e9", "1e-9", "nan", "inf", "abc", "500/0", "500/-1", "360/1e300", "0.0001"),
            3: ("0", "1", "-5", "10000000000", "999999999999999", "1.5", "x"),
            4: ("25:61:00", "00:00:00", "x", "99:99:99.999"),
        }[min(k, 4)])
        while len(f) <= k:
            f.append("0")
        f[k] = val
        lines[i] = " ".join(f)
        what = f"record field {k}={val}"
    elif r < 0.85 and len(idx) > 1:  # signal line: file fmt[xN][:skew][+off] gain(base)/units res zero init chk blk name
        i = rng.choice(idx[1:])
        f = lines[i].split()
        k = rng.randrange(0, min(len(f), 9))
        if k == 0:
            val = rng.choice(WFDB_NAME_ATTACKS)
        elif k == 1:
            val = rng.choice(WFDB_FMTS) + rng.choice(("", "", "x2", "x0", ":5", ":-3", "+1000000000", "+7", "+-4"))
        elif k == 2:
            val = rng.choice(("0", "-1", "1e-300", "1e300", "nan", "inf", "200(0)/mV", "200(99999999)/uV",
                              "200/V", "200(-5)/xx", "abc", "200(/mV"))
        else:
            val = rng.choice(("0", "-1", "64", "1", "100000", "x", "2147483648", ""))
        if k < len(f):
            f[k] = val
        lines[i] = " ".join(f)
        what = f"signal field {k}={val}"
    elif r < 0.92 and len(idx) > 1:
        i = rng.choice(idx[1:])
        if rng.random() < 0.5:
            del lines[i]
            what = "signal line deleted"
        else:
            lines.insert(i, lines[i])
            what = "signal line duplicated"
    else:
        lines.append("# " + "".join(rng.choice("Age:<sex>Dx 0123456789,;\\%") for _ in range(rng.randint(1, 200))))
        what = "comment"
    return "\n".join(lines) + "\n", what
