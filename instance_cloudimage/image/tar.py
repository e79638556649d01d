"""The disk image inside a tar archive (OVA, Vagrant .box, GCE-style disk.raw tarballs), streamed.

Nothing is ever extracted to the filesystem.  Member-selection rule:
the archive must hold exactly one *disk member*, a regular file whose base name ends in .raw,
.img, .qcow2, .vmdk, .vhd, .vhdx, .vdi or .iso (GCE's disk.raw, Vagrant's box.img, an OVA's
.vmdk); other regular files (.ovf, .mf, metadata.json, Vagrantfile...) and directories are
skipped.  The whole archive is refused when any member is a link, a device or a FIFO, or has an
absolute name or a ``..`` component.  Members after the disk are checked when ``finish`` reads
the rest of the archive, so a second disk member fails the create even after writing.
GNU sparse members (``tar -S``, old GNU and PAX 1.0 formats, as GCE requires) are read with
their holes as zeros.  Our own header parser bounds every metadata size, unlike tarfile, which
reads a PAX header of any announced size into memory.
"""

from __future__ import annotations

import logging

from instance_cloudimage.image.wrappers import CHUNK, Layer, Readable, drain
from instance_cloudimage.runtime.errors import UnsafeImage, UnsupportedFormat

log = logging.getLogger(__name__)

DISK_SUFFIXES = (".raw", ".img", ".qcow2", ".vmdk", ".vhd", ".vhdx", ".vdi", ".iso")
MAX_META = 1024 * 1024  # PAX and GNU long-name headers
MAX_PAX_RECORDS = 1024  # records in one PAX header (tar writes a handful)
# Everything besides the disk member, headers and metadata included: every 512-byte header costs
# a parse, so a few KB of zstd holding millions of empty entries must not cost minutes of CPU.
MAX_OTHER = 256 * 1024 * 1024  # bytes
MAX_ENTRIES = 10_000  # headers (members, PAX and long-name headers); an OVA or a .box has a handful
HIGH_BYTES = bytes(range(128, 256))
MAX_SPARSE_ENTRIES = 1 << 20
ZEROS = memoryview(bytes(CHUNK))
REGULAR, CONTIGUOUS, SPARSE = b"0\0", b"7", b"S"
SKIPPED_TYPES = b"5DV"  # directory, GNU dump dir, volume label
LINK_TYPES = {b"1": "a hard link", b"2": "a symbolic link", b"3": "a device", b"4": "a device", b"6": "a FIFO"}


def printable(name: str) -> str:
    """A member name fit for a message: it comes from the image, so keep it short and inert."""
    clean = "".join(c if c.isprintable() and c.isascii() else "?" for c in name)
    return clean if len(clean) <= 64 else clean[:61] + "..."


