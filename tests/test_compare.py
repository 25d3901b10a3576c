"""RESULTS.md of a method comparison and its figures, on fabricated run folders."""

from __future__ import annotations

import logging

import pytest

from sparlora.compare import (
    build_report,
    convergence_epoch,
    differing_settings,
    find_runs,
    main,
    parse_epoch_records,
    parse_init_seconds,
    parse_trainable,
    reference_run,
    results_markdown,
)
from sparlora.plots import plot_cer_vs_rank, plot_dev_cer
from sparlora.stats import paired_bootstrap

TEST_SETS = ["sc_test", "cmn_test"]
REFS = {
    "sc_test": {"a1": "今天天气很好", "a2": "我们去成都", "a3": "吃火锅", "a4": "巴适得很"},
    "cmn_test": {"b1": "你好", "b2": "明天见"},
}
# Errors per utterance, in the order of REFS: base sc 1 1 1 2 (5/18), cmn 0 1 (1/5).
HYPS = {
    "base": {"sc_test": {"a1": "今天天汽很好", "a2": "我们去城都", "a3": "吃火", "a4": "八十得很"},
             "cmn_test": {"b1": "你好", "b2": "明天"}},
    # sc 0 1 0 1 (2/18), cmn 0 0
    "lora": {"sc_test": {"a1": "今天天气很好", "a2": "我们去城都", "a3": "吃火锅", "a4": "八适得很"},
             "cmn_test": {"b1": "你好", "b2": "明天见"}},
    # sc 0 0 0 1 (1/18), cmn 1 0 (1/5)
    "sparlora": {"sc_test": {"a1": "今天天气很好", "a2": "我们去成都", "a3": "吃火锅", "a4": "八适得很"},
                 "cmn_test": {"b1": "你", "b2": "明天见"}},
    # sc 1 1 0 1 (3/18), cmn 0 0
    "worse": {"sc_test": {"a1": "今天天汽很好", "a2": "我们去城都", "a3": "吃火锅", "a4": "八适得很"},
              "cmn_test": {"b1": "你好", "b2": "明天见"}},
}
LOG_PREFIX = "2026-01-01 10:00:00,000 INFO"


def epoch_line(epoch: int, dev_cer: float, minutes: float) -> str:
    return (f"{LOG_PREFIX} [__main__] epoch {epoch} done: epoch {epoch}, step {10 * epoch}, train_loss 1.2345, "
            f"skipped_batches 0, minutes {minutes:.4f}, dev_loss 1.1000, dev_cer {dev_cer:.4f}\n")


