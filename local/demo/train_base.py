#!/usr/bin/env python3
"""Train the demo base model: a small Paraformer on the Mandarin half of the demo corpus.

This is run once by the maintainers, not by the recipe: the result is shipped in
local/demo/base_model (ModelScope layout) because training takes longer than the
demo's time budget. The exact command that made the shipped model:

    python local/demo/make_corpus.py --out-dir data/local/demo_base \
        --sets cmn_train,cmn_dev,cmn_test,sc_test
    python local/demo/train_base.py --corpus-dir data/local/demo_base \
        --out-dir local/demo/base_model --minutes 40 --epochs 10

The model directory gets `base_model_info.json`: the sha256 of config.yaml and
tokens.json, the training command, and the test CERs, which
tests/test_base_model.py checks against the shipped files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from sparlora.data import AsrDataset, ManifestEntry, extract_features, num_fbank_frames  # noqa: E402
from sparlora.audio import audio_info, load_audio  # noqa: E402
from sparlora.decode import decode_dataset  # noqa: E402
from sparlora.kaldi_io import read_table  # noqa: E402
from sparlora.model import save_model_dir, write_am_mvn, write_configuration_json  # noqa: E402
from sparlora.score import cer_counts  # noqa: E402
from sparlora.text import TextNormConfig  # noqa: E402
from sparlora.train import TrainOptions, seed_everything, train_model  # noqa: E402

logger = logging.getLogger("train_base")
CONFIG_TEMPLATE = ROOT / "local" / "demo" / "conf" / "base_model.yaml"


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def kaldi_entries(set_dir: Path) -> list[ManifestEntry]:
    """Manifest entries of a demo set (whole recordings, no segments)."""
    wavs = dict(read_table(set_dir / "wav.scp"))
    entries = []
    for key, text in read_table(set_dir / "text"):
        duration = audio_info(wavs[key]).duration
        entries.append(ManifestEntry(key, wavs[key], text, num_fbank_frames(duration), len(text)))
    return entries


def compute_cmvn(frontend_conf: dict, entries: list[ManifestEntry], max_utts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of LFR features over the first `max_utts` utterances."""
    from funasr.frontends.wav_frontend import WavFrontend

    frontend = WavFrontend(cmvn_file=None, **frontend_conf)
    total = None
    for entry in entries[:max_utts]:
        feats = extract_features(frontend, torch.from_numpy(load_audio(entry.source))).double()
        stats = torch.stack([feats.sum(0), (feats ** 2).sum(0), torch.full_like(feats[0], feats.shape[0])])
        total = stats if total is None else total + stats
    mean = total[0] / total[2]
    std = (total[1] / total[2] - mean ** 2).clamp_min(1e-8).sqrt()
    return mean.float(), std.float()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus-dir", type=Path, required=True, help="output of make_corpus.py with cmn_train, cmn_dev, cmn_test, sc_test")
    parser.add_argument("--out-dir", type=Path, required=True, help="model directory to write")
    parser.add_argument("--minutes", type=float, default=12.0, help="training time budget")
    parser.add_argument("--epochs", type=int, default=8, help="epochs of the cosine schedule")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s [%(name)s] %(message)s")
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)

    from funasr.auto.auto_model import AutoModel
    from omegaconf import OmegaConf

    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(CONFIG_TEMPLATE, out / "config.yaml")
    shutil.copyfile(args.corpus_dir / "tokens.json", out / "tokens.json")
    write_configuration_json(out)
    (out / "model.pt").unlink(missing_ok=True)

    train_entries = kaldi_entries(args.corpus_dir / "cmn_train")
    frontend_conf = OmegaConf.to_container(OmegaConf.load(CONFIG_TEMPLATE).frontend_conf)
    mean, std = compute_cmvn(frontend_conf, train_entries, max_utts=2000)
    write_am_mvn(out / "am.mvn", mean, std)

    # No model.pt yet: FunASR builds the model with random weights.
    model, kwargs = AutoModel.build_model(model=str(out), device="cpu", disable_update=True, ncpu=args.threads, log_level="ERROR")
    parameters = sum(p.numel() for p in model.parameters())
    logger.info("Paraformer with %.2f M parameters", parameters / 1e6)
    frontend, tokenizer = kwargs["frontend"], kwargs["tokenizer"]

    make_set = lambda entries: AsrDataset(entries, frontend, tokenizer, 16000, "mean")  # noqa: E731
    train_set = make_set(train_entries)
    dev_set = make_set(kaldi_entries(args.corpus_dir / "cmn_dev"))
    opts = TrainOptions(epochs=args.epochs, lr_max=2e-3, lr_min=1e-5, warmup_steps=300, weight_decay=0.01,
                        grad_clip=5.0, max_frames_per_batch=2400, seed=args.seed, log_interval=100, max_minutes=args.minutes)
    started = time.perf_counter()
    history = train_model(model, train_set, dev_set, opts, Path("exp/demo_base_training"), tokenizer, frontend)
    minutes = (time.perf_counter() - started) / 60

    save_model_dir(model.state_dict(), out, out)
    cers = {}
    for name in ("cmn_test", "sc_test"):
        test_set = make_set(kaldi_entries(args.corpus_dir / name))
        hyps = decode_dataset(model, test_set, tokenizer, frontend, batch_size=32, device="cpu")
        refs = {e.key: e.target for e in test_set.entries}
        cers[name] = round(100 * cer_counts(refs, hyps, TextNormConfig()).cer, 2)
        logger.info("%s CER %.2f%%", name, cers[name])

    info = {
        "command": "python local/demo/train_base.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "parameters": parameters,
        "training_minutes": round(minutes, 1),
        "epochs_run": len(history),
        "history": history,
        "config_sha256": sha256_of(out / "config.yaml"),
        "tokens_sha256": sha256_of(out / "tokens.json"),
        "test_cer_percent": cers,
    }
    (out / "base_model_info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    logger.info("base model written to %s", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
