"""Training loop: learning-rate schedule, resume, and a few steps on a small Paraformer."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import soundfile
import torch

from sparlora.adapters import apply_method
from sparlora.data import AsrDataset, ManifestEntry, encode_target, num_fbank_frames, tokenizer_input
from sparlora.model import load_paraformer
from sparlora.train import TrainOptions, count_optimizer_steps, seed_everything, train_model, warmup_cosine_lr

LORA = dict(name="lora", type="lora", rank=4, alpha=8, init="default")
SPARLORA = dict(name="sparlora", type="lora", rank=4, alpha=8, init="sparlora",
                sparlora=dict(basis="dft_complex", select="lowest", b_init="lstsq", residual=True))


def test_schedule_warmup_values():
    assert warmup_cosine_lr(1, 10, 3, 1e-3, 1e-5) == pytest.approx(1e-3 / 3)
    assert warmup_cosine_lr(3, 10, 3, 1e-3, 1e-5) == pytest.approx(1e-3)


def test_schedule_cosine_values():
    lr_max, lr_min = 1e-3, 1e-5
    for step in (4, 6, 8, 10):
        progress = (step - 3) / 7
        expected = lr_min + 0.5 * (lr_max - lr_min) * (1 + math.cos(math.pi * progress))
        assert warmup_cosine_lr(step, 10, 3, lr_max, lr_min) == pytest.approx(expected)
    assert warmup_cosine_lr(10, 10, 3, lr_max, lr_min) == pytest.approx(lr_min)
    assert warmup_cosine_lr(12, 10, 3, lr_max, lr_min) == pytest.approx(lr_min)


@pytest.fixture(scope="module")
def wav_entries(tmp_path_factory):
    """Ten short noisy tone recordings with transcripts from the tiny model's vocabulary."""
    folder = tmp_path_factory.mktemp("wavs")
    rng = np.random.default_rng(0)
    texts = ["今天天气很好", "我们去成都", "吃火锅", "巴适得很", "天气好", "成都好", "我们吃", "很好", "今天去", "火锅巴适"]
    entries = []
    for index, text in enumerate(texts):
        seconds = 0.6 + 0.1 * index
        t = np.arange(int(16000 * seconds)) / 16000
        signal = 0.2 * np.sin(2 * np.pi * (200 + 40 * index) * t) + 0.02 * rng.standard_normal(t.size)
        path = folder / f"u{index}.wav"
        soundfile.write(path, signal.astype(np.float32), 16000)
        entries.append(ManifestEntry(f"u{index}", str(path), text, num_fbank_frames(seconds), len(text)))
    return entries


def run_training(model_dir, entries, out_dir, method, **options):
    """Build a fresh model, apply `method` and train; return (model, [(step, loss, lr)])."""
    seed_everything(0)
    model, kwargs = load_paraformer(model_dir)
    dataset = AsrDataset(entries, kwargs["frontend"], kwargs["tokenizer"], 16000, "mean")
    opts = TrainOptions(epochs=2, lr_max=1e-3, lr_min=1e-5, warmup_steps=3, max_frames_per_batch=300, seed=7, log_interval=100, **options)
    model = apply_method(model, method, total_steps=count_optimizer_steps(dataset, opts))
    steps = []
    train_model(model, dataset, None, opts, out_dir, kwargs["tokenizer"], kwargs["frontend"],
                on_step=lambda step, loss, lr: steps.append((step, loss, lr)))
    return model, steps


def trainable_state(model):
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


ADALORA = dict(name="adalora", type="adalora", rank=2, alpha=4, adalora=dict(init_r=4, tinit=2, tfinal=2))


@pytest.mark.parametrize("method", [LORA, SPARLORA, ADALORA], ids=["lora", "sparlora", "adalora"])
def test_resume_matches_straight_run(tiny_model_dir, wav_entries, tmp_path, method):
    straight, straight_steps = run_training(tiny_model_dir, wav_entries, tmp_path / "a", method)
    total = straight_steps[-1][0]
    assert total == 10

    _, first_steps = run_training(tiny_model_dir, wav_entries, tmp_path / "b", method, max_steps=5)
    assert [s for s, _, _ in first_steps] == [1, 2, 3, 4, 5]
    torch.manual_seed(999)  # the resumed run must restore the RNG, not inherit this state
    resumed, resumed_steps = run_training(tiny_model_dir, wav_entries, tmp_path / "b", method)

    assert [s for s, _, _ in resumed_steps] == [6, 7, 8, 9, 10]
    for (step, loss, lr), (step_b, loss_b, lr_b) in zip(straight_steps[5:], resumed_steps):
        assert step == step_b
        assert lr_b == lr
        assert abs(loss_b - loss) <= 1e-6
    expected, actual = trainable_state(straight), trainable_state(resumed)
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name