def parse_number(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256, for sizes of 8 GiB and more
        return int.from_bytes(field, "big") - (0x80 << (8 * (len(field) - 1)))
    text = field.split(b"\0", 1)[0].strip()
    if text.strip(b"01234567"):  # int() would also take "-1", "+7", "0o7" or "1_0", which tar refuses
        raise UnsafeImage("tar archive has a malformed header")
    return int(text, 8) if text else 0


def is_disk_member(name: str) -> bool:
    return name.rsplit("/", 1)[-1].lower().endswith(DISK_SUFFIXES)


class TarMember(Layer):
    """A Layer yielding the content of the archive's one disk member."""

    def __init__(self, source: Readable, what: str = "tar archive") -> None:
        self.source = source
        self.what = what
        self.other_bytes = 0
        self.entries = 0  # headers read besides the disk member's own
        self.ended = False
        member = self._next_member(find_disk=True)
        if member is None:
            raise UnsupportedFormat("tar archive holds no disk image member",
                                    f"the member's name must end in {', '.join(DISK_SUFFIXES)}")
        self.name, self.stored, self.size, self.sparse = member
        if self.sparse is not None and sum(length for _, length in self.sparse) != self.stored:
            raise UnsafeImage("tar archive has a sparse map that disagrees with the member's size")
        self.remaining = self.stored  # bytes of the member's stored data not yet read
        self.pos = 0  # position in the member's (sparse-expanded) content
        self.seg = 0  # the sparse map entry at or after pos
        log.info("streaming member %s (%d bytes) of the tar archive", printable(self.name), self.size)

    # --- low-level reads ---------------------------------------------------------------------
    def _read_exact(self, n: int) -> bytes:
        out = bytearray(n)
        view = memoryview(out)
        got = 0
        while got < n:
            k = self.source.readinto(view[got:])
            if k == 0:
                raise UnsafeImage("tar archive is truncated", "download it again; check its checksum")
            got += k
        return bytes(out)

    def _skip(self, n: int) -> None:
        buf = bytearray(min(n, CHUNK) or 1)
        while n > 0:
            k = self.source.readinto(memoryview(buf)[:min(n, len(buf))])
            if k == 0:
                raise UnsafeImage("tar archive is truncated", "download it again; check its checksum")
            n -= k

    def _count(self, nbytes: int) -> None:
        """Charge one header and ``nbytes`` behind it (rounded up to blocks) to the caps."""
        self.entries += 1
        self.other_bytes += 512 + nbytes + -nbytes % 512
        if self.entries > MAX_ENTRIES:
            raise UnsafeImage(f"tar archive has more than {MAX_ENTRIES} entries besides the disk image")
        if self.other_bytes > MAX_OTHER:
            raise UnsafeImage("tar archive holds too much data besides the disk image")

    def _read_meta(self, size: int) -> bytes:
        if size > MAX_META:
            raise UnsafeImage("tar archive has an oversized metadata header")
        self._count(size)
        data = self._read_exact(size)
        self._skip(-size % 512)
        return data

    # --- headers -------------------------------------------------------------------------------
    def _header(self) -> bytes | None:
        block = bytearray(512)
        view = memoryview(block)
        got = 0
        while got < 512:
            k = self.source.readinto(view[got:])
            if k == 0:
                if got == 0:
                    return None  # end of data without an end marker: tolerated
                raise UnsafeImage("tar archive is truncated", "download it again; check its checksum")
            got += k
        header = bytes(block)
        if header == bytes(512):
            return None
        stored = parse_number(header[148:156])
        rest = header[:148] + header[156:]
        unsigned = sum(rest) + 256  # the checksum field itself counts as eight spaces
        # Historic tars summed signed chars: each byte over 127 then counts 256 less.
        signed = unsigned - 256 * (len(rest) - len(rest.translate(None, HIGH_BYTES)))
        if stored not in (unsigned, signed):
            raise UnsafeImage("tar archive has a header with a bad checksum")
        return header

    def _next_member(self, find_disk: bool) -> tuple[str, int, int, list[tuple[int, int]] | None] | None:
        """Skip to the next disk member (or the end); return (name, stored, size, sparse map)."""
        pax: dict[str, str] = {}
        long_name: str | None = None
        while (header := self._header()) is not None:
            kind = header[156:157]
            size = parse_number(header[124:136])
            if kind in (b"x", b"g", b"L", b"K"):
                data = self._read_meta(size)
                if kind == b"x":
                    pax = parse_pax(data)
                elif kind == b"L":
                    long_name = data.split(b"\0", 1)[0].decode("utf-8", "replace")
                continue
            name = pax.get("GNU.sparse.name") or pax.get("path") or long_name or member_name(header)
            pax_now, pax, long_name = pax, {}, None
            check_name(name)
            if kind in LINK_TYPES:
                raise UnsafeImage(f"tar archive member {printable(name)} is {LINK_TYPES[kind]}; "
                                  "links and devices are refused")
            if "size" in pax_now:
                size = parse_decimal(pax_now["size"])
            if kind not in REGULAR + CONTIGUOUS + SPARSE + SKIPPED_TYPES:
                raise UnsupportedFormat(f"tar archive member {printable(name)} has an unknown type")
            if kind in REGULAR + CONTIGUOUS + SPARSE and is_disk_member(name):
                if not find_disk:
                    raise UnsupportedFormat("tar archive holds more than one disk image "
                                            f"({printable(self.name)}, {printable(name)})")
                return self._open_member(name, kind, size, header, pax_now)
            self._count(size)
            self._skip(size + -size % 512)
        self.ended = True
        return None

    def _open_member(self, name: str, kind: bytes, size: int, header: bytes,
                     pax: dict[str, str]) -> tuple[str, int, int, list[tuple[int, int]] | None]:
        if kind == SPARSE:
            sparse, real = self._gnu_sparse_map(header)
            return name, size, real, sparse
        if "GNU.sparse.major" in pax or "GNU.sparse.map" in pax or "GNU.sparse.size" in pax:
            if pax.get("GNU.sparse.major") != "1" or pax.get("GNU.sparse.minor") != "0":
                raise UnsupportedFormat("tar archive uses an old PAX sparse format",
                                        "recreate it with tar --format=oldgnu -S")
            sparse, used = self._pax_sparse_map()
            real = parse_decimal(pax.get("GNU.sparse.realsize", ""))
            if used > size:
                raise UnsafeImage("tar archive has an invalid sparse map")
            return name, size - used, real, check_sparse(sparse, real)
        return name, size, size, None

    def _gnu_sparse_map(self, header: bytes) -> tuple[list[tuple[int, int]], int]:
        entries = parse_sparse_entries(header[386:482])
        extended = header[482]
        while extended:
            block = self._read_exact(512)
            entries += parse_sparse_entries(block[:504])
            extended = block[504]
            if len(entries) > MAX_SPARSE_ENTRIES:
                raise UnsafeImage("tar archive has an oversized sparse map")
        return check_sparse(entries, parse_number(header[483:495])), parse_number(header[483:495])

    def _pax_sparse_map(self) -> tuple[list[tuple[int, int]], int]:
        """PAX 1.0: the map is decimal lines at the start of the member's data, padded to 512.

        Lines are counted block by block: re-splitting all the text read so far after each block
        cost quadratic time (14 s of CPU for a 4 MiB map, some 15 minutes for the 32 MiB allowed,
        which gzip to 32 KB)."""
        text = bytearray()
        newlines = 0
        count: int | None = None
        while len(text) <= MAX_META * 32:
            block = self._read_exact(512)
            text += block
            newlines += block.count(b"\n")
            try:
                if count is None and newlines:
                    count = int(text[:text.index(b"\n")])
                    if not 0 <= count <= MAX_SPARSE_ENTRIES:
                        break
                if count is not None and newlines > 2 * count:
                    numbers = [int(x) for x in text.split(b"\n", 2 * count + 1)[1:1 + 2 * count]]
                    return list(zip(numbers[::2], numbers[1::2], strict=True)), len(text)
            except ValueError:
                raise UnsafeImage("tar archive has a malformed sparse map") from None
        raise UnsafeImage("tar archive has an oversized sparse map")

    # --- the member's content ------------------------------------------------------------------
    def readinto(self, buf: bytearray | memoryview) -> int:
        view = memoryview(buf)
        if self.sparse is None:
            want = min(len(view), self.remaining)
        elif self.pos >= self.size:
            return 0
        else:
            while self.seg < len(self.sparse) and self.pos >= sum(self.sparse[self.seg]):
                self.seg += 1
            next_data = self.sparse[self.seg][0] if self.seg < len(self.sparse) else self.size
            if self.pos < next_data:  # a hole: zeros, nothing stored
                n = min(len(view), next_data - self.pos)
                view[:n] = ZEROS[:n]
                self.pos += n
                return n
            want = min(len(view), sum(self.sparse[self.seg]) - self.pos)
        n = self.source.readinto(view[:want]) if want else 0
        if want and n == 0:
            raise UnsafeImage("tar archive is truncated", "download it again; check its checksum")
        self.remaining -= n
        self.pos += n
        return n

    def finish(self) -> None:
        """Read the rest of the archive: later members are checked, then the end of the data."""
        self._skip(self.remaining + -self.stored % 512)
        self.remaining = 0
        if not self.ended:
            self._next_member(find_disk=False)
        drain(self.source, "tar archive")


def member_name(header: bytes) -> str:
    name = header[:100].split(b"\0", 1)[0]
    if header[257:263] == b"ustar\0":  # POSIX: a prefix field extends the name
        prefix = header[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8", "replace")


def check_name(name: str) -> None:
    if name.startswith("/") or ".." in name.split("/"):
        raise UnsafeImage(f"tar archive member {printable(name)} points outside the archive "
                          "(absolute path or '..')")


def parse_pax(data: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    pos = 0
    records = 0
    while pos < len(data):
        records += 1
        if records > MAX_PAX_RECORDS:
            raise UnsafeImage("tar archive has a PAX header with too many records")
        space = data.find(b" ", pos)
        try:
            length = int(data[pos:space])
        except ValueError:
            raise UnsafeImage("tar archive has a malformed PAX header") from None
        if length <= 0 or space < 0 or pos + length > len(data):
            raise UnsafeImage("tar archive has a malformed PAX header")
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        out[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        pos += length
    return out


def parse_sparse_entries(field: bytes) -> list[tuple[int, int]]:
    entries = []
    for i in range(0, len(field) - 23, 24):
        if field[i:i + 24].strip(b"\0"):
            entries.append((parse_number(field[i:i + 12]), parse_number(field[i + 12:i + 24])))
    return entries


def parse_decimal(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or len(text) > 32:  # int() refuses "²" and 4300 digits
        raise UnsafeImage("tar archive has a malformed PAX header")
    return int(text)


def check_sparse(entries: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    end = 0
    for offset, length in entries:
        if offset < end or offset + length > size:
            raise UnsafeImage("tar archive has an invalid sparse map")
        end = offset + length
    return list(entries)
