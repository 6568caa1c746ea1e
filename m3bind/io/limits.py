"""Safety limits every reader enforces before it decodes anything big.

The limits live in one mutable object, :data:`LIMITS`, so an application (or a test) can
tighten or relax them: ``m3bind.io.LIMITS.max_file_bytes = 512 * 2**20``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from m3bind.errors import CorruptFile, TooLarge


@dataclass
class Limits:
    """Upper bounds on what a reader accepts.

    Attributes:
        max_file_bytes: Largest file read (whole-slide images are exempt: OpenSlide reads
            them lazily, tile by tile).
        max_pixels: Largest decoded image or volume, in pixels/voxels times samples per pixel
            (a 2 GiB float32 volume is 2**29 voxels).
        max_signal_values: Largest decoded signal, leads times samples.
        max_files: Most files scanned in one DICOM series folder.
        max_tiles: Most whole-slide tiles decoded by one load.
    """

    max_file_bytes: int = field(default=2 * 2**30, metadata={"help": "largest file read, bytes"})
    max_pixels: int = field(default=2**29, metadata={"help": "largest decoded image/volume, values"})
    max_signal_values: int = field(default=50_000_000, metadata={"help": "largest signal, leads x samples"})
    max_files: int = field(default=5000, metadata={"help": "most files in one DICOM folder"})
    max_tiles: int = field(default=256, metadata={"help": "most whole-slide tiles decoded per load"})


#: The limits in force.
LIMITS = Limits()


def check_file(path: str | os.PathLike) -> int:
    """Check that ``path`` is a readable, non-empty file within the size limit; return its size.

    Raises:
        CorruptFile: The file is empty or cannot be read (permissions).
        TooLarge: The file exceeds :attr:`Limits.max_file_bytes`.
    """
    size = os.path.getsize(path)
    if size == 0:
        raise CorruptFile("empty file", path)
    if size > LIMITS.max_file_bytes:
        raise TooLarge(f"file of {size} bytes exceeds the limit of {LIMITS.max_file_bytes} bytes", path)
    try:
        with open(path, "rb") as f:
            f.read(1)
    except PermissionError:
        raise CorruptFile("permission denied, cannot read file", path) from None
    except OSError as e:
        raise CorruptFile(f"cannot read file: {e.strerror or e}", path) from None
    return size


def check_pixels(n: int, path: str | os.PathLike, what: str = "image") -> None:
    """Raise :class:`TooLarge` when a decoded ``what`` of ``n`` values would exceed the limit."""
    if n > LIMITS.max_pixels:
        raise TooLarge(f"{what} of {n} values exceeds the limit of {LIMITS.max_pixels}", path)


def check_signal(n: int, path: str | os.PathLike) -> None:
    """Raise :class:`TooLarge` when a signal of ``n`` values (leads x samples) is too long."""
    if n > LIMITS.max_signal_values:
        raise TooLarge(f"signal of {n} values exceeds the limit of {LIMITS.max_signal_values}", path)


def check_tiff_segments(page, size: int, path: str | os.PathLike, what: str = "TIFF") -> None:
    """Raise :class:`CorruptFile` when a TIFF page's strips or tiles lie beyond the file's end.

    tifffile reads each segment with ``fh.read(bytecount)``, and CPython allocates the count
    before reading: a damaged TileByteCounts of 1.9e9 in a 64 KB file allocated 1.9 GB per
    tile (found by fuzzing). Checking offset + count against the file size costs nothing.

    Args:
        page: A ``tifffile.TiffPage``.
        size: The file's size in bytes.
        path: For the message.
        what: What the page is, for the message.
    """
    from m3bind.errors import CorruptFile

    for off, n in zip(page.dataoffsets, page.databytecounts):
        if off < 0 or n < 0 or off + n > size:
            raise CorruptFile(f"{what} data lies beyond the end of the file", path)


class ClampedFile:
    """A binary file whose ``read(n)`` never asks for more than what is left of the file.

    Decoders read a chunk or element with ``fp.read(length)`` where ``length`` comes from the
    file; CPython allocates ``length`` bytes before reading, so a damaged length of 4 GiB
    allocates 4 GiB for a file of a few kilobytes (found by fuzzing, in pydicom and in
    Pillow's PNG plugin). Everything else is delegated to the wrapped file.

    Args:
        f: An open binary file.
        size: Its size in bytes.
    """

    def __init__(self, f, size: int):
        self._f, self._size = f, size

    def read(self, n: int | None = -1) -> bytes:
        if n is None or n < 0:
            return self._f.read()
        return self._f.read(max(0, min(n, self._size - self._f.tell())))

    def __getattr__(self, name: str):
        return getattr(self._f, name)