def write_text(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def make_run(exp_root, tag, method, rank, hyps, dev_cers, split="train", trainable=None, init_seconds=None,
             log_name="train.log", seed=1234):
    run_dir = exp_root / tag
    write_text(run_dir / "config.yaml",
               f"method:\n  name: {method}\n  rank: {rank}\ncorpus:\n  train_split: {split}\n"
               f"train:\n  seed: {seed}\n  epochs: {len(dev_cers)}\nscoring:\n  text: {{}}\n")
    log = "".join(epoch_line(epoch, cer, 1.5 * epoch) for epoch, cer in enumerate(dev_cers, start=1))
    extra = ""
    if trainable is not None:
        extra += f"{LOG_PREFIX} [sparlora.adapters] {method}: {trainable[0]} of {trainable[1]} parameters trainable (1.000%)\n"
    if init_seconds is not None:
        extra += f"{LOG_PREFIX} [__main__] {method} initialization took {init_seconds:.3f} s\n"
    if log_name == "train.log":
        write_text(run_dir / "train.log", extra + log)
    else:
        write_text(run_dir / "train.log", log)
        write_text(run_dir / log_name, extra)
    for test_set in TEST_SETS:
        write_text(run_dir / f"decode_{test_set}" / "hyp",
                   "".join(f"{key} {text}\n" for key, text in HYPS[hyps][test_set].items()))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("comparison")
    data, exp = root / "data", root / "exp"
    for test_set, refs in REFS.items():
        write_text(data / test_set / "text", "".join(f"{key} {text}\n" for key, text in refs.items()))
    for test_set in TEST_SETS:
        write_text(exp / "base" / f"decode_{test_set}" / "hyp",
                   "".join(f"{key} {text}\n" for key, text in HYPS["base"][test_set].items()))
    make_run(exp, "lora_r8", "lora", 8, "worse", [0.6, 0.5, 0.4], trainable=(1000, 101000), init_seconds=0.101)
    make_run(exp, "lora_r16", "lora", 16, "lora", [0.5, 0.4, 0.3], trainable=(2000, 102000), init_seconds=0.102)
    make_run(exp, "sparlora_r8", "sparlora", 8, "lora", [0.45, 0.35, 0.3], trainable=(1000, 101000), init_seconds=0.201)
    make_run(exp, "sparlora_r16", "sparlora", 16, "sparlora", [0.35, 0.28, 0.25], trainable=(2000, 102000),
             init_seconds=0.202, log_name="run.log")
    make_run(exp, "sparlora_dft_r16", "sparlora_dft", 16, "worse", [0.5, 0.45, 0.4], trainable=(2000, 102000))
    make_run(exp, "full_r0", "full", 0, "sparlora", [0.4, 0.3, 0.2], trainable=(100000, 100000))
    make_run(exp, "lora_r16_train_10h", "lora", 16, "worse", [0.7, 0.6], split="train_10h")
    # A resumed run logs epoch 2 twice; the later line counts.
    with (exp / "sparlora_r16" / "train.log").open("a", encoding="utf-8") as log:
        log.write(epoch_line(2, 0.2700, 3.0))
    write_text(root / "compare.yaml",
               f"corpus:\n  name: toy\n  train_split: train\n  test_splits: [sc_test, cmn_test]\n"
               f"data_dir: {data}\nexp_root: {exp}\nmethod:\n  rank: 16\nscoring:\n  text: {{}}\n")
    return root


@pytest.fixture(scope="module")
def report(corpus):
    from sparlora.compare import base_scores
    from sparlora.text import TextNormConfig

    runs = find_runs(corpus / "exp", corpus / "data", TEST_SETS)
    base = base_scores(corpus / "exp", corpus / "data", TEST_SETS, TextNormConfig())
    return build_report(runs, base, TEST_SETS, main_split="train", main_rank=16, resamples=1000, seed=0)


def rows(text: str, header_start: str) -> list[str]:
    """Return the data rows of the Markdown table whose header starts with `header_start`."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    table = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        table.append(line)
    return table


# --- log parsing


def test_epoch_records_last_line_wins():
    text = epoch_line(1, 0.5, 1.0) + epoch_line(2, 0.45, 2.0) + "other line\n" + epoch_line(2, 0.4, 2.5)

    records = parse_epoch_records(text)

    assert [record["epoch"] for record in records] == [1, 2]
    assert records[1]["dev_cer"] == 0.4
    assert records[1]["minutes"] == 2.5
    assert records[1]["step"] == 20
    assert isinstance(records[1]["step"], int)


def test_trainable_and_init_lines():
    text = (f"{LOG_PREFIX} [sparlora.adapters] lora: 517632 of 2472709 parameters trainable (20.934%)\n"
            f"{LOG_PREFIX} [sparlora.adapters]   feed_forward.w_1.lora_A: 32768 trainable\n"
            f"{LOG_PREFIX} [__main__] lora initialization took 0.734 s\n")

    assert parse_trainable(text) == (517632, 2472709)
    assert parse_init_seconds(text) == 0.734
    assert parse_trainable("nothing here") is None
    assert parse_init_seconds("nothing here") is None


def test_convergence_epoch():
    records = parse_epoch_records(epoch_line(1, 0.5, 1) + epoch_line(2, 0.3, 2) + epoch_line(3, 0.2, 3))

    assert convergence_epoch(records, 0.3) == 2
    assert convergence_epoch(records, 0.6) == 1
    assert convergence_epoch(records, 0.1) is None


# --- run folders


def test_runs_read(report):
    runs = {run.tag: run for run in report.runs}

    assert sorted(runs) == ["full_r0", "lora_r16", "lora_r16_train_10h", "lora_r8", "sparlora_dft_r16",
                            "sparlora_r16", "sparlora_r8"]
    assert runs["sparlora_r16"].trainable == 2000
    assert runs["sparlora_r16"].init_seconds == 0.202
    assert [record["dev_cer"] for record in runs["sparlora_r16"].epochs] == [0.35, 0.27, 0.25]
    assert runs["lora_r16"].scores["sc_test"].errors == 2
    assert runs["full_r0"].rank == 0


def test_reference_runs(report):
    runs = {run.tag: run for run in report.runs}

    assert reference_run(runs["sparlora_r8"], report.runs, "lora").tag == "lora_r8"
    assert reference_run(runs["full_r0"], report.runs, "lora").tag == "lora_r16"
    assert reference_run(runs["lora_r16_train_10h"], report.runs, "lora").tag == "lora_r16_train_10h"
    assert reference_run(runs["sparlora_dft_r16"], report.runs, "pissa") is None


def test_differing_settings(report):
    runs = {run.tag: run for run in report.runs}

    assert differing_settings(report.runs) == ["train.epochs"]
    assert differing_settings([runs["lora_r16"], runs["sparlora_r16"]]) == []


# --- RESULTS.md tables


def test_cer_table_rows(report):
    text = results_markdown(report, "toy", command=["compare"])

    assert rows(text, "| method | rank | train split | sc_test CER %") == [
        "| base model (zero-shot) | – | – | 27.78 | 20.00 |",
        "| lora | 8 | train | 16.67 | 0.00 |",
        "| lora | 16 | train | 11.11 | 0.00 |",
        "| sparlora_dft | 16 | train | 16.67 | 0.00 |",
        "| sparlora | 8 | train | 11.11 | 0.00 |",
        "| sparlora | 16 | train | 5.56 | 20.00 |",
        "| full | – | train | 5.56 | 20.00 |",
        "| lora | 16 | train_10h | 16.67 | 0.00 |",
    ]


def test_comparison_rows(report):
    text = results_markdown(report, "toy", command=["compare"])
    # sparlora_r16 against lora_r16 on sc_test: errors per utterance 0 1 0 1 -> 0 0 0 1.
    expected = paired_bootstrap([0, 1, 0, 1], [0, 0, 0, 1], [6, 5, 3, 4], resamples=1000, seed=0)
    interval = f"[{100 * expected.relative_ci_low:+.1f}, {100 * expected.relative_ci_high:+.1f}]"

    table = rows(text, "| method | rank | train split | test set |")

    assert f"| sparlora | 16 | train | sc_test | 5.56 | 11.11 | -50.0 | {interval} | {expected.p_value:.3f} | 1.000 | 1 / 0 / 3 |" in table
    # LoRA has CER 0 on cmn_test, so there is no relative change. A resample of the two
    # utterances is as extreme as the observed +1/5 when it draws b1 never or twice,
    # which has probability 1/2.
    cmn = paired_bootstrap([0, 0], [1, 0], [2, 3], resamples=1000, seed=0)
    assert cmn.p_value == pytest.approx(0.5, abs=0.05)
    assert f"| sparlora | 16 | train | cmn_test | 20.00 | 0.00 | n/a | n/a | {cmn.p_value:.3f} | 1.000 | 0 / 1 / 1 |" in table
    assert "| sparlora | 8 | train | sc_test | 11.11 | 16.67 | -33.3 |" in "\n".join(table)
    assert "| full | – | train | sc_test | 5.56 | 11.11 | -50.0 |" in "\n".join(table)
    assert not any(row.startswith("| lora |") for row in table)
    assert len(table) == 8


def test_cost_rows(report):
    text = results_markdown(report, "toy", command=["compare"])

    assert rows(text, "| method | rank | train split | trainable parameters") == [
        "| lora | 8 | train | 1,000 | 0.990 | 0.101 | 4.50 | 3 | 40.00 | 3 (≤ 40.00%) |",
        "| lora | 16 | train | 2,000 | 1.961 | 0.102 | 4.50 | 3 | 30.00 | 3 (≤ 30.00%) |",
        "| sparlora_dft | 16 | train | 2,000 | 1.961 | n/a | 4.50 | 3 | 40.00 | not reached (≤ 30.00%) |",
        "| sparlora | 8 | train | 1,000 | 0.990 | 0.201 | 4.50 | 3 | 30.00 | 2 (≤ 40.00%) |",
        "| sparlora | 16 | train | 2,000 | 1.961 | 0.202 | 4.50 | 3 | 25.00 | 2 (≤ 30.00%) |",
        "| full | – | train | 100,000 | 100.000 | n/a | 4.50 | 3 | 20.00 | 2 (≤ 30.00%) |",
        "| lora | 16 | train_10h | n/a | n/a | n/a | 3.00 | 2 | 60.00 | 2 (≤ 60.00%) |",
    ]


def test_fixed_convergence_threshold(corpus, report):
    fixed = build_report(report.runs, report.base, TEST_SETS, "train", 16, target_dev_cer=0.35, resamples=10)

    table = rows(results_markdown(fixed, "toy", command=["compare"]), "| method | rank | train split | trainable parameters")

    assert "first epoch at dev CER ≤ 35.00%" in results_markdown(fixed, "toy", command=["compare"])
    assert table[4].endswith("| 1 (≤ 35.00%) |")


def test_ablation_rows(report):
    text = results_markdown(report, "toy", command=["compare"])

    assert "## SPaRLoRA ablation (rank 16, train)" in text
    assert rows(text, "| step | method config |") == [
        "| LoRA | lora | Kaiming uniform | 0 | W | 11.11 | +0.0 | 0.00 | n/a |",
        "| + DFT basis | sparlora_dft | r cosine DFT rows | 0 | W | 16.67 | +50.0 | 0.00 | n/a |",
        "| + phase | sparlora_phase | r/2 cosine and r/2 sine DFT rows | 0 | W | not run |  | not run |  |",
        "| + residual | sparlora | r/2 cosine and r/2 sine DFT rows | least squares fit of W | W - s·B·A "
        "| 5.56 | -50.0 | 20.00 | n/a |",
    ]


def test_header_lines(report):
    text = results_markdown(report, "toy", figures=[("dev CER", "dev.png")], command=["bash", "compare.sh"])

    assert text.startswith("# Method comparison: toy\n")
    assert "- command: `bash compare.sh`" in text
    assert "- runs: 7; main training split: train; main rank: 16; training seed: 1234" in text
    assert "- settings that differ between runs: train.epochs" in text
    assert text.endswith("## Figures\n\n![dev CER](dev.png)\n")


# --- figures


def test_dev_cer_plot(report, tmp_path):
    runs = [run for run in report.runs if run.tag in ("lora_r16", "sparlora_r16")]

    series = plot_dev_cer(runs, tmp_path / "dev.png")

    assert series == {"lora_r16": ([1, 2, 3], [50.0, 40.0, 30.0]), "sparlora_r16": ([1, 2, 3], [35.0, 27.0, 25.0])}
    assert (tmp_path / "dev.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rank_plot(report, tmp_path):
    main_runs = [run for run in report.runs if run.train_split == "train"]

    series = plot_cer_vs_rank(main_runs, TEST_SETS, tmp_path / "rank.png", report.base)

    assert set(series) == set(TEST_SETS)
    ranks, cers = series["sc_test"]["lora"]
    assert ranks == [8, 16]
    assert cers == pytest.approx([100 * 3 / 18, 100 * 2 / 18])
    assert series["cmn_test"]["sparlora"] == ([8, 16], [0.0, 20.0])
    assert series["sc_test"]["sparlora_dft"] == ([16], pytest.approx([100 * 3 / 18]))
    assert "full" not in series["sc_test"]
    assert (tmp_path / "rank.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rank_plot_needs_two_ranks(report, tmp_path):
    single = [run for run in report.runs if run.rank in (0, 16) and run.train_split == "train"]

    assert plot_cer_vs_rank(single, TEST_SETS, tmp_path / "rank.png") == {}
    assert not (tmp_path / "rank.png").exists()


def test_plots_without_dev_cer(tmp_path, report):
    run = report.runs[0]
    stripped = type(run)(**{**run.__dict__, "epochs": [{"epoch": 1, "minutes": 1.0}]})

    assert plot_dev_cer([stripped], tmp_path / "dev.png") == {}
    assert not (tmp_path / "dev.png").exists()


# --- command line


def test_main_writes_results_and_figures(corpus, tmp_path):
    out = tmp_path / "RESULTS.md"

    assert main(["--config", str(corpus / "compare.yaml"), "--resamples", "200", "--out", str(out),
                 "--command", "bash scripts/compare_methods.sh --ranks '8 16'"]) == 0

    text = out.read_text(encoding="utf-8")
    assert "- command: `bash scripts/compare_methods.sh --ranks '8 16'`" in text
    assert "| sparlora | 16 | train | 5.56 | 20.00 |" in text
    assert "![dev CER per epoch, rank 16, train](dev_cer_per_epoch.png)" in text
    assert "![test CER against rank, train](cer_vs_rank.png)" in text
    assert (tmp_path / "dev_cer_per_epoch.png").is_file()
    assert (tmp_path / "cer_vs_rank.png").is_file()


def test_main_overrides_after_tags(corpus, tmp_path):
    # exp_root=... after --tags is an override, not a run folder.
    import shutil

    moved = tmp_path / "moved_exp"
    shutil.copytree(corpus / "exp", moved)
    out = tmp_path / "R.md"

    assert main(["--config", str(corpus / "compare.yaml"), "--out", str(out), "--resamples", "10",
                 "--tags", "lora_r16", "sparlora_r16", f"exp_root={moved}"]) == 0

    assert "- runs: 2;" in out.read_text(encoding="utf-8")


def test_main_named_run_missing(corpus, tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_run"):
        main(["--config", str(corpus / "compare.yaml"), "--tags", "no_such_run", "--out", str(tmp_path / "R.md")])


def test_run_without_decode_skipped(corpus, tmp_path, caplog):
    make_run(tmp_path, "lora_r4", "lora", 4, "lora", [0.5])
    (tmp_path / "lora_r4" / "decode_cmn_test" / "hyp").unlink()

    runs = find_runs(tmp_path, corpus / "data", TEST_SETS)

    assert runs == []
    assert "skipping run lora_r4" in caplog.text


def test_line_styles_distinct_for_30_runs():
    from sparlora.plots import line_style

    styles = [(style["color"], style["linestyle"]) for style in map(line_style, range(30))]

    assert len(set(styles)) == 30
    assert styles[10] == ("tab:blue", "--")


def test_run_order_ablation_then_controls():
    from types import SimpleNamespace

    from sparlora.compare import _run_sort_key

    methods = ["pissa", "sparlora_random", "full", "sparlora", "lora", "sparlora_dft", "adalora", "sparlora_phase"]
    runs = [SimpleNamespace(method=method, train_split="train", rank=32) for method in methods]

    ordered = [run.method for run in sorted(runs, key=lambda run: _run_sort_key(run, "train", "lora"))]

    assert ordered == ["lora", "sparlora_dft", "sparlora_phase", "sparlora", "sparlora_random", "adalora", "full", "pissa"]


# --- runs that are not clean


def test_cut_epoch_line_skipped(caplog):
    text = epoch_line(1, 0.5, 1.0) + f"{LOG_PREFIX} [__main__] epoch 2 done: epoch 2, step\n"

    with caplog.at_level(logging.WARNING, logger="sparlora.compare"):
        records = parse_epoch_records(text, "run_x/train.log")

    assert [record["epoch"] for record in records] == [1]
    assert "run_x/train.log: skipping a malformed epoch line" in caplog.text


def copy_comparison(corpus, tmp_path):
    """Return a copy of the comparison tree, which a test may change."""
    import shutil

    tree = tmp_path / "tree"
    shutil.copytree(corpus, tree)
    return tree


def test_unreadable_run_skipped(corpus, tmp_path, caplog):
    tree = copy_comparison(corpus, tmp_path)
    write_text(tree / "exp" / "lora_r8" / "config.yaml", "model: funasr\n")
    write_text(tree / "exp" / "lora_rabc" / "config.yaml",
               "method:\n  name: lora\n  rank: abc\ncorpus:\n  train_split: train\ntrain: {}\nscoring:\n  text: {}\n")
    write_text(tree / "exp" / "lora_rabc" / "train.log", "")

    with caplog.at_level(logging.WARNING, logger="sparlora.compare"):
        runs = find_runs(tree / "exp", tree / "data", TEST_SETS)

    assert "lora_r8" not in {run.tag for run in runs}
    assert "lora_rabc" not in {run.tag for run in runs}
    assert len(runs) == 6
    assert f"skipping run lora_r8: {tree / 'exp' / 'lora_r8' / 'config.yaml'} is not a recipe config" in caplog.text
    assert "skipping run lora_rabc" in caplog.text


def test_bad_hyp_named_not_config(corpus, tmp_path, caplog):
    tree = copy_comparison(corpus, tmp_path)
    hyp = tree / "exp" / "sparlora_r16" / "decode_sc_test" / "hyp"
    hyp.write_text(hyp.read_text(encoding="utf-8") + "a1 again\n", encoding="utf-8")

    with caplog.at_level(logging.WARNING, logger="sparlora.compare"):
        runs = find_runs(tree / "exp", tree / "data", TEST_SETS)

    assert "sparlora_r16" not in {run.tag for run in runs}
    assert f"skipping run sparlora_r16: {hyp}:5: duplicate key 'a1'" in caplog.text
    assert "config.yaml" not in caplog.text


def test_partial_and_unfinished_runs_noted(corpus, tmp_path):
    from sparlora.compare import base_scores
    from sparlora.text import TextNormConfig

    tree = copy_comparison(corpus, tmp_path)
    hyp = tree / "exp" / "sparlora_r16" / "decode_sc_test" / "hyp"
    hyp.write_text("".join(hyp.read_text(encoding="utf-8").splitlines(keepends=True)[:2]), encoding="utf-8")
    config = tree / "exp" / "lora_r8" / "config.yaml"
    config.write_text(config.read_text(encoding="utf-8").replace("epochs: 3", "epochs: 5"), encoding="utf-8")
    runs = find_runs(tree / "exp", tree / "data", TEST_SETS)
    base = base_scores(tree / "exp", tree / "data", TEST_SETS, TextNormConfig())

    report = build_report(runs, base, TEST_SETS, "train", 16, resamples=10)
    text = results_markdown(report, "toy")

    assert "- sparlora_r16, sc_test: 2 of 4 utterances have no hypothesis and count as deletions" in text
    assert "- lora_r8: unfinished, train.log ends at epoch 3 of 5" in text
    lora_r8_row = next(row for row in rows(text, "| method | rank | train split | trainable") if row.startswith("| lora | 8 |"))
    assert "| 3 of 5 |" in lora_r8_row


def test_duplicate_runs_named_and_one_reference(corpus, tmp_path):
    import shutil

    from sparlora.compare import base_scores, reference_run
    from sparlora.text import TextNormConfig

    tree = copy_comparison(corpus, tmp_path)
    shutil.copytree(tree / "exp" / "lora_r16", tree / "exp" / "aaa_lora_copy")
    write_text(tree / "exp" / "aaa_lora_copy" / "decode_sc_test" / "hyp",
               "".join(f"{key} {text}\n" for key, text in HYPS["worse"]["sc_test"].items()))
    runs = find_runs(tree / "exp", tree / "data", TEST_SETS)
    base = base_scores(tree / "exp", tree / "data", TEST_SETS, TextNormConfig())
    by_tag = {run.tag: run for run in runs}

    report = build_report(runs, base, TEST_SETS, "train", 16, resamples=10)
    text = results_markdown(report, "toy")

    assert reference_run(by_tag["sparlora_r16"], runs, "lora").tag == "lora_r16"
    assert "| lora (aaa_lora_copy) | 16 | train |" in text
    assert "| lora (lora_r16) | 16 | train |" in text
    assert ("runs with the same method, rank and training split: aaa_lora_copy, lora_r16 "
            "(tables add the folder name; the reference and the ablation table use lora_r16)") in text
    ablation = rows(text, "| step |")
    assert ablation[0].split(" | ")[5] == f"{100 * 2 / 18:.2f}"


def test_other_scoring_not_compared(corpus, tmp_path):
    from sparlora.compare import base_scores
    from sparlora.text import TextNormConfig

    tree = copy_comparison(corpus, tmp_path)
    config = tree / "exp" / "lora_r16" / "config.yaml"
    config.write_text(config.read_text(encoding="utf-8").replace("  text: {}\n", "  text:\n    numerals: arabic\n"),
                      encoding="utf-8")
    runs = find_runs(tree / "exp", tree / "data", TEST_SETS)
    base = base_scores(tree / "exp", tree / "data", TEST_SETS, TextNormConfig())

    report = build_report(runs, base, TEST_SETS, "train", 16, resamples=10)
    text = results_markdown(report, "toy")

    assert "- sparlora_r16: not compared with lora_r16, because their scoring.text settings differ" in text
    assert not [c for c in report.comparisons if c.run.tag == "sparlora_r16"]
    assert "scoring.text.numerals" in text


def test_odd_run_names_drawn_literally(report, tmp_path):
    from sparlora.plots import legend_label

    run = next(run for run in report.runs if run.tag == "lora_r16")
    odd = [type(run)(**{**run.__dict__, "tag": tag}) for tag in ("pissa$\\foo$", "_old run")]

    series = plot_dev_cer(odd, tmp_path / "dev.png")

    assert set(series) == {"pissa$\\foo$", "_old run"}
    assert legend_label("pissa$\\foo$") == "pissa\\$\\foo\\$"
    assert legend_label("_old run") == " _old run"


def test_decode_of_other_weights_noted(corpus, tmp_path):
    from sparlora.compare import base_scores
    from sparlora.decode import decode_fingerprint
    from sparlora.text import TextNormConfig

    tree = copy_comparison(corpus, tmp_path)
    run_dir = tree / "exp" / "lora_r16"
    adapter = run_dir / "adapter" / "adapter_model.safetensors"
    write_text(adapter, "weights")
    write_text(tree / "base_model.pt", "weights")
    write_text(tree / "data" / "sc_test" / "data.jsonl", "{}\n")
    (run_dir / "decode_sc_test" / "fingerprint").write_text(
        decode_fingerprint([tree / "base_model.pt", adapter], [tree / "data" / "sc_test" / "data.jsonl"], "batch_size=4"),
        encoding="utf-8")
    runs = find_runs(tree / "exp", tree / "data", TEST_SETS)
    base = base_scores(tree / "exp", tree / "data", TEST_SETS, TextNormConfig())

    text = results_markdown(build_report(runs, base, TEST_SETS, "train", 16, resamples=10), "toy")

    assert (f"- lora_r16, sc_test: decoded with {tree / 'base_model.pt'}, {adapter}, not final_model "
            "(decode.checkpoint last or adapter)") in text
    assert "lora_r16, cmn_test: decoded with" not in text


def test_moved_run_not_noted(corpus, tmp_path):
    # Fingerprints keep absolute paths; a run folder moved with its root still decoded final_model.
    from sparlora.decode import decode_fingerprint

    tree = copy_comparison(corpus, tmp_path)
    old_model = tmp_path / "old_root" / "exp" / "lora_r16" / "final_model" / "model.pt"
    write_text(old_model, "weights")
    write_text(tree / "data" / "sc_test" / "data.jsonl", "{}\n")
    (tree / "exp" / "lora_r16" / "decode_sc_test" / "fingerprint").write_text(
        decode_fingerprint([old_model], [tree / "data" / "sc_test" / "data.jsonl"], "batch_size=4"), encoding="utf-8")

    runs = {run.tag: run for run in find_runs(tree / "exp", tree / "data", TEST_SETS)}

    assert runs["lora_r16"].other_weights == {}


def test_base_row_with_one_decode_missing(corpus, tmp_path):
    from sparlora.compare import base_scores, cer_table
    from sparlora.text import TextNormConfig

    tree = copy_comparison(corpus, tmp_path)
    (tree / "exp" / "base" / "decode_cmn_test" / "hyp").unlink()
    base = base_scores(tree / "exp", tree / "data", TEST_SETS, TextNormConfig())

    lines = cer_table([], base, TEST_SETS)

    assert lines[2] == f"| base model (zero-shot) | – | – | {100 * 5 / 18:.2f} | n/a |"


def test_main_tags_only_overrides(corpus, tmp_path, capsys):
    with pytest.raises(SystemExit) as caught:
        main(["--config", str(corpus / "compare.yaml"), "--out", str(tmp_path / "R.md"), "--tags", f"exp_root={tmp_path}"])

    assert caught.value.code == 2
    assert "--tags lists no run folder, only overrides" in capsys.readouterr().err