def test_resume_rejects_other_base(tiny_model_dir, wav_entries, tmp_path):
    run_training(tiny_model_dir, wav_entries, tmp_path / "c", LORA, max_steps=2)
    with pytest.raises(RuntimeError, match="other frozen weights"):
        run_training(tiny_model_dir, wav_entries, tmp_path / "c", SPARLORA)


def test_targets_split_per_character():
    assert tokenizer_input("打开wifi开关") == "打 开 wifi 开 关"
    assert tokenizer_input("〇二年") == "〇 二 年"


def test_target_ids_in_vocabulary(tiny_model_dir):
    _, kwargs = load_paraformer(tiny_model_dir)
    tokenizer = kwargs["tokenizer"]
    vocab_size = len(tokenizer.token_list)
    unk = tokenizer.token_list.index("<unk>")
    ids = encode_target(tokenizer, "巴适得很𠮶")
    assert ids[:4] == [tokenizer.token_list.index(c) for c in "巴适得很"]
    assert ids[4] == unk
    assert max(ids) < vocab_size


def test_seg_dict_tokenizer_targets(tmp_path):
    """Paraformer-large's tokenizer has a seg_dict: targets must not collapse into one <unk>."""
    from funasr.tokenizer.char_tokenizer import CharTokenizer

    from sparlora.text import TextNormConfig, normalize_text

    tokens = ["<blank>", "<s>", "</s>", "巴", "适", "得", "很", "今", "天", "气", "好", "打", "开", "关", "wi@@", "fi", "二", "年", "<unk>"]
    seg_dict = tmp_path / "seg_dict"
    seg_dict.write_text("".join(f"{c} {c}\n" for c in "巴适得很今天气好打开关二年") + "wifi wi@@ fi\n", encoding="utf-8")
    tokenizer = CharTokenizer(token_list=tokens, seg_dict=str(seg_dict), split_with_space=True, unk_symbol="<unk>")
    unk = tokens.index("<unk>")

    def ids(raw: str) -> list[int]:
        return encode_target(tokenizer, normalize_text(raw, TextNormConfig()))

    assert ids("“巴适得很”") == [tokens.index(c) for c in "巴适得很"]
    assert ids("今天“天气”好") == [tokens.index(c) for c in "今天天气好"]
    assert ids("打开wifi开关") == [tokens.index(t) for t in ["打", "开", "wi@@", "fi", "开", "关"]]
    assert ids("〇二年")[1:] == [tokens.index("二"), tokens.index("年")]
    assert ids("这个𠮶好").count(unk) == 3
    assert all(i < len(tokens) for i in ids("这个𠮶好打开wifi"))


def test_max_steps_is_total_cap(tiny_model_dir, wav_entries, tmp_path):
    _, first = run_training(tiny_model_dir, wav_entries, tmp_path / "d", LORA, max_steps=5)
    _, second = run_training(tiny_model_dir, wav_entries, tmp_path / "d", LORA, max_steps=5)
    assert [s for s, _, _ in first] == [1, 2, 3, 4, 5]
    assert second == []


def test_resume_rejects_changed_settings(tmp_path):
    from sparlora.train import check_resumable

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.pt").write_bytes(b"")
    saved = {"method": {"rank": 32}, "train": {"lr_max": 0.002, "seed": 1}}
    (tmp_path / "train_signature.json").write_text(json.dumps(saved), encoding="utf-8")
    check_resumable(tmp_path, saved, resume=True)
    changed = {"method": {"rank": 32}, "train": {"lr_max": 0.0001, "seed": 7}}
    with pytest.raises(RuntimeError, match=r"other settings \(train\.lr_max, train\.seed\)"):
        check_resumable(tmp_path, changed, resume=True)
    check_resumable(tmp_path, changed, resume=False)


def test_resume_accepts_new_default_setting(tmp_path):
    from sparlora.train import check_resumable

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.pt").write_bytes(b"")
    saved = {"method": {"rank": 32}, "train": {"lr_max": 0.002}}
    (tmp_path / "train_signature.json").write_text(json.dumps(saved), encoding="utf-8")
    check_resumable(tmp_path, {"method": {"rank": 32}, "train": {"lr_max": 0.002, "precision": "fp32"}}, resume=True)
    with pytest.raises(RuntimeError, match=r"other settings \(train\.precision\)"):
        check_resumable(tmp_path, {"method": {"rank": 32}, "train": {"lr_max": 0.002, "precision": "bf16"}}, resume=True)


def test_invalid_train_options_rejected():
    with pytest.raises(ValueError, match="train.accum_grad"):
        TrainOptions(accum_grad=0)
    with pytest.raises(ValueError, match="lr_min"):
        TrainOptions(lr_max=1e-4, lr_min=1e-3)


