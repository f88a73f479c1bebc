"""Write the example folder of media files: two one-page PDFs and a tiny PNG, into scans/ (or the folder given).

    python examples/media/make_scans.py inbox/scans && cp examples/media/scans.toml inbox/

The files are made here rather than shipped as binaries; batchd's tests run this example.
"""

from __future__ import annotations

import struct
import sys
import zlib
from pathlib import Path

PAGES = {
    "invoice.pdf": ["INVOICE 2026-117", "Acme Tools Ltd, 4 Mill Lane, Leeds",
                    "12 x cordless drill  @ 89.00 = 1068.00 GBP", "Due within 30 days."],
    "letter.pdf": ["Dear Ms Okafor,", "Thank you for your order of 3 March. The drills shipped today",
                   "and should reach you by Friday.", "Kind regards, Sam"],
}


def pdf(lines: list[str]) -> bytes:
    """A valid one-page PDF showing ``lines`` in Helvetica (with its cross-reference table)."""
    text = "BT /F1 12 Tf 72 720 Td 16 TL " + " ".join(
        "(" + line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)") + ") '" for line in lines) + " ET"
    objects = [
        "<< /Type /Catalog /Pages 2 0 R >>",
        "<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        "/Resources << /Font << /F1 5 0 R >> >> >>",
        f"<< /Length {len(text)} >>\nstream\n{text}\nendstream",
        "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = b"%PDF-1.4\n"
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n{body}\nendobj\n".encode("latin-1")
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{offset:010d} 00000 n \n".encode() for offset in offsets)
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return out


def png(width: int = 8, height: int = 8) -> bytes:
    """A small RGB PNG: a red-to-blue gradient."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    rows = b"".join(b"\0" + b"".join(bytes((255 * x // width, 0, 255 * y // height)) for x in range(width))
                    for y in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def make(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, lines in PAGES.items():
        (folder / name).write_bytes(pdf(lines))
        written.append(folder / name)
    (folder / "photo.png").write_bytes(png())
    written.append(folder / "photo.png")
    return written


if __name__ == "__main__":
    for path in make(Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).with_name("scans"))):
        print(path)
