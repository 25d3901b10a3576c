"""Locate, load and save FunASR Paraformer models in the ModelScope layout.

A model directory contains `config.yaml` (FunASR's model config), `model.pt` (the
state dict), `am.mvn` (global CMVN of the LFR features, Kaldi nnet text format),
`tokens.json` (the token list) and `configuration.json` (the role of each file for FunASR). Paraformer-large on ModelScope,
`iic/speech_paraformer-large_asr_nat-zh-cn-16k-common-vocab8404-pytorch`, and the demo
base model in `local/demo/base_model` share this layout and load through the same
code: `locate_pretrained` resolves a ModelScope id (downloading it) or a local
directory, and `load_paraformer` builds the model with `funasr.AutoModel.build_model`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

MODEL_FILES = ("config.yaml", "model.pt", "am.mvn", "tokens.json", "configuration.json")

CONFIGURATION_JSON = {
    "framework": "pytorch",
    "task": "auto-speech-recognition",
    "model": {"type": "funasr"},
    "pipeline": {"type": "funasr-pipeline"},
    "file_path_metas": {
        "init_param": "model.pt",
        "config": "config.yaml",
        "tokenizer_conf": {"token_list": "tokens.json"},
        "frontend_conf": {"cmvn_file": "am.mvn"},
    },
}


def missing_model_files(model_dir: Path) -> list[str]:
    """Return the files of the ModelScope layout that `model_dir` lacks."""
    return [name for name in MODEL_FILES if not (model_dir / name).is_file()]


def locate_pretrained(name_or_path: str, revision: str, link_dir: Path) -> Path:
    """Resolve a local model dir or a ModelScope id, and link its files into `link_dir`.

    A local directory must hold every file of the layout. Anything else is taken as a
    ModelScope id and downloaded with `modelscope.snapshot_download` into
    MODELSCOPE_CACHE. `link_dir` then contains symbolic links to the model's files, so
    later stages read one fixed place whatever the source was.
    """
    local = Path(name_or_path)
    if local.is_dir():
        source = local.resolve()
    elif local.exists() or name_or_path.startswith((".", "/")):
        raise FileNotFoundError(f"model directory not found: {name_or_path}")
    else:
        from modelscope import snapshot_download

        logger.info("downloading %s (revision %s) from ModelScope", name_or_path, revision)
        try:
            source = Path(snapshot_download(name_or_path, revision=revision))
        except Exception as error:  # modelscope raises many types for network and id errors
            raise RuntimeError(
                f"could not download {name_or_path!r} from ModelScope ({error}). "
                "Check the model id and the network, or set model.name_or_path to a local directory."
            ) from error

    missing = missing_model_files(source)
    if missing:
        raise FileNotFoundError(f"{source} is not a FunASR model directory: missing {', '.join(missing)}")

    if link_dir.exists() and link_dir.resolve() == source:
        logger.info("using the pretrained model in place: %s", source)
        return link_dir
    link_dir.mkdir(parents=True, exist_ok=True)
    names = [name for name in sorted(os.listdir(source)) if (source / name).is_file()]
    real_files = [name for name in names if (link_dir / name).exists() and not (link_dir / name).is_symlink()]
    if real_files:
        raise FileExistsError(
            f"model.dir {link_dir} contains files of its own ({', '.join(real_files)}); stage 2 only "
            "replaces links there. Point model.dir at an empty folder or at the model folder itself."
        )
    for name in names:
        target = link_dir / name
        if target.is_symlink():
            target.unlink()
        target.symlink_to(source / name)
    logger.info("pretrained model %s linked into %s", source, link_dir)
    return link_dir


def load_paraformer(model_dir: Path, device: str = "cpu", num_threads: int | None = None, **overrides):
    """Build a FunASR model from a model directory and load its weights.

    Returns `(model, kwargs)`, where kwargs carries FunASR's `tokenizer` and `frontend`.
    The model is on `device` and in eval mode. `overrides` replace config.yaml fields.
    """
    from funasr.auto.auto_model import AutoModel

    model_dir = Path(model_dir)
    missing = missing_model_files(model_dir)
    if missing:
        raise FileNotFoundError(f"{model_dir} is not a FunASR model directory: missing {', '.join(missing)}; run stage 2")
    build_args = dict(model=str(model_dir), device=device, disable_update=True, log_level="ERROR", **overrides)
    if num_threads is not None:
        build_args["ncpu"] = num_threads
    model, kwargs = AutoModel.build_model(**build_args)
    return model, kwargs


def resolve_device(device: str) -> str:
    """Map "auto" to "cuda" when a GPU is present, else "cpu"."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def save_model_dir(state_dict: dict, template_dir: Path, out_dir: Path, extra_files: dict[str, str] | None = None) -> Path:
    """Write a model directory: `template_dir`'s config, CMVN and tokens, plus new weights.

    The weights go through a temporary file and a rename. The other files are copied with
    links resolved, so the result is self-contained and loads with
    `funasr.AutoModel(model=out_dir)`.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    if Path(template_dir).resolve() != out_dir.resolve():
        for name in ("config.yaml", "am.mvn", "tokens.json"):
            shutil.copyfile(Path(template_dir) / name, out_dir / name)
        configuration = Path(template_dir) / "configuration.json"
        if configuration.is_file():
            shutil.copyfile(configuration, out_dir / "configuration.json")
    if not (out_dir / "configuration.json").is_file():
        write_configuration_json(out_dir)
    for name, text in (extra_files or {}).items():
        (out_dir / name).write_text(text, encoding="utf-8")

    tmp = out_dir / "model.pt.tmp"
    torch.save({key: value.detach().cpu().contiguous() for key, value in state_dict.items()}, tmp)
    os.replace(tmp, out_dir / "model.pt")
    return out_dir


def write_configuration_json(model_dir: Path) -> None:
    """Write configuration.json, which maps each file of the directory to its role for FunASR."""
    text = json.dumps(CONFIGURATION_JSON, indent=2) + "\n"
    (model_dir / "configuration.json").write_text(text, encoding="utf-8")


def write_am_mvn(path: Path, mean: torch.Tensor, std: torch.Tensor) -> None:
    """Write a global CMVN in the Kaldi nnet text format FunASR's `load_cmvn` reads.

    FunASR applies it as `(x + shift) * scale`, so shift = -mean and scale = 1 / std.
    """
    dim = mean.numel()
    shift = " ".join(f"{value:.6f}" for value in (-mean).tolist())
    scale = " ".join(f"{value:.6f}" for value in (1.0 / std).tolist())
    text = (
        "<Nnet>\n"
        f"<Splice> {dim} {dim}\n[ 0 ]\n"
        f"<AddShift> {dim} {dim}\n<LearnRateCoef> 0 [ {shift} ]\n"
        f"<Rescale> {dim} {dim}\n<LearnRateCoef> 0 [ {scale} ]\n"
        "</Nnet>\n"
    )
    path.write_text(text, encoding="utf-8")