def test_minutes_continue_after_resume(tiny_model_dir, wav_entries, tmp_path):
    import torch as torch_module

    run_training(tiny_model_dir, wav_entries, tmp_path / "e", LORA, max_steps=3)
    state = torch_module.load(tmp_path / "e" / "checkpoints" / "last.pt", weights_only=False)
    state["position"]["minutes"] = 30.0  # as if the first run had trained for half an hour
    torch_module.save(state, tmp_path / "e" / "checkpoints" / "last.pt")
    seed_everything(0)
    model, kwargs = load_paraformer(tiny_model_dir)
    dataset = AsrDataset(wav_entries, kwargs["frontend"], kwargs["tokenizer"], 16000, "mean")
    opts = TrainOptions(epochs=2, lr_max=1e-3, lr_min=1e-5, warmup_steps=3, max_frames_per_batch=300, seed=7, log_interval=100)
    history = train_model(apply_method(model, LORA), dataset, None, opts, tmp_path / "e", kwargs["tokenizer"], kwargs["frontend"])
    assert history[-1]["minutes"] >= 30.0


def test_max_minutes_counts_across_resume(tiny_model_dir, wav_entries, tmp_path):
    import torch as torch_module

    run_training(tiny_model_dir, wav_entries, tmp_path / "f", LORA, max_steps=3)
    state = torch_module.load(tmp_path / "f" / "checkpoints" / "last.pt", weights_only=False)
    state["position"]["minutes"] = 30.0
    torch_module.save(state, tmp_path / "f" / "checkpoints" / "last.pt")
    _, steps = run_training(tiny_model_dir, wav_entries, tmp_path / "f", LORA, max_minutes=10)
    assert steps == []


def record_optimizer_lrs(monkeypatch) -> list[float]:
    """Record the learning rate that AdamW uses at each step."""
    lrs = []
    real_step = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        lrs.append(self.param_groups[0]["lr"])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    return lrs


def test_schedule_applied_in_training(tiny_model_dir, wav_entries, tmp_path, monkeypatch):
    lrs = record_optimizer_lrs(monkeypatch)
    _, steps = run_training(tiny_model_dir, wav_entries, tmp_path / "lr", LORA, accum_grad=2)

    # 5 batches per epoch with accum_grad 2 give 3 optimizer steps per epoch, the last
    # one after a single batch. That is 6 steps in 2 epochs, with warmup 3, lr_max 1e-3
    # and lr_min 1e-5.
    assert [s for s, _, _ in steps] == [1, 2, 3, 4, 5, 6]
    decay = [1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * k / 3)) for k in (1, 2, 3)]
    expected = [1e-3 / 3, 2e-3 / 3, 1e-3, *decay]
    assert lrs == pytest.approx(expected, rel=1e-12)
    assert decay[-1] == pytest.approx(1e-5, rel=1e-12)
    assert [lr for _, _, lr in steps] == lrs


def test_schedule_without_warmup():
    assert warmup_cosine_lr(1, 5, 0, 1e-3, 0.0) == pytest.approx(0.5e-3 * (1 + math.cos(math.pi / 5)), rel=1e-12)
    assert warmup_cosine_lr(5, 5, 0, 1e-3, 0.0) == pytest.approx(0.0, abs=1e-18)


def nan_loss_for(keys: set[str] | None, real_forward):
    """Return a forward_loss stand-in whose loss is NaN for batches with any of `keys` (None: every batch)."""

    def forward(model, batch, device):
        loss, stats, weight = real_forward(model, batch, device)
        if keys is None or keys & set(batch["keys"]):
            loss = loss * float("nan")
        return loss, stats, weight

    return forward


