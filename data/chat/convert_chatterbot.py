"""Converts the English part of chatterbot-corpus 1.3.3 (BSD licence) to chat JSONL.

    python3 -m pip download --no-deps chatterbot-corpus==1.3.3 -d /tmp/cb
    python3 data/chat/convert_chatterbot.py /tmp/cb/chatterbot_corpus-1.3.3-py2.py3-none-any.whl

Each conversation (a list of alternating turns, the first a user's) becomes one record
{"messages": [{"role": "user", ...}, {"role": "assistant", ...}, ...]}; a trailing user turn is
dropped. Files are read in name order; every 10th conversation goes to the validation split.
"""

import json
import sys
import zipfile

import yaml

PREFIX = "chatterbot_corpus/data/english/"


def main(wheel: str) -> None:
    train, val = [], []
    with zipfile.ZipFile(wheel) as z:
        for name in sorted(n for n in z.namelist() if n.startswith(PREFIX) and n.endswith(".yml")):
            doc = yaml.safe_load(z.read(name))
            for conv in doc.get("conversations") or []:
                turns = [str(t).strip() for t in conv if t is not None and str(t).strip()]
                if len(turns) % 2:
                    turns = turns[:-1]
                if not turns:
                    continue
                roles = ["user", "assistant"] * (len(turns) // 2)
                record = {"messages": [{"role": r, "content": c} for r, c in zip(roles, turns)]}
                (val if (len(train) + len(val)) % 10 == 9 else train).append(record)
    for path, records in [("data/chat/chatterbot-en-train.jsonl", train), ("data/chat/chatterbot-en-val.jsonl", val)]:
        with open(path, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        print(path, len(records))


if __name__ == "__main__":
    main(sys.argv[1])
