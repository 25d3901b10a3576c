"""Stage 4 decoding on the tiny random Paraformer: batching, padding and extra test sets."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch

from sparlora import decode
from sparlora.data import AsrDataset
from sparlora.kaldi_io import read_table
from synth_utterances import write_test_split, write_utterances


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from sparlora.model import load_paraformer

    model, kwargs = load_paraformer(tiny_model_dir)
    return model, kwargs


@pytest.fixture(scope="module")
def utterances(tmp_path_factory):
    return write_utterances(tmp_path_factory.mktemp("wavs"), count=6)


def decode_all(tiny, entries, batch_size):
    model, kwargs = tiny
    dataset = AsrDataset(entries, kwargs["frontend"], kwargs["tokenizer"], 16000, "mean")
    return decode.decode_dataset(model, dataset, kwargs["tokenizer"], kwargs["frontend"], batch_size, "cpu", progress=False)


def test_one_utterance_batches(tiny, utterances):
    hyps = decode_all(tiny, utterances, batch_size=1)

    assert sorted(hyps) == sorted(entry.key for entry in utterances)
    assert all(hyps.values())


def test_last_batch_of_one(tiny, utterances):
    hyps = decode_all(tiny, utterances, batch_size=5)

    assert hyps == decode_all(tiny, utterances, batch_size=1)


def test_batching_keeps_transcripts(tiny, utterances):
    # Without zero_padded_frames, utterance 1 of this set decodes differently in a
    # batch of 6 (padded to utterance 5's length) than alone.
    alone = decode_all(tiny, utterances, batch_size=1)

    assert decode_all(tiny, utterances, batch_size=6) == alone
    assert decode_all(tiny, utterances, batch_size=3) == alone


def test_hook_removed_after_decoding(tiny, utterances):
    model, _ = tiny
    decode_all(tiny, utterances, batch_size=2)

    assert not model.encoder._forward_hooks


def test_zero_padded_frames():
    encoder_out = torch.ones(2, 4, 3)
    lengths = torch.tensor([4, 2])

    masked, masked_lengths, extra = decode.zero_padded_frames(None, (), (encoder_out, lengths, None))

    assert masked[0].sum().item() == 12
    assert masked[1, :2].sum().item() == 6
    assert masked[1, 2:].abs().sum().item() == 0
    assert masked_lengths is lengths
    assert extra is None


def test_torch_threads_restored():
    before = torch.get_num_threads()

    with decode.torch_threads(1):
        assert torch.get_num_threads() == 1

    assert torch.get_num_threads() == before


# --- stage 4 entry point


def write_config(path, data_dir, exp_root, model_dir, test_splits, checkpoint="last"):
    path.write_text(
        f"corpus:\n  test_splits: [{', '.join(test_splits)}]\ndata_dir: {data_dir}\nexp_root: {exp_root}\n"
        f"tag: run\nexp_dir: {exp_root}/run\nmodel:\n  dir: {model_dir}\n"
        "audio:\n  sample_rate: 16000\n  channel: mean\ntrain:\n  num_threads: 1\n"
        f"decode:\n  batch_size: 4\n  device: cpu\n  checkpoint: {checkpoint}\n",
        encoding="utf-8",
    )


def test_stage4_decodes_added_test_set_only(tmp_path, tiny_model_dir, utterances, caplog):
    data, exp = tmp_path / "data", tmp_path / "exp"
    write_test_split(data, "sc_test", utterances[:3])
    shutil.copytree(tiny_model_dir, exp / "run" / "final_model")
    config = tmp_path / "conf.yaml"
    write_config(config, data, exp, tiny_model_dir, ["sc_test"])
    assert decode.main(["--config", str(config)]) == 0
    first_hyp = exp / "base" / "decode_sc_test" / "hyp"
    stamp = first_hyp.stat().st_mtime_ns

    write_test_split(data, "sc_test_snr10", utterances[3:])
    write_config(config, data, exp, tiny_model_dir, ["sc_test", "sc_test_snr10"])
    with caplog.at_level(logging.INFO, logger="sparlora.decode"):
        assert decode.main(["--config", str(config)]) == 0

    assert first_hyp.stat().st_mtime_ns == stamp
    assert "base decode of sc_test in" in caplog.text
    assert "finetuned decode of sc_test in" in caplog.text
    for folder in (exp / "base", exp / "run"):
        hyps = read_table(folder / "decode_sc_test_snr10" / "hyp")
        refs = read_table(folder / "decode_sc_test_snr10" / "ref")
        assert [key for key, _ in hyps] == [entry.key for entry in utterances[3:]]
        assert refs == [(entry.key, entry.target) for entry in utterances[3:]]
        assert (folder / "decode_sc_test_snr10" / "fingerprint").is_file()


def test_stage4_redecodes_changed_settings(tmp_path, tiny_model_dir, utterances, caplog):
    data, exp = tmp_path / "data", tmp_path / "exp"
    write_test_split(data, "t", utterances[:2])
    shutil.copytree(tiny_model_dir, exp / "run" / "final_model")
    config = tmp_path / "conf.yaml"
    write_config(config, data, exp, tiny_model_dir, ["t"])
    assert decode.main(["--config", str(config)]) == 0
    caplog.clear()

    with caplog.at_level(logging.INFO, logger="sparlora.decode"):
        assert decode.main(["--config", str(config), "decode.batch_size=1"]) == 0

    assert "up to date" not in caplog.text
    assert "decoding t with the base model" in caplog.text


def test_invalid_decode_checkpoint_rejected(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-m", "sparlora.decode", "--config", "conf/demo.yaml", "decode.checkpoint=best",
                             f"data_dir={tmp_path}"], cwd=root, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "invalid decode.checkpoint 'best': expected final, last, adapter or base" in result.stderr


def test_stage4_adapter_matches_merged(tmp_path, tiny_model_dir, utterances, caplog):
    # decode.checkpoint=adapter decodes the base model with stage 3's PEFT adapter, unmerged.
    from test_export_model import METHODS, export_like_stage3

    data, exp = tmp_path / "data", tmp_path / "exp"
    write_test_split(data, "sc_test", utterances)
    export_like_stage3(tiny_model_dir, METHODS["sparlora"], exp / "run")
    config = tmp_path / "conf.yaml"
    write_config(config, data, exp, tiny_model_dir, ["sc_test"], checkpoint="final")
    assert decode.main(["--config", str(config)]) == 0
    merged = read_table(exp / "run" / "decode_sc_test" / "hyp")
    base = read_table(exp / "base" / "decode_sc_test" / "hyp")
    caplog.clear()

    with caplog.at_level(logging.INFO, logger="sparlora.decode"):
        assert decode.main(["--config", str(config), "decode.checkpoint=adapter"]) == 0

    assert f"decoding with the adapter {exp / 'run' / 'adapter'} on {tiny_model_dir}" in caplog.text
    assert "finetuned decode of sc_test in" not in caplog.text
    assert read_table(exp / "run" / "decode_sc_test" / "hyp") == merged
    assert merged != base


def test_stage4_adapter_missing(tmp_path, tiny_model_dir, utterances):
    data, exp = tmp_path / "data", tmp_path / "exp"
    write_test_split(data, "sc_test", utterances[:1])
    shutil.copytree(tiny_model_dir, exp / "run" / "final_model")
    config = tmp_path / "conf.yaml"
    write_config(config, data, exp, tiny_model_dir, ["sc_test"], checkpoint="adapter")

    with pytest.raises(FileNotFoundError, match=r"adapter not found: .*adapter_config.json; decode.checkpoint=adapter"):
        decode.main(["--config", str(config)])


def test_no_progress_bar_in_logs(tiny, utterances, capsys):
    # Captured stderr is not a terminal, like run.log under compare_methods.sh.
    model, kwargs = tiny
    dataset = AsrDataset(utterances[:2], kwargs["frontend"], kwargs["tokenizer"], 16000, "mean")
    decode.decode_dataset(model, dataset, kwargs["tokenizer"], kwargs["frontend"], 2, "cpu", progress=True)

    assert "decode:" not in capsys.readouterr().err
