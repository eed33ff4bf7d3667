"""ft's training examples for torchtune, exactly as ft tokenizes and masks them.

Written beside torchtune.yaml by `ft recipe export --to torchtune`, which names these
components. Each line of a data file is {"segments": [{"label", "text"}]}: the pieces of text
ft tokenizes one at a time (the EOS included), each trained (label true) or masked. Run torchtune
from this folder so that the module imports: PYTHONPATH=. tune run ...
"""

import json

from tokenizers import Tokenizer
from torch.utils.data import ConcatDataset, Dataset

# torchtune's CROSS_ENTROPY_IGNORE_IDX: positions whose label carries no loss.
IGNORE = -100


class SegmentsTokenizer:
    """The model's tokenizer.json without added special tokens, as ft encodes each piece."""

    def __init__(self, path, pad_id, eos_id, max_seq_len):
        self.tokenizer = Tokenizer.from_file(path)
        self.pad_id = pad_id
        self.eos_id = eos_id
        self.max_seq_len = max_seq_len

    def encode(self, text, add_bos=False, add_eos=False):
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return ids + [self.eos_id] if add_eos else ids

    def decode(self, token_ids):
        return self.tokenizer.decode(token_ids)


class SegmentsDataset(Dataset):
    """One data file of segments: tokens and labels (the masked ones IGNORE), cut to the
    tokenizer's max_seq_len as ft cuts them."""

    def __init__(self, tokenizer, source):
        self.rows = []
        with open(source, encoding="utf-8") as f:
            for line in f:
                tokens, labels = [], []
                for segment in json.loads(line)["segments"]:
                    ids = tokenizer.encode(segment["text"])
                    tokens += ids
                    labels += ids if segment["label"] else [IGNORE] * len(ids)
                n = tokenizer.max_seq_len
                self.rows.append({"tokens": tokens[:n], "labels": labels[:n]})

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return self.rows[index]


def segments_dataset(tokenizer, sources):
    """Every file of `sources` (a list of paths) as one dataset."""
    return ConcatDataset([SegmentsDataset(tokenizer, s) for s in sources])