def test_nan_batch_skipped_and_counted(tiny_model_dir, wav_entries, tmp_path, monkeypatch):
    import sparlora.train as train_module

    monkeypatch.setattr(train_module, "forward_loss", nan_loss_for({"u3"}, train_module.forward_loss))
    model, steps = run_training(tiny_model_dir, wav_entries, tmp_path / "nan", LORA)

    assert [s for s, _, _ in steps] == list(range(1, 9))
    state = torch.load(tmp_path / "nan" / "checkpoints" / "last.pt", weights_only=False)
    history = state["position"]["history"]
    assert [record["skipped_batches"] for record in history] == [1, 1]
    assert [record["skipped_updates"] for record in history] == [1, 1]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_bad_steps_stop_training(tiny_model_dir, wav_entries, tmp_path, monkeypatch):
    import sparlora.train as train_module

    seed_everything(0)
    model, kwargs = load_paraformer(tiny_model_dir)
    dataset = AsrDataset(wav_entries, kwargs["frontend"], kwargs["tokenizer"], 16000, "mean")
    opts = TrainOptions(epochs=2, lr_max=1e-3, lr_min=1e-5, warmup_steps=3, max_frames_per_batch=300, seed=7,
                        log_interval=100, max_bad_steps=3)
    model = apply_method(model, LORA)
    monkeypatch.setattr(train_module, "forward_loss", nan_loss_for(None, train_module.forward_loss))
    with pytest.raises(train_module.BadStepLimit) as raised:
        train_model(model, dataset, None, opts, tmp_path / "bad", kwargs["tokenizer"], kwargs["frontend"])

    from sparlora.data import DurationBatchSampler

    sampler = DurationBatchSampler([e.source_len for e in wav_entries], 300, 7)
    sampler.set_epoch(1)
    third_batch = [wav_entries[i].key for i in list(sampler)[2]]
    message = str(raised.value)
    assert "3 updates in a row were skipped (train.max_bad_steps=3). The last" in message
    assert "non-finite loss at optimizer step 1, epoch 1, batch 3" in message
    assert f"with utterances {', '.join(third_batch)}." in message


def test_fp16_on_cpu_rejected(tiny_model_dir, wav_entries, tmp_path):
    with pytest.raises(ValueError, match=r"train.precision=fp16 needs a CUDA device, but training runs on cpu\. Use train.precision=bf16 or fp32 on CPU\."):
        run_training(tiny_model_dir, wav_entries, tmp_path / "fp16", LORA, precision="fp16")


def test_invalid_precision_rejected():
    with pytest.raises(ValueError, match=r"invalid train.precision 'fp8': expected one of fp32, bf16, fp16"):
        TrainOptions(precision="fp8")


def test_bf16_autocast_on_cpu(tiny_model_dir, wav_entries, tmp_path):
    _, fp32_steps = run_training(tiny_model_dir, wav_entries, tmp_path / "fp32", LORA, max_steps=3)
    _, bf16_steps = run_training(tiny_model_dir, wav_entries, tmp_path / "bf16", LORA, max_steps=3, precision="bf16")

    assert [s for s, _, _ in bf16_steps] == [1, 2, 3]
    fp32_loss, bf16_loss = fp32_steps[0][1], bf16_steps[0][1]
    assert math.isfinite(bf16_loss)
    assert bf16_loss != fp32_loss  # autocast changed the arithmetic
    assert bf16_loss == pytest.approx(fp32_loss, rel=0.05)


def test_specaug_only_in_training(tiny_model_dir, wav_entries):
    from sparlora.data import collate
    from sparlora.train import configure_specaug, dataset_loss, forward_loss

    model, kwargs = load_paraformer(tiny_model_dir)
    plain, _ = load_paraformer(tiny_model_dir)
    configure_specaug(model, True)
    configure_specaug(plain, False)
    assert type(model.specaug).__name__ == "SpecAugLFR"
    assert plain.specaug is None
    dataset = AsrDataset(wav_entries, kwargs["frontend"], kwargs["tokenizer"], 16000, "mean")

    rng_before = torch.get_rng_state()
    with_specaug = dataset_loss(model, dataset, 300, "cpu")
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert with_specaug == dataset_loss(plain, dataset, 300, "cpu")

    batch = collate([dataset[i] for i in range(4)])
    model.train()
    plain.train()
    torch.manual_seed(3)
    augmented = forward_loss(model, batch, "cpu")[0].item()
    torch.manual_seed(3)
    clean = forward_loss(plain, batch, "cpu")[0].item()
    assert augmented != clean


def test_dev_cer_unchanged_by_specaug(tiny_model_dir, wav_entries):
    from sparlora.decode import decode_dataset
    from sparlora.train import configure_specaug, dev_cer

    model, kwargs = load_paraformer(tiny_model_dir)
    plain, _ = load_paraformer(tiny_model_dir)
    configure_specaug(model, True)
    configure_specaug(plain, False)
    dataset = AsrDataset(wav_entries[:4], kwargs["frontend"], kwargs["tokenizer"], 16000, "mean")
    model.train()
    hyps = decode_dataset(model, dataset, kwargs["tokenizer"], kwargs["frontend"], 32, "cpu", progress=False)
    assert hyps == decode_dataset(plain, dataset, kwargs["tokenizer"], kwargs["frontend"], 32, "cpu", progress=False)
    assert any(hyps.values())  # the random model emits tokens, which SpecAugment would change
    cer = dev_cer(model, dataset, kwargs["tokenizer"], kwargs["frontend"], "cpu")
    assert cer == dev_cer(plain, dataset, kwargs["tokenizer"], kwargs["frontend"], "cpu")
    assert model.training
