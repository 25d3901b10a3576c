"""Stage 4: decode test sets with the Paraformer's own non-autoregressive search.

Features come from `sparlora.data.extract_features` (the training path), batches are
decoded with `Paraformer.inference(..., data_type="fbank")`: encoder, CIF predictor,
then one decoder pass and an argmax per predicted token. Hypotheses are written as a
Kaldi table `decode_<set>/hyp` (`uttid text`, text may be empty) beside `ref`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from tqdm import tqdm

from sparlora.data import FRAME_SHIFT_SECONDS, AsrDataset, collate, read_manifest
from sparlora.kaldi_io import write_table

logger = logging.getLogger(__name__)


@torch.no_grad()
def decode_dataset(model, dataset: AsrDataset, tokenizer, frontend, batch_size: int, device: str, progress: bool = True) -> dict[str, str]:
    """Decode every utterance of `dataset`; return utterance id -> hypothesis text."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(dataset)), key=lambda i: dataset.entries[i].source_len)
    batches = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    hyps: dict[str, str] = {}
    for batch_indices in tqdm(batches, desc="decode", disable=not progress, leave=False):
        batch = collate([dataset[i] for i in batch_indices])
        results = model.inference(
            batch["speech"].to(device),
            batch["speech_lengths"].to(device),
            key=batch["keys"],
            tokenizer=tokenizer,
            frontend=frontend,
            data_type="fbank",
            device=device,
        )
        # Paraformer.inference returns a bare empty list when the CIF predictor fires
        # no token in the whole batch: every hypothesis is then empty.
        decoded = {item["key"]: item["text"] for item in results[0]} if results else {}
        for key in batch["keys"]:
            hyps[key] = decoded.get(key, "")
    model.train(was_training)
    return hyps


def decode_manifest(model, kwargs: dict, manifest: Path, out_dir: Path, batch_size: int, device: str, sample_rate: int, channel) -> dict:
    """Decode one manifest into `out_dir/hyp` and `out_dir/ref`; return timing figures."""
    entries = read_manifest(manifest)
    dataset = AsrDataset(entries, kwargs["frontend"], kwargs["tokenizer"], sample_rate, channel, cache=False)
    audio_seconds = sum(entry.source_len for entry in entries) * FRAME_SHIFT_SECONDS

    start = time.perf_counter()
    hyps = decode_dataset(model, dataset, kwargs["tokenizer"], kwargs["frontend"], batch_size, device)
    elapsed = time.perf_counter() - start

    out_dir.mkdir(parents=True, exist_ok=True)
    write_table(out_dir / "hyp", [(entry.key, hyps[entry.key]) for entry in entries])
    write_table(out_dir / "ref", [(entry.key, entry.target) for entry in entries])
    rtf = elapsed / audio_seconds if audio_seconds > 0 else float("nan")
    logger.info("decoded %d utterances (%.1f s of audio) in %.1f s, real-time factor %.3f", len(entries), audio_seconds, elapsed, rtf)
    return {"utterances": len(entries), "audio_seconds": audio_seconds, "decode_seconds": elapsed, "rtf": rtf}


def main(argv=None) -> int:
    from sparlora.config import parse_stage_args
    from sparlora.model import load_paraformer, resolve_device

    cfg = parse_stage_args("Stage 4: decode the test sets with the base and the fine-tuned model.", argv)
    device = resolve_device(cfg.decode.device)
    torch.set_num_threads(cfg.train.num_threads)
    data_dir = Path(cfg.data_dir)

    # The base model's zero-shot decode is shared by every experiment of a corpus and is
    # reused while the model and the test manifests stay the same.
    models = {"base": (Path(cfg.model.dir), Path(cfg.exp_root) / "base")}
    if cfg.decode.checkpoint != "base":
        models["finetuned"] = (Path(cfg.exp_dir) / "final_model", Path(cfg.exp_dir))
    for label, (model_dir, exp_dir) in models.items():
        if not (model_dir / "model.pt").is_file():
            raise FileNotFoundError(f"model not found: {model_dir / 'model.pt'}; run stage {2 if label == 'base' else 3} first")
        manifests = [data_dir / name / "data.jsonl" for name in cfg.corpus.test_splits]
        missing = [str(path) for path in manifests if not path.is_file()]
        if missing:
            raise FileNotFoundError(f"test manifests not found: {', '.join(missing)}; run stage 2 first")
        settings = f"sample_rate={cfg.audio.sample_rate} channel={cfg.audio.channel} batch_size={cfg.decode.batch_size} device={device}"
        fingerprint = decode_fingerprint(model_dir / "model.pt", manifests, settings)
        stamp = exp_dir / "decode_fingerprint"
        if label == "base" and stamp.is_file() and stamp.read_text(encoding="utf-8") == fingerprint:
            logger.info("base model decodes in %s are up to date", exp_dir)
            continue
        model, kwargs = load_paraformer(model_dir, device=device, num_threads=cfg.train.num_threads)
        for name, manifest in zip(cfg.corpus.test_splits, manifests):
            logger.info("decoding %s with the %s model %s", name, label, model_dir)
            decode_manifest(model, kwargs, manifest, exp_dir / f"decode_{name}",
                            cfg.decode.batch_size, device, cfg.audio.sample_rate, cfg.audio.channel)
        stamp.write_text(fingerprint, encoding="utf-8")
    return 0


def decode_fingerprint(model_file: Path, manifests: list[Path], settings: str) -> str:
    """Return a string that changes when the model file, a test manifest or a decoding setting changes."""
    parts = [settings]
    for path in [model_file, *manifests]:
        stat = path.resolve().stat()
        parts.append(f"{path.resolve()} {stat.st_size} {stat.st_mtime_ns}")
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    from sparlora.config import run_main

    raise SystemExit(run_main(main))
