"""Training and decoding see the same features as FunASR's own inference path."""

from __future__ import annotations

import numpy as np
import soundfile
import torch

from sparlora.audio import load_audio
from sparlora.data import AsrDataset, ManifestEntry, extract_features
from sparlora.model import load_paraformer


def one_second_wav(path):
    t = np.arange(16000) / 16000
    signal = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.01 * np.random.default_rng(0).standard_normal(16000)
    soundfile.write(path, signal.astype(np.float32), 16000)
    return path


def test_feature_shape_one_second(tiny_model_dir, tmp_path):
    _, kwargs = load_paraformer(tiny_model_dir)
    feats = extract_features(kwargs["frontend"], torch.from_numpy(load_audio(str(one_second_wav(tmp_path / "a.wav")))))
    # 98 fbank frames of 25 ms every 10 ms, LFR with m=7, n=6: ceil(98 / 6) = 17 frames of 7 x 80 dims.
    assert tuple(feats.shape) == (17, 560)


def test_training_path_equals_funasr_inference_path(tiny_model_dir, tmp_path):
    from funasr.utils.load_utils import extract_fbank, load_audio_text_image_video

    _, kwargs = load_paraformer(tiny_model_dir)
    frontend = kwargs["frontend"]
    wav = one_second_wav(tmp_path / "a.wav")

    dataset = AsrDataset([ManifestEntry("a", str(wav), "今天", 100, 2)], frontend, kwargs["tokenizer"], 16000, "mean")
    ours = dataset.features(0)
    samples = load_audio_text_image_video(str(wav), fs=frontend.fs)
    theirs, lengths = extract_fbank(samples, frontend=frontend)
    assert tuple(theirs.shape) == (1, 17, 560)
    assert torch.equal(ours, theirs[0, : int(lengths[0])])


def test_cmvn_comes_from_model(tiny_model_dir):
    _, kwargs = load_paraformer(tiny_model_dir)
    cmvn = kwargs["frontend"].cmvn
    # The fixture's am.mvn has mean 10 and standard deviation 3: shift -10, scale 1/3.
    assert torch.allclose(cmvn[0], torch.full((560,), -10.0))
    assert torch.allclose(cmvn[1], torch.full((560,), 1 / 3), atol=1e-6)



def test_stage2_uses_model_dir_in_place(tiny_model_dir, tmp_path):
    import shutil

    from sparlora.model import locate_pretrained

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    before = (model_dir / "model.pt").read_bytes()
    assert locate_pretrained(str(model_dir), "master", model_dir) == model_dir
    assert not (model_dir / "model.pt").is_symlink()
    assert (model_dir / "model.pt").read_bytes() == before


def test_stage2_rejects_link_dir_with_files(tiny_model_dir, tmp_path):
    import pytest

    from sparlora.model import locate_pretrained

    link_dir = tmp_path / "links"
    link_dir.mkdir()
    (link_dir / "model.pt").write_bytes(b"user data")
    with pytest.raises(FileExistsError, match="contains files of its own"):
        locate_pretrained(str(tiny_model_dir), "master", link_dir)
    assert (link_dir / "model.pt").read_bytes() == b"user data"


def test_stage2_relinks(tiny_model_dir, tmp_path):
    from sparlora.model import locate_pretrained

    link_dir = tmp_path / "links"
    locate_pretrained(str(tiny_model_dir), "master", link_dir)
    locate_pretrained(str(tiny_model_dir), "master", link_dir)
    assert (link_dir / "model.pt").resolve() == (tiny_model_dir / "model.pt").resolve()


def test_decode_fingerprint_tracks_settings(tmp_path):
    from sparlora.decode import decode_fingerprint

    model, manifest = tmp_path / "model.pt", tmp_path / "data.jsonl"
    model.write_bytes(b"weights")
    manifest.write_text("{}\n", encoding="utf-8")
    first = decode_fingerprint([model], [manifest], "sample_rate=16000 channel=mean")
    assert first == decode_fingerprint([model], [manifest], "sample_rate=16000 channel=mean")
    assert first != decode_fingerprint([model], [manifest], "sample_rate=8000 channel=mean")
    model.write_bytes(b"other weights")
    assert first != decode_fingerprint([model], [manifest], "sample_rate=16000 channel=mean")


def test_decode_fingerprint_tracks_adapter(tmp_path):
    from sparlora.decode import decode_fingerprint

    model, adapter, manifest = tmp_path / "model.pt", tmp_path / "adapter_model.safetensors", tmp_path / "data.jsonl"
    model.write_bytes(b"weights")
    adapter.write_bytes(b"adapter")
    manifest.write_text("{}\n", encoding="utf-8")
    merged_only = decode_fingerprint([model], [manifest], "batch_size=16")
    with_adapter = decode_fingerprint([model, adapter], [manifest], "batch_size=16")
    assert with_adapter != merged_only
    adapter.write_bytes(b"retrained adapter")
    assert decode_fingerprint([model, adapter], [manifest], "batch_size=16") != with_adapter


def test_augmented_dataset_not_cached(tiny_model_dir, tmp_path):
    _, kwargs = load_paraformer(tiny_model_dir)
    wav = one_second_wav(tmp_path / "a.wav")
    calls = []

    def augment(waveform, key, epoch):
        calls.append((key, epoch))
        return waveform * 0.5

    entries = [ManifestEntry("a", str(wav), "今天", 100, 2)]
    plain = AsrDataset(entries, kwargs["frontend"], kwargs["tokenizer"], 16000, "mean")
    noisy = AsrDataset(entries, kwargs["frontend"], kwargs["tokenizer"], 16000, "mean", augment=augment)
    noisy.epoch = 3
    first = noisy.features(0)
    noisy.features(0)
    assert calls == [("a", 3), ("a", 3)]
    assert not noisy._features
    assert not torch.equal(first, plain.features(0))
