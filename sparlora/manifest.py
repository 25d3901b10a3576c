"""Stage 2: locate the pretrained Paraformer and write a jsonl manifest per split.

The model comes from `model.name_or_path` (a ModelScope id or a local directory in
the same layout) and is linked into `model.dir`. Each prepared split then gets
`data.jsonl` (see `sparlora.data`), whose targets are the stage-1 normalized text.
Characters missing from the model's tokens.json map to `<unk>` in training. This stage
logs their count per split, and stage 1 lists them in oov.txt.
"""

from __future__ import annotations

import logging
from pathlib import Path

from sparlora.data import FRAME_SHIFT_SECONDS, ManifestEntry, num_fbank_frames, write_manifest
from sparlora.kaldi_io import read_token_list
from sparlora.splits import prepared_split_names

logger = logging.getLogger(__name__)


def build_manifest(data_dir: Path, vocabulary: set[str] | None) -> tuple[list[ManifestEntry], int]:
    """Return the manifest entries of a prepared split and its count of `<unk>` characters."""
    from sparlora.prepare import read_data_dir

    entries, unknown = [], 0
    for utt in read_data_dir(data_dir):
        characters = [c for c in utt.text if not c.isspace()]
        if vocabulary is not None:
            unknown += sum(1 for c in characters if c not in vocabulary)
        entries.append(ManifestEntry(
            key=utt.id, source=utt.source, target=utt.text,
            source_len=num_fbank_frames(utt.duration), target_len=len(characters),
            start=utt.start, end=utt.end,
        ))
    return entries, unknown


def main(argv=None) -> int:
    from sparlora.config import parse_stage_args
    from sparlora.model import locate_pretrained

    cfg = parse_stage_args("Stage 2: locate the pretrained model and write the jsonl manifests.", argv)
    model_dir = locate_pretrained(str(cfg.model.name_or_path), str(cfg.model.revision), Path(cfg.model.dir))
    vocabulary = set(read_token_list(model_dir / "tokens.json"))

    for split in prepared_split_names(cfg):
        split_dir = Path(cfg.data_dir) / split
        entries, unknown = build_manifest(split_dir, vocabulary)
        if not entries:
            raise ValueError(f"{split_dir} has no utterances; rerun stages 0 and 1")
        write_manifest(split_dir / "data.jsonl", entries)
        hours = sum(e.source_len for e in entries) * FRAME_SHIFT_SECONDS / 3600
        logger.info("%s: %d utterances, %.2f hours, %d characters outside tokens.json (mapped to <unk>)",
                    split, len(entries), hours, unknown)
    return 0


if __name__ == "__main__":
    from sparlora.config import run_main

    raise SystemExit(run_main(main))
