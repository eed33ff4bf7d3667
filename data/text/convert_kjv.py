"""Builds kjv-train.jsonl: Genesis 4 to Exodus 40 of the King James Version (public domain),
from Debian's bible-kjv packages, in the layout of the held-out reference text
(fixtures/reference/kjv_genesis_1-3.txt, which is Genesis 1-3 and so not in this file).

Each chapter is cut at verse boundaries into records of at most MAX_CHARS characters; a
chapter's first record starts with its heading ("Genesis 4"). Run on Debian or Ubuntu:

    python3 data/text/convert_kjv.py
"""

import json
import pathlib
import re
import subprocess
import tempfile

MAX_CHARS = 700
RANGE = "gen4:1-exo40:38"
HERE = pathlib.Path(__file__).resolve().parent


def bible_text() -> str:
    with tempfile.TemporaryDirectory() as tmp:
        for pkg in ("bible-kjv", "bible-kjv-text"):
            subprocess.run(["apt-get", "download", pkg], cwd=tmp, check=True)
        for deb in pathlib.Path(tmp).glob("*.deb"):
            subprocess.run(["dpkg", "-x", str(deb), "root"], cwd=tmp, check=True)
        root = pathlib.Path(tmp) / "root" / "usr"
        out = subprocess.run(
            [str(root / "bin" / "bible"), "-p", str(root / "lib") + "/", "-l79", RANGE],
            check=True,
            capture_output=True,
            text=True,
        )
        return out.stdout


def chapters(text: str):
    """(heading, [verse text]) in order; a verse keeps its number and line breaks."""
    heading, verses = None, []
    for line in text.splitlines():
        if re.fullmatch(r"[1-3]? ?[A-Z][a-z]+( [A-Z][a-z]+)* \d+", line):
            if heading:
                yield heading, verses
            heading, verses = line, []
        elif re.match(r"  \d+ ", line):
            verses.append(line + "\n")
        elif line and verses:
            verses[-1] += line + "\n"
    if heading:
        yield heading, verses


def main() -> None:
    records = []
    for heading, verses in chapters(bible_text()):
        chunk = heading + "\n\n"
        for verse in verses:
            if len(chunk) + len(verse) > MAX_CHARS and chunk.strip() != heading:
                records.append(chunk)
                chunk = ""
            chunk += verse
        records.append(chunk)
    with open(HERE / "kjv-train.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps({"text": r}) + "\n")
    print(f"{len(records)} records")


if __name__ == "__main__":
    main()
