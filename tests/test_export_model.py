"""Exports of stage 3 on the tiny Paraformer: the merged FunASR model dir and the PEFT adapter."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch

from sparlora.audio import load_audio
from sparlora.kaldi_io import read_table
from sparlora.model import MODEL_FILES
from synth_utterances import write_test_split, write_utterances

METHODS = {
    "lora": dict(name="lora", type="lora", rank=4, alpha=8, init="default", target_modules="paraformer"),
    "sparlora": dict(name="sparlora", type="lora", rank=4, alpha=8, init="sparlora", target_modules="paraformer",
                     sparlora=dict(basis="dft_complex", select="lowest", b_init="lstsq", residual=True)),
    "dora": dict(name="dora", type="lora", rank=4, alpha=8, init="default", target_modules="paraformer", use_dora=True),
    "adalora": dict(name="adalora", type="adalora", rank=2, alpha=8, init="default", target_modules="paraformer",
                    adalora=dict(init_r=4, tinit=2, tfinal=2, deltaT=1)),
}


def prune_like_adalora(model):
    """Mask AdaLoRA triplets as its rank allocator does at the end of a run: each layer keeps
    a different number of its 4 triplets, one layer keeps none, so saving resizes every layer."""
    # The allocator names parameters as the wrapped model does: no "base_model.model." prefix.
    inner = model.base_model.model
    names = [name for name, _ in inner.named_parameters() if ".lora_E." in name]
    pattern = {name: [position < index % 5 for position in range(4)] for index, name in enumerate(names)}
    assert any(not any(kept) for kept in pattern.values())
    model.peft_config["default"].rank_pattern = pattern
    model.base_model.rankallocator.mask_using_rank_pattern(inner, pattern)


def export_like_stage3(tiny_model_dir, method, exp_dir):
    """Apply `method`, move the adapter away from its init as training would, then write both exports."""
    from sparlora.adapters import (
        apply_method,
        changes_base_weights,
        merged_state_dict,
        save_adapter_for_original_base,
        save_initial_adapter,
    )
    from sparlora.model import load_paraformer, save_model_dir

    model, _ = load_paraformer(tiny_model_dir)
    model = apply_method(model, method, total_steps=20 if method["type"] == "adalora" else None)
    save_initial_adapter(model, exp_dir / "adapter_init")
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator))
    if method["type"] == "adalora":
        prune_like_adalora(model)
    if changes_base_weights(method):
        save_adapter_for_original_base(model, exp_dir / "adapter", exp_dir / "adapter_init")
    else:
        model.save_pretrained(str(exp_dir / "adapter"))
    save_model_dir(merged_state_dict(copy.deepcopy(model)), tiny_model_dir, exp_dir / "final_model")


@pytest.fixture(scope="module", params=sorted(METHODS))
def exported(request, tmp_path_factory, tiny_model_dir):
    """A fabricated recipe tree: data, base model, exp dir with exports and stage 4 hypotheses."""
    from sparlora.decode import decode_manifest
    from sparlora.model import load_paraformer

    root = tmp_path_factory.mktemp(f"export_{request.param}")
    entries = write_utterances(root / "wavs", count=5)
    manifest = write_test_split(root / "data", "sc_test", entries)
    exp_dir = root / "exp" / "run"
    export_like_stage3(tiny_model_dir, METHODS[request.param], exp_dir)
    merged, kwargs = load_paraformer(exp_dir / "final_model")
    decode_manifest(merged, kwargs, manifest, exp_dir / "decode_sc_test", 4, "cpu", 16000, "mean")
    (root / "conf.yaml").write_text(
        f"corpus:\n  test_splits: [sc_test]\ndata_dir: {root / 'data'}\nexp_root: {root / 'exp'}\ntag: run\n"
        f"exp_dir: {exp_dir}\nmodel:\n  dir: {tiny_model_dir}\nmethod:\n  name: {request.param}\n"
        "audio:\n  sample_rate: 16000\n  channel: mean\ndecode:\n  batch_size: 4\n  device: cpu\n",
        encoding="utf-8",
    )
    return root, exp_dir, entries


def test_final_model_files(exported):
    _, exp_dir, _ = exported

    assert sorted(path.name for path in (exp_dir / "final_model").iterdir()) == sorted(MODEL_FILES)


def test_automodel_matches_stage4(exported):
    from sparlora.export import automodel_transcripts

    _, exp_dir, entries = exported
    waveforms = [load_audio(entry.source) for entry in entries]
    stage4 = dict(read_table(exp_dir / "decode_sc_test" / "hyp"))

    texts = automodel_transcripts(exp_dir / "final_model", waveforms)

    assert texts == [stage4[entry.key] for entry in entries]
    assert all(texts)


def test_adapter_on_original_base(exported, tiny_model_dir):
    from sparlora.export import check_adapter

    _, exp_dir, entries = exported

    check = check_adapter(tiny_model_dir, exp_dir / "adapter", exp_dir / "final_model", entries, 16000, "mean", batch_size=2)

    assert check.transcripts_equal == len(entries)
    assert check.max_encoder_difference <= 1e-5
    assert check.passed


def test_adapter_changes_the_model(exported, tiny_model_dir):
    # Guards the two tests above against a merged model that equals the base model.
    from sparlora.data import AsrDataset
    from sparlora.export import encoder_outputs
    from sparlora.model import load_paraformer

    _, exp_dir, entries = exported
    base, kwargs = load_paraformer(tiny_model_dir)
    merged, _ = load_paraformer(exp_dir / "final_model")
    dataset = AsrDataset(entries, kwargs["frontend"], kwargs["tokenizer"], 16000, "mean")

    differences = [(a - b).abs().max().item() for a, b in zip(encoder_outputs(base, dataset), encoder_outputs(merged, dataset))]

    assert min(differences) > 1e-2


def test_export_main_passes(exported, tmp_path):
    from sparlora.export import main

    root, exp_dir, entries = exported
    out = tmp_path / "exported_model"

    assert main(["--config", str(root / "conf.yaml"), "--out", str(out)]) == 0

    report = (exp_dir / "export_check.txt").read_text(encoding="utf-8")
    assert f"funasr.AutoModel transcripts equal to stage 4 ({exp_dir / 'decode_sc_test' / 'hyp'}): 5 of 5" in report
    assert f"transcripts equal to the merged model {out}: 5 of 5" in report
    assert report.endswith("result: passed\n")
    assert sorted(path.name for path in out.iterdir()) == sorted([*MODEL_FILES, "export_source.txt"])
    assert not any(path.is_symlink() for path in out.iterdir())
    # A second export may replace the first one.
    assert main(["--config", str(root / "conf.yaml"), "--out", str(out)]) == 0


def test_export_main_detects_changed_hypothesis(exported, tmp_path):
    from sparlora.export import main

    root, exp_dir, entries = exported
    hyp = exp_dir / "decode_sc_test" / "hyp"
    saved = tmp_path / "hyp"
    shutil.copyfile(hyp, saved)
    lines = hyp.read_text(encoding="utf-8").splitlines()
    lines[0] = f"{entries[0].key} 巴适"
    hyp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    try:
        with pytest.raises(RuntimeError, match="export check failed"):
            main(["--config", str(root / "conf.yaml")])
    finally:
        shutil.copyfile(saved, hyp)

    report = (exp_dir / "export_check.txt").read_text(encoding="utf-8")
    assert f"4 of 5\n  differing utterances: {entries[0].key}\n" in report
    assert report.endswith("result: FAILED\n")


def test_export_main_averaged_final_model(exported, tmp_path, tiny_model_dir):
    # With train.average_best > 0, final_model is an average of epochs and the adapter
    # (last weights) must be checked against last_model. Here final_model is made the base
    # model, so a check against final_model would fail.
    from sparlora.decode import decode_manifest
    from sparlora.export import copy_model_dir, main
    from sparlora.model import load_paraformer

    root, _, entries = exported
    tree = tmp_path / "tree"
    shutil.copytree(root, tree)
    (tree / "conf.yaml").write_text((root / "conf.yaml").read_text(encoding="utf-8").replace(str(root), str(tree)),
                                    encoding="utf-8")
    exp_dir = tree / "exp" / "run"
    (exp_dir / "final_model").rename(exp_dir / "last_model")
    copy_model_dir(tiny_model_dir, exp_dir / "final_model")
    (exp_dir / "final_model" / "averaged_checkpoints.json").write_text('{"average_best": 2, "checkpoints": []}\n')
    final, kwargs = load_paraformer(exp_dir / "final_model")
    decode_manifest(final, kwargs, tree / "data" / "sc_test" / "data.jsonl", exp_dir / "decode_sc_test", 4, "cpu",
                    16000, "mean")

    assert main(["--config", str(tree / "conf.yaml")]) == 0
    report = (exp_dir / "export_check.txt").read_text(encoding="utf-8")
    assert f"transcripts equal to the merged model {exp_dir / 'last_model'}: 5 of 5" in report

    shutil.rmtree(exp_dir / "last_model")
    with pytest.raises(FileNotFoundError, match="last_model, which lacks config.yaml"):
        main(["--config", str(tree / "conf.yaml")])


def test_adapter_loads_without_warnings(exported, tiny_model_dir):
    # PEFT's rank_pattern check warns about every AdaLoRA mask key unless load_adapter silences it.
    import warnings

    from sparlora.adapters import load_adapter
    from sparlora.model import load_paraformer

    _, exp_dir, _ = exported
    base, _ = load_paraformer(tiny_model_dir)

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        model = load_adapter(base, exp_dir / "adapter")

    assert not model.training
    assert any(".lora_A." in name for name, _ in model.named_parameters())


@pytest.mark.parametrize("target", ["model_dir", "exp_dir", "other_final_model"])
def test_export_out_never_replaces_recipe_files(exported, tmp_path, tiny_model_dir, target):
    # The pretrained dir (links to the model files, as stage 2 writes it), the run's own
    # folder and another run's final_model are all rejected, and nothing in them changes.
    from sparlora.export import main

    root, exp_dir, _ = exported
    model_dir = tmp_path / "pretrained"
    model_dir.mkdir()
    for name in MODEL_FILES:
        (model_dir / name).symlink_to(tiny_model_dir / name)
    other = tmp_path / "other_final_model"
    shutil.copytree(tiny_model_dir, other)
    out = {"model_dir": model_dir, "exp_dir": exp_dir, "other_final_model": other}[target]
    before = {path.name: path.read_bytes() for path in out.iterdir() if path.is_file()}
    originals = {name: (tiny_model_dir / name).read_bytes() for name in MODEL_FILES}

    with pytest.raises(ValueError, match="is not empty and is not an earlier export"):
        main(["--config", str(root / "conf.yaml"), "--out", str(out)])

    assert {path.name: path.read_bytes() for path in out.iterdir() if path.is_file()} == before
    assert {name: (tiny_model_dir / name).read_bytes() for name in MODEL_FILES} == originals


def test_export_out_replaces_links_not_targets(exported, tmp_path):
    from sparlora.export import main

    root, _, _ = exported
    out, target = tmp_path / "out", tmp_path / "elsewhere.pt"
    out.mkdir()
    (out / "export_source.txt").write_text("earlier export\n", encoding="utf-8")
    target.write_bytes(b"not to be overwritten")
    (out / "model.pt").symlink_to(target)

    assert main(["--config", str(root / "conf.yaml"), "--out", str(out)]) == 0

    assert target.read_bytes() == b"not to be overwritten"
    assert not (out / "model.pt").is_symlink()


@pytest.mark.parametrize("count", ["0", "-1"])
def test_export_rejects_utterances_below_one(exported, count, capsys):
    from sparlora.export import main

    root, _, _ = exported

    with pytest.raises(SystemExit) as caught:
        main(["--config", str(root / "conf.yaml"), "--utterances", count])

    assert caught.value.code == 2
    assert f"invalid --utterances {count}: expected 1 or more" in capsys.readouterr().err


def test_export_rejects_decode_of_other_weights(exported, tmp_path, tiny_model_dir):
    # After decode.checkpoint=adapter (or last), stage 4's hyps need not be final_model's.
    from sparlora.decode import decode_fingerprint
    from sparlora.export import main

    root, exp_dir, _ = exported
    fingerprint = exp_dir / "decode_sc_test" / "fingerprint"
    manifest = root / "data" / "sc_test" / "data.jsonl"
    fingerprint.write_text(decode_fingerprint([tiny_model_dir / "model.pt", exp_dir / "adapter" / "adapter_config.json"],
                                              [manifest], "batch_size=4"), encoding="utf-8")
    try:
        with pytest.raises(RuntimeError, match="run stage 4 with decode.checkpoint=final"):
            main(["--config", str(root / "conf.yaml")])
        fingerprint.write_text(decode_fingerprint([exp_dir / "final_model" / "model.pt"], [manifest], "batch_size=4"),
                               encoding="utf-8")
        assert main(["--config", str(root / "conf.yaml")]) == 0
    finally:
        fingerprint.unlink()


def test_export_out_rerun_after_failed_copy(exported, tmp_path, monkeypatch):
    # A copy that fails halfway leaves the marker, so the same --out works on the rerun.
    import sparlora.export as export

    root, exp_dir, _ = exported
    out = tmp_path / "out"
    real_copy = shutil.copyfile

    def failing_copy(src, dst, *args, **kwargs):
        if str(src).endswith("model.pt"):
            raise OSError(28, "No space left on device")
        return real_copy(src, dst, *args, **kwargs)

    monkeypatch.setattr(export.shutil, "copyfile", failing_copy)
    with pytest.raises(OSError, match="No space left"):
        export.main(["--config", str(root / "conf.yaml"), "--out", str(out)])
    monkeypatch.setattr(export.shutil, "copyfile", real_copy)

    assert export.main(["--config", str(root / "conf.yaml"), "--out", str(out)]) == 0
    assert (out / "model.pt").read_bytes() == (exp_dir / "final_model" / "model.pt").read_bytes()


def test_export_accepts_moved_run(exported, tmp_path):
    from sparlora.decode import decode_fingerprint
    from sparlora.export import main

    root, exp_dir, _ = exported
    fingerprint = exp_dir / "decode_sc_test" / "fingerprint"
    old_model = tmp_path / "old_root" / "exp" / exp_dir.name / "final_model" / "model.pt"
    old_model.parent.mkdir(parents=True)
    old_model.write_bytes(b"weights")
    fingerprint.write_text(decode_fingerprint([old_model], [root / "data" / "sc_test" / "data.jsonl"], "batch_size=4"),
                           encoding="utf-8")
    try:
        assert main(["--config", str(root / "conf.yaml")]) == 0
    finally:
        fingerprint.unlink()
