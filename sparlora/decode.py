"""Stage 4: decode test sets with the Paraformer's own non-autoregressive search.

Features come from `sparlora.data.extract_features` (the training path), batches are
decoded with `Paraformer.inference(..., data_type="fbank")`: encoder, CIF predictor,
then one decoder pass and an argmax per predicted token. Hypotheses are written as a
Kaldi table `decode_<set>/hyp` (`uttid text`, text may be empty) beside `ref`, for every
test set of `corpus.test_splits` and each noisy copy that `noise.test` configures, with
the base model into `<exp_root>/base/` and with the fine-tuned model (`decode.checkpoint`:
the merged final or last weights, or the base model with stage 3's PEFT adapter unmerged)
into the experiment folder. `decode_<set>/fingerprint` records the
model file, the manifest and the decoding settings, and a rerun skips a test set whose
fingerprint is unchanged.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm

from sparlora.data import FRAME_SHIFT_SECONDS, AsrDataset, collate, read_manifest
from sparlora.kaldi_io import write_table
from sparlora.noise import decode_split_names

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def torch_threads(count: int):
    """Run the block with `count` torch intra-op threads, then restore the previous count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def zero_padded_frames(module, inputs, output):
    """Set the encoder output to 0 at padded frames; a forward hook for the Paraformer encoder.

    FunASR's CifPredictorV2 (funasr 1.4.16) runs a width-3 Conv1d over the encoder output
    before it applies the mask. At the last real frame of a short utterance the
    convolution therefore reads the encoder output at the first padded frame, where a
    one-utterance batch has the predictor's own zero padding. Without this hook the CIF
    weights, and so the transcript, of an utterance depend on the other utterances of its
    batch: on the demo base model, 2 of 100 sc_test transcripts changed between batch
    size 1 and 16. With it, batched decoding gives the transcripts of one-utterance
    decoding.
    """
    encoder_out, lengths = output[0], output[1]
    if not isinstance(encoder_out, torch.Tensor) or lengths is None:
        return output
    valid = torch.arange(encoder_out.shape[1], device=encoder_out.device)[None, :] < lengths.view(-1, 1)
    return (encoder_out * valid.unsqueeze(-1).to(encoder_out.dtype), *output[1:])


