"""Check, and optionally copy, the fine-tuned model that stage 3 exported.

Usage: python -m sparlora.export --config conf/demo.yaml [--out DIR] [--utterances N] [overrides...]

Stage 3 writes two exports into the experiment folder:

- `final_model/`: the adapters merged into the weights, as a FunASR model directory
  (config.yaml, model.pt, am.mvn, tokens.json, configuration.json) that
  `funasr.AutoModel(model=DIR)` loads without this project;
- `adapter/` (LoRA-family methods only): the adapter alone in PEFT format, for the
  original pretrained weights. For PiSSA, OLoRA and residual SPaRLoRA it is the
  converted rank-2r adapter of `sparlora.adapters.save_adapter_for_original_base`.

This module checks both on the first N utterances of the first test set. It decodes
them with `funasr.AutoModel` from the model directory alone and compares the
transcripts with stage 4's `decode_<set>/hyp`. It loads the original base model with
`peft.PeftModel.from_pretrained` and the adapter, and compares its transcripts and
encoder outputs with the merged model of the last weights (`last_model/` when
final_model is an average of epochs). The outcome goes to `<exp_dir>/export_check.txt`.
A failed check ends the command with exit status 1. With `--out DIR`, the model directory
is first copied to DIR with links resolved, and the copy is checked.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from sparlora.data import AsrDataset, ManifestEntry, read_manifest
from sparlora.decode import decode_dataset, decoded_weight_files, is_final_model_decode
from sparlora.kaldi_io import atomic_write_text, read_table
from sparlora.model import MODEL_FILES, missing_model_files

logger = logging.getLogger(__name__)

# Max relative difference allowed between the encoder outputs of the merged model and of
# the base model with the adapter, max |merged - adapted| / max |merged|. Merging reorders
# float32 sums: on the demo model (6 encoder blocks, 2-epoch runs) the ratio was below 1e-5.
ENCODER_TOLERANCE = 1e-4


@dataclass
class AdapterCheck:
    """Base model plus adapter against the merged model, on the same utterances."""

    transcripts_equal: int
    utterances: int
    max_encoder_difference: float  # max |merged - adapted| / max |merged| over all utterances
    differing_keys: list[str]

    @property
    def passed(self) -> bool:
        return self.transcripts_equal == self.utterances and self.max_encoder_difference <= ENCODER_TOLERANCE


# Written into every copy made by `copy_model_dir`, so that a later export may replace it.
EXPORT_MARKER = "export_source.txt"


def check_out_dir(dst: Path) -> None:
    """Raise ValueError unless `dst` is new, empty, or an earlier copy made by `copy_model_dir`.

    Anything else, such as the pretrained model dir, an experiment folder or another run's
    final_model, would have files replaced that the recipe still needs.
    """
    if not dst.exists() and not dst.is_symlink():
        return
    if not dst.is_dir() or dst.is_symlink():
        raise ValueError(f"--out {dst} exists and is not a plain folder; give a new or empty folder")
    if any(dst.iterdir()) and not (dst / EXPORT_MARKER).is_file():
        raise ValueError(f"--out {dst} is not empty and is not an earlier export (no {EXPORT_MARKER}); "
                         "give a new or empty folder, so no model, experiment or corpus file is replaced")


def copy_model_dir(src: Path, dst: Path) -> Path:
    """Copy the files of a FunASR model directory to `dst`, links resolved; return `dst`.

    `dst` must pass `check_out_dir`. Each file is written to a temporary name and renamed,
    so a link already at the destination is replaced, not written through.
    """
    missing = missing_model_files(src)
    if missing:
        raise FileNotFoundError(f"{src} is not a FunASR model directory: missing {', '.join(missing)}; run stage 3")
    if dst.resolve() == src.resolve():
        return dst
    check_out_dir(dst)
    dst.mkdir(parents=True, exist_ok=True)
    # The marker goes first, so a copy that fails halfway can be rerun into the same folder.
    atomic_write_text(dst / EXPORT_MARKER, f"copied by python -m sparlora.export from {src.resolve()}\n")
    for name in MODEL_FILES:
        partial = dst / f".{name}.partial"
        shutil.copyfile(src / name, partial)
        os.replace(partial, dst / name)
    return dst


def check_decoded_with_final_model(decode_dir: Path, final_dir: Path) -> None:
    """Raise RuntimeError when stage 4's decode in `decode_dir` did not use `final_dir`'s weights.

    `decode.checkpoint=last` or `adapter` writes into the same folder, and those
    transcripts need not equal final_model's. A decode without a fingerprint (written
    before fingerprints existed) is accepted.
    """
    fingerprint = decode_dir / "fingerprint"
    if not fingerprint.is_file():
        logger.warning("%s has no fingerprint, so the weights that stage 4 used are not known; assuming final_model", decode_dir)
        return
    used = decoded_weight_files(fingerprint)
    if not is_final_model_decode(used, final_dir.parent):
        raise RuntimeError(f"stage 4's decode in {decode_dir} used {', '.join(map(str, used)) or 'unknown weights'}, "
                           f"not {final_dir / 'model.pt'}; run stage 4 with decode.checkpoint=final, then this check")


def merged_last_weights(exp_dir: Path, model_dir: Path) -> Path:
    """Return the merged model dir with the last weights, which the adapter must reproduce.

    The adapter contains the last weights. With `train.average_best` > 0, final_model is an
    average of epochs (it then has averaged_checkpoints.json) and the last weights are in
    `last_model/`; otherwise final_model (or its copy `model_dir`) has them.
    """
    if not (exp_dir / "final_model" / "averaged_checkpoints.json").is_file():
        return model_dir
    last_dir = exp_dir / "last_model"
    missing = missing_model_files(last_dir)
    if missing:
        raise FileNotFoundError(f"{exp_dir / 'final_model'} is an average of epochs, so the adapter is checked against "
                                f"{last_dir}, which lacks {', '.join(missing)}; run stage 3 again")
    return last_dir


def automodel_transcripts(model_dir: Path, waveforms: Sequence, device: str = "cpu") -> list[str]:
    """Decode waveforms (16 kHz mono float arrays) with `funasr.AutoModel` built from `model_dir` alone.

    One utterance per batch: funasr 1.4.16's `AutoModel.inference` returns a single
    result for a whole batch in which no token fires, which would misalign the others.
    """
    from funasr import AutoModel

    model = AutoModel(model=str(model_dir), device=device, disable_update=True, disable_pbar=True, log_level="ERROR")
    results = model.generate(input=list(waveforms), batch_size=1, disable_pbar=True)
    if len(results) != len(waveforms):
        raise RuntimeError(f"funasr.AutoModel returned {len(results)} results for {len(waveforms)} utterances")
    return [result.get("text", "") for result in results]


@torch.no_grad()
def encoder_outputs(model, dataset: AsrDataset) -> list[torch.Tensor]:
    """Return the encoder output of each utterance of `dataset`, one utterance per forward."""
    was_training = model.training
    model.eval()
    outputs = []
    for index in range(len(dataset)):
        feats = dataset.features(index)
        encoded, lengths = model.encode(feats.unsqueeze(0), torch.tensor([feats.shape[0]]))
        if isinstance(encoded, tuple):
            encoded = encoded[0]
        outputs.append(encoded[0, : int(lengths[0])].clone())
    model.train(was_training)
    return outputs


def check_adapter(base_dir: Path, adapter_dir: Path, merged_dir: Path, entries: Sequence[ManifestEntry],
                  sample_rate: int, channel, batch_size: int = 16, device: str = "cpu") -> AdapterCheck:
    """Compare the base model with the PEFT adapter applied against the merged model on `entries`."""
    from sparlora.adapters import load_adapter
    from sparlora.model import load_paraformer

    merged, kwargs = load_paraformer(merged_dir, device=device)
    base, _ = load_paraformer(base_dir, device=device)
    adapted = load_adapter(base, adapter_dir)

    dataset = AsrDataset(entries, kwargs["frontend"], kwargs["tokenizer"], sample_rate, channel)
    merged_hyps = decode_dataset(merged, dataset, kwargs["tokenizer"], kwargs["frontend"], batch_size, device, progress=False)
    adapted_hyps = decode_dataset(adapted, dataset, kwargs["tokenizer"], kwargs["frontend"], batch_size, device, progress=False)
    differing = [entry.key for entry in entries if merged_hyps[entry.key] != adapted_hyps[entry.key]]

    largest_difference = largest_value = 0.0
    for ours, theirs in zip(encoder_outputs(merged, dataset), encoder_outputs(adapted.get_base_model(), dataset)):
        largest_difference = max(largest_difference, float((ours - theirs).abs().max()))
        largest_value = max(largest_value, float(ours.abs().max()))
    relative = largest_difference / largest_value if largest_value > 0 else largest_difference
    return AdapterCheck(len(entries) - len(differing), len(entries), relative, differing)


def main(argv: Sequence[str] | None = None) -> int:
    from sparlora.audio import load_audio
    from sparlora.config import load_config, setup_logging
    from sparlora.model import resolve_device

    parser = argparse.ArgumentParser(description="Check the merged model and the adapter that stage 3 exported.")
    parser.add_argument("--config", required=True, help="recipe config, e.g. conf/demo.yaml")
    parser.add_argument("--out", help="copy the merged model directory here first and check the copy")
    parser.add_argument("--utterances", type=int, default=20, help="utterances of the first test set to decode (default: 20)")
    parser.add_argument("overrides", nargs="*", help="hydra overrides, e.g. method=lora")
    args = parser.parse_args(argv)
    if args.utterances < 1:
        parser.error(f"invalid --utterances {args.utterances}: expected 1 or more")
    setup_logging()
    cfg = load_config(args.config, args.overrides)
    device = resolve_device(cfg.decode.device)

    exp_dir = Path(cfg.exp_dir)
    test_set = str(cfg.corpus.test_splits[0])
    hyp_path = exp_dir / f"decode_{test_set}" / "hyp"
    if not hyp_path.is_file():
        raise FileNotFoundError(f"stage 4 hypotheses not found: {hyp_path}; run stage 4 first")
    check_decoded_with_final_model(hyp_path.parent, exp_dir / "final_model")
    model_dir = copy_model_dir(exp_dir / "final_model", Path(args.out) if args.out else exp_dir / "final_model")
    stage4 = dict(read_table(hyp_path))
    all_entries = read_manifest(Path(cfg.data_dir) / test_set / "data.jsonl")
    entries = all_entries[: args.utterances]
    if len(all_entries) < args.utterances:
        logger.info("--utterances %d, but %s has %d: checking all of them", args.utterances, test_set, len(all_entries))

    waveforms = [load_audio(entry.source, entry.start, entry.end, sample_rate=cfg.audio.sample_rate, channel=cfg.audio.channel)
                 for entry in entries]
    texts = automodel_transcripts(model_dir, waveforms, device)
    differing = [entry.key for entry, text in zip(entries, texts) if stage4.get(entry.key) != text]
    lines = [
        f"model dir: {model_dir}",
        f"funasr.AutoModel transcripts equal to stage 4 ({hyp_path}): {len(entries) - len(differing)} of {len(entries)}",
    ]
    if differing:
        lines.append(f"  differing utterances: {' '.join(differing)}")
    passed = not differing

    adapter_dir = exp_dir / "adapter"
    if (adapter_dir / "adapter_config.json").is_file():
        merged_dir = merged_last_weights(exp_dir, model_dir)
        check = check_adapter(Path(cfg.model.dir), adapter_dir, merged_dir, entries, cfg.audio.sample_rate,
                              cfg.audio.channel, cfg.decode.batch_size, device)
        lines.append(f"adapter {adapter_dir} on the base model {cfg.model.dir}: transcripts equal to the merged model "
                     f"{merged_dir}: "
                     f"{check.transcripts_equal} of {check.utterances}; max relative encoder output difference "
                     f"{check.max_encoder_difference:.2e} (allowed {ENCODER_TOLERANCE:.0e})")
        if check.differing_keys:
            lines.append(f"  differing utterances: {' '.join(check.differing_keys)}")
        passed = passed and check.passed
    else:
        lines.append(f"adapter: none in {exp_dir} (method {cfg.method.name} writes no PEFT adapter)")

    lines.append(f"result: {'passed' if passed else 'FAILED'}")
    report = exp_dir / "export_check.txt"
    atomic_write_text(report, "\n".join(lines) + "\n")
    for line in lines:
        logger.info("%s", line)
    if not passed:
        raise RuntimeError(f"export check failed; see {report}")
    return 0


if __name__ == "__main__":
    from sparlora.config import run_main

    raise SystemExit(run_main(main))