@torch.no_grad()
def decode_dataset(model, dataset: AsrDataset, tokenizer, frontend, batch_size: int, device: str, progress: bool = True) -> dict[str, str]:
    """Decode every utterance of `dataset`; return utterance id -> hypothesis text.

    Utterances are decoded in batches of similar length. Features are computed with one
    torch thread: FunASR's frontend runs many small tensor operations, which on a 2-core
    CPU ran about twice as slowly with 2 intra-op threads as with 1.
    """
    was_training = model.training
    model.eval()
    order = sorted(range(len(dataset)), key=lambda i: dataset.entries[i].source_len)
    batches = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    hyps: dict[str, str] = {}
    hook = model.encoder.register_forward_hook(zero_padded_frames)
    try:
        for batch_indices in tqdm(batches, desc="decode", disable=None if progress else True, leave=False):
            with torch_threads(1):
                batch = collate([dataset[i] for i in batch_indices])
            # Paraformer.inference squeezes the last axis of the lengths, so lengths of
            # shape [batch] would become a 0-d tensor for a one-utterance batch and fail.
            results = model.inference(
                batch["speech"].to(device),
                batch["speech_lengths"].unsqueeze(-1).to(device),
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
    finally:
        hook.remove()
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

    checkpoint = str(cfg.decode.checkpoint)
    if checkpoint not in ("final", "last", "adapter", "base"):
        raise ValueError(f"invalid decode.checkpoint {checkpoint!r}: expected final, last, adapter or base")
    manifests = {str(name): data_dir / str(name) / "data.jsonl" for name in decode_split_names(cfg)}
    missing = [str(path) for path in manifests.values() if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"test manifests not found: {', '.join(missing)}; run stage 2 first")

    # The base model's zero-shot decodes are shared by every experiment of a corpus. Each
    # test set, the extra ones added later (noisy copies, for example) included, is
    # decoded again only when the model, its manifest or a decoding setting changed.
    # Each model: (model dir, output folder, PEFT adapter dir to apply or None).
    models = {"base": (Path(cfg.model.dir), Path(cfg.exp_root) / "base", None)}
    if checkpoint == "adapter":
        adapter_dir = Path(cfg.exp_dir) / "adapter"
        if not (adapter_dir / "adapter_config.json").is_file():
            raise FileNotFoundError(f"adapter not found: {adapter_dir / 'adapter_config.json'}; decode.checkpoint=adapter "
                                    "needs the PEFT adapter that stage 3 writes for LoRA-family methods; run stage 3, "
                                    "or use decode.checkpoint=final (full fine-tuning writes no adapter)")
        logger.info("decoding with the adapter %s on %s", adapter_dir, cfg.model.dir)
        models["finetuned"] = (Path(cfg.model.dir), Path(cfg.exp_dir), adapter_dir)
    elif checkpoint != "base":
        # last_model exists only when stage 3 averaged checkpoints into final_model.
        last_dir = Path(cfg.exp_dir) / "last_model"
        chosen = last_dir if checkpoint == "last" and last_dir.is_dir() else Path(cfg.exp_dir) / "final_model"
        logger.info("decoding with %s", chosen)
        models["finetuned"] = (chosen, Path(cfg.exp_dir), None)
    settings = f"sample_rate={cfg.audio.sample_rate} channel={cfg.audio.channel} batch_size={cfg.decode.batch_size} device={device}"
    for label, (model_dir, exp_dir, adapter_dir) in models.items():
        if not (model_dir / "model.pt").is_file():
            raise FileNotFoundError(f"model not found: {model_dir / 'model.pt'}; run stage {2 if label == 'base' else 3} first")
        weight_files = [model_dir / "model.pt"]
        if adapter_dir is not None:
            weight_files += [adapter_dir / "adapter_config.json", *sorted(adapter_dir.glob("adapter_model.*"))]
        pending = {}
        for name, manifest in manifests.items():
            out_dir = exp_dir / f"decode_{name}"
            fingerprint = decode_fingerprint(weight_files, [manifest], settings)
            stamp = out_dir / "fingerprint"
            if (out_dir / "hyp").is_file() and stamp.is_file() and stamp.read_text(encoding="utf-8") == fingerprint:
                logger.info("%s decode of %s in %s is up to date", label, name, out_dir)
            else:
                pending[name] = fingerprint
        if not pending:
            continue

        model, kwargs = load_paraformer(model_dir, device=device, num_threads=cfg.train.num_threads)
        if adapter_dir is not None:
            from sparlora.adapters import load_adapter

            model = load_adapter(model, adapter_dir)
        for name, fingerprint in pending.items():
            out_dir = exp_dir / f"decode_{name}"
            logger.info("decoding %s with the %s model %s%s", name, label, model_dir,
                        f" and the adapter {adapter_dir}" if adapter_dir is not None else "")
            decode_manifest(model, kwargs, manifests[name], out_dir,
                            cfg.decode.batch_size, device, cfg.audio.sample_rate, cfg.audio.channel)
            (out_dir / "fingerprint").write_text(fingerprint, encoding="utf-8")
    return 0


def decode_fingerprint(weight_files: list[Path], manifests: list[Path], settings: str) -> str:
    """Return a string that changes when a weight file, a test manifest or a decoding setting changes."""
    parts = [settings]
    for path in [*weight_files, *manifests]:
        stat = path.resolve().stat()
        parts.append(f"{path.resolve()} {stat.st_size} {stat.st_mtime_ns}")
    return "\n".join(parts) + "\n"


def decoded_weight_files(fingerprint: Path) -> list[Path]:
    """Return the weight files that a stage 4 decode used, from its `fingerprint` file.

    The file starts with the settings line, then one `path size mtime` line per weight
    file and manifest, as `decode_fingerprint` writes them. Manifests are the `data.jsonl` lines.
    """
    lines = fingerprint.read_text(encoding="utf-8").splitlines()[1:]
    paths = [Path(line.rsplit(" ", 2)[0]) for line in lines if line.count(" ") >= 2]
    return [path for path in paths if path.name != "data.jsonl"]


def is_final_model_decode(weight_files: Sequence[Path], exp_dir: Path) -> bool:
    """True when `weight_files` (of `decoded_weight_files`) are the run's own final_model/model.pt.

    Compared by the last three path parts, so a run folder that was moved or copied with
    its experiment root still matches.
    """
    return len(weight_files) == 1 and weight_files[0].parts[-3:] == (exp_dir.name, "final_model", "model.pt")


if __name__ == "__main__":
    from sparlora.config import run_main

    raise SystemExit(run_main(main))
