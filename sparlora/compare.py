"""Compare the fine-tuning runs of one corpus and write `exp/<corpus>/RESULTS.md`.

Usage: python -m sparlora.compare --config conf/demo.yaml [options] [hydra overrides...]

`scripts/compare_methods.sh` trains and scores each method x rank x training split with
run.sh stages 3-5, then calls this module. It reads what those stages wrote in each run
folder `exp/<corpus>/<tag>/`:

- `config.yaml` (stage 3): method name, rank, training split, train settings and the
  scoring normalization;
- `train.log` (stage 3): one `epoch N done: ...` line per epoch with `dev_cer` and
  `minutes`. When a run was resumed, the last line of each epoch counts;
- `train.log` and `run.log` (the console output of run.sh that compare_methods.sh
  keeps): the trainable-parameter line of `sparlora.adapters.log_trainable` and the
  initialization time line `<method> initialization took <seconds> s`;
- `decode_<set>/hyp` (stage 4), scored again against `data/<corpus>/<set>/text` with
  the run's own `scoring.text` settings, so per-utterance errors are available for the
  paired statistics of `sparlora.stats`.

Every run is compared with the reference method (LoRA) of the same training split and
rank. Full fine-tuning has no rank and is compared with the reference run of its
training split that has the highest rank.
"""

from __future__ import annotations

import argparse
import logging
import math
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sparlora.kaldi_io import atomic_write_text, read_table
from sparlora.noise import decode_split_names
from sparlora.score import ScoreResult, cer_counts, provenance_lines
from sparlora.stats import BootstrapResult, SignTestResult, paired_bootstrap, sign_test
from sparlora.text import TextNormConfig

logger = logging.getLogger(__name__)

EPOCH_LINE = re.compile(r"epoch (\d+) done: (.*)$", re.MULTILINE)
TRAINABLE_LINE = re.compile(r"\] (\S+): (\d+) of (\d+) parameters trainable \(([0-9.]+)%\)")
INIT_TIME_LINE = re.compile(r"\] (\S+) initialization took ([0-9.]+) s")

# Steps of the SPaRLoRA ablation, in order: (label, method config, A, B, frozen weight).
ABLATION_STEPS = (
    ("LoRA", "lora", "Kaiming uniform", "0", "W"),
    ("+ DFT basis", "sparlora_dft", "r cosine DFT rows", "0", "W"),
    ("+ phase", "sparlora_phase", "r/2 cosine and r/2 sine DFT rows", "0", "W"),
    ("+ residual", "sparlora", "r/2 cosine and r/2 sine DFT rows", "least squares fit of W", "W - s·B·A"),
)

# Controls of the ablation, listed right after its steps.
ABLATION_CONTROLS = ("sparlora_random",)

DEV_CER_FIGURE = "dev_cer_per_epoch.png"
RANK_FIGURE = "cer_vs_rank.png"


@dataclass
class Run:
    """Outputs of stages 3-5 for one method, rank and training split."""

    tag: str
    exp_dir: Path
    method: str
    rank: int
    train_split: str
    train_settings: dict
    epochs: list[dict] = field(default_factory=list)  # one record per epoch, from train.log
    trainable: int | None = None
    total_parameters: int | None = None
    init_seconds: float | None = None
    scores: dict[str, ScoreResult] = field(default_factory=dict)  # test set -> scores
    scoring_text: dict = field(default_factory=dict)  # the run's scoring.text settings
    # test set -> weight files of its stage 4 decode, when they are not final_model/model.pt
    other_weights: dict[str, list[str]] = field(default_factory=dict)

    @property
    def planned_epochs(self) -> int | None:
        """Epochs that the run's config sets, or None when it sets none."""
        epochs = self.train_settings.get("epochs")
        return int(epochs) if isinstance(epochs, int) else None

    @property
    def last_epoch(self) -> int:
        """Number of the last epoch that train.log records, 0 when none."""
        return int(self.epochs[-1]["epoch"]) if self.epochs else 0

    @property
    def finished(self) -> bool:
        """True when train.log records the last epoch that the config sets."""
        planned = self.planned_epochs
        return planned is None or self.last_epoch >= planned

    @property
    def final_dev_cer(self) -> float | None:
        """Dev CER after the last epoch, as a fraction; None without dev set."""
        return self.epochs[-1].get("dev_cer") if self.epochs else None

    @property
    def train_minutes(self) -> float | None:
        """Training wall time in minutes at the end of the last epoch, counted across resumptions."""
        return self.epochs[-1].get("minutes") if self.epochs else None

    @property
    def trainable_share(self) -> float | None:
        """Trainable parameters as a fraction of all parameters."""
        if self.trainable is None or not self.total_parameters:
            return None
        return self.trainable / self.total_parameters


@dataclass(frozen=True)
class Comparison:
    """Statistics of one run against its reference run on one test set."""

    run: Run
    reference: Run
    test_set: str
    bootstrap: BootstrapResult | None  # None when the reference has no reference characters
    sign: SignTestResult


# --- reading run folders ---------------------------------------------------------------


def parse_epoch_records(log_text: str, source: str = "train.log") -> list[dict]:
    """Return the per-epoch records of a train.log, sorted by epoch, the last line of each epoch winning.

    A line reads `epoch 3 done: epoch 3, step 120, train_loss 1.2345, ..., dev_cer 0.4123`.
    Integer fields become int and the others float. A line with a field that is not a
    number (a line cut off when the process was killed) is skipped with a warning that
    names `source`.
    """
    records: dict[int, dict] = {}
    for match in EPOCH_LINE.finditer(log_text):
        record: dict = {}
        for item in match.group(2).split(", "):
            name, _, value = item.partition(" ")
            try:
                record[name] = int(value)
            except ValueError:
                try:
                    record[name] = float(value)
                except ValueError:
                    record = {}
                    break
        if not record or record.get("epoch") != int(match.group(1)):
            logger.warning("%s: skipping a malformed epoch line: %r", source, match.group(0)[:200])
            continue
        records[int(match.group(1))] = record
    return [records[epoch] for epoch in sorted(records)]


def parse_trainable(log_text: str) -> tuple[int, int] | None:
    """Return (trainable, total) parameters from the last log_trainable line, or None."""
    matches = TRAINABLE_LINE.findall(log_text)
    if not matches:
        return None
    _, trainable, total, _ = matches[-1]
    return int(trainable), int(total)


def parse_init_seconds(log_text: str) -> float | None:
    """Return the seconds of the last `<method> initialization took <seconds> s` line, or None."""
    matches = INIT_TIME_LINE.findall(log_text)
    return float(matches[-1][1]) if matches else None


def _read_logs(exp_dir: Path) -> str:
    texts = []
    for name in ("train.log", "run.log"):
        path = exp_dir / name
        if path.is_file():
            texts.append(path.read_text(encoding="utf-8", errors="replace"))
    return "\n".join(texts)


def load_run(exp_dir: Path, data_dir: Path, test_sets: Sequence[str]) -> Run:
    """Read one run folder; raise FileNotFoundError naming the first file it lacks."""
    config_path = exp_dir / "config.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found; run stage 3 for {exp_dir.name}")
    try:
        cfg = OmegaConf.load(config_path)
        method = cfg.method
        run = Run(
            tag=exp_dir.name,
            exp_dir=exp_dir,
            method=str(method.name),
            rank=int(method.rank) if method.get("rank") is not None else 0,
            train_split=str(cfg.corpus.train_split),
            train_settings=OmegaConf.to_container(cfg.train, resolve=True),
        )
        scoring_text = cfg.scoring.text
    except (ValueError, KeyError, AttributeError, OmegaConfBaseException) as error:
        # Not the config.yaml of stage 3, or a method.rank that is not a number.
        first_line = str(error).splitlines()[0] if str(error) else ""
        raise ValueError(f"{config_path} is not a recipe config of stage 3 ({type(error).__name__}: {first_line})") from error

    train_log = exp_dir / "train.log"
    if not train_log.is_file():
        raise FileNotFoundError(f"{train_log} not found; run stage 3 for {exp_dir.name}")
    run.epochs = parse_epoch_records(train_log.read_text(encoding="utf-8", errors="replace"), str(train_log))
    log_text = _read_logs(exp_dir)
    counts = parse_trainable(log_text)
    if counts is not None:
        run.trainable, run.total_parameters = counts
    run.init_seconds = parse_init_seconds(log_text)

    run.scoring_text = OmegaConf.to_container(scoring_text, resolve=True) or {}
    norm_cfg = TextNormConfig.from_dict(scoring_text)
    for test_set in test_sets:
        hyp_path = exp_dir / f"decode_{test_set}" / "hyp"
        if not hyp_path.is_file():
            raise FileNotFoundError(f"{hyp_path} not found; run stage 4 for {exp_dir.name}")
        fingerprint = hyp_path.parent / "fingerprint"
        if fingerprint.is_file():
            # Imported here: sparlora.decode loads torch, which the rest of this module does not need.
            from sparlora.decode import decoded_weight_files, is_final_model_decode

            used = decoded_weight_files(fingerprint)
            if not is_final_model_decode(used, exp_dir):
                run.other_weights[test_set] = [str(path) for path in used]
        # Missing and extra hypotheses go into the report's notes (report_notes), which are logged too.
        run.scores[test_set] = score_hyp_file(data_dir / test_set / "text", hyp_path, norm_cfg)
    return run


def score_hyp_file(ref_path: Path, hyp_path: Path, norm_cfg: TextNormConfig) -> ScoreResult:
    """Score a hypothesis table against a reference table, without writing anything."""
    if not ref_path.is_file():
        raise FileNotFoundError(f"reference transcripts not found: {ref_path}")
    return cer_counts(dict(read_table(ref_path)), dict(read_table(hyp_path)), norm_cfg)


def find_runs(exp_root: Path, data_dir: Path, test_sets: Sequence[str], tags: Sequence[str] | None = None) -> list[Run]:
    """Load the runs named by `tags`, or every run folder of `exp_root` with a train.log.

    With `tags`, a run that cannot be read raises. Without, it is skipped with a warning
    naming the folder and the missing file.
    """
    if tags:
        return [load_run(exp_root / tag, data_dir, test_sets) for tag in tags]
    runs = []
    for exp_dir in sorted(path for path in exp_root.iterdir() if (path / "train.log").is_file()):
        try:
            runs.append(load_run(exp_dir, data_dir, test_sets))
        except (FileNotFoundError, ValueError) as error:
            # A missing file, a config that is not stage 3's or an unreadable table. The message names the file.
            logger.warning("skipping run %s: %s", exp_dir.name, error)
    return runs


def setup_key(run: Run) -> tuple[str, int, str]:
    """Return what identifies a run in the tables: method, rank and training split."""
    return run.method, run.rank, run.train_split


def duplicate_groups(runs: Sequence[Run]) -> list[list[Run]]:
    """Return the groups of two or more runs that share method, rank and training split."""
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        groups.setdefault(setup_key(run), []).append(run)
    return [group for group in groups.values() if len(group) > 1]


def run_label(run: Run, runs: Sequence[Run]) -> str:
    """Return the method name, with the run folder added when another run has the same method, rank and split."""
    twins = [other for other in runs if setup_key(other) == setup_key(run)]
    return f"{run.method} ({run.tag})" if len(twins) > 1 else run.method


def preferred_run(candidates: Sequence[Run]) -> Run | None:
    """Pick one of several runs of the same method, rank and split: the one whose folder
    name compare_methods.sh would give it, else the first folder by name."""
    if not candidates:
        return None
    for run in candidates:
        expected = f"{run.method}_r{run.rank}"
        if run.tag == expected or run.tag == f"{expected}_{run.train_split}":
            return run
    return min(candidates, key=lambda run: run.tag)


# --- comparisons -------------------------------------------------------------------------


def reference_run(run: Run, runs: Sequence[Run], reference_method: str) -> Run | None:
    """Return the run of `reference_method` with the same training split and rank as `run`.

    A run of rank 0 (full fine-tuning) gets the reference run of its split with the highest rank.
    """
    candidates = [other for other in runs if other.method == reference_method and other.train_split == run.train_split]
    if run.rank == 0 and candidates:
        highest = max(other.rank for other in candidates)
        return preferred_run([other for other in candidates if other.rank == highest])
    return preferred_run([other for other in candidates if other.rank == run.rank])


def compare_runs(run: Run, reference: Run, test_set: str, resamples: int, seed: int) -> Comparison:
    """Bootstrap and sign-test `run` against `reference` on one test set, paired by utterance."""
    ours = run.scores[test_set].utterances
    theirs = reference.scores[test_set].utterances
    if [u.utterance_id for u in ours] != [u.utterance_id for u in theirs]:
        raise ValueError(f"{run.tag} and {reference.tag} scored different utterances of {test_set}; rerun stage 4 for both")
    errors_run = [u.errors for u in ours]
    errors_reference = [u.errors for u in theirs]
    lengths = [u.ref_length for u in ours]
    bootstrap = None
    if sum(lengths) > 0:
        bootstrap = paired_bootstrap(errors_reference, errors_run, lengths, resamples=resamples, seed=seed)
    return Comparison(run, reference, test_set, bootstrap, sign_test(errors_reference, errors_run))


def convergence_epoch(epochs: Sequence[dict], threshold: float) -> int | None:
    """Return the first epoch whose dev CER is at most `threshold` (a fraction), or None."""
    for record in epochs:
        cer = record.get("dev_cer")
        if cer is not None and cer <= threshold + 1e-12:
            return int(record["epoch"])
    return None


def differing_settings(runs: Sequence[Run]) -> list[str]:
    """Return the `train.*` and `scoring.text.*` settings whose values differ between runs, as dotted names."""
    differing = []
    for prefix, settings_of in (("train", lambda run: run.train_settings), ("scoring.text", lambda run: run.scoring_text)):
        names = sorted({name for run in runs for name in settings_of(run)})
        differing += [f"{prefix}.{name}" for name in names
                      if len({repr(settings_of(run).get(name)) for run in runs}) > 1]
    return differing


# --- Markdown --------------------------------------------------------------------------------


def _percent(rate: float | None, digits: int = 2) -> str:
    return "n/a" if rate is None or (isinstance(rate, float) and math.isnan(rate)) else f"{100 * rate:.{digits}f}"


def _signed_percent(rate: float) -> str:
    return "n/a" if math.isnan(rate) else f"{100 * rate:+.1f}"


def format_p_value(p: float) -> str:
    """Return p with 3 decimals, in scientific notation below 0.001, or "n/a" for nan."""
    if math.isnan(p):
        return "n/a"
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def _run_sort_key(run: Run, main_split: str, reference_method: str) -> tuple:
    """Order runs: main split first, then the reference method, the ablation steps and their
    controls, other methods by name, then rank."""
    ablation_order = [step[1] for step in ABLATION_STEPS] + list(ABLATION_CONTROLS)
    if run.method == reference_method:
        method_order = (0, 0, "")
    elif run.method in ablation_order:
        method_order = (1, ablation_order.index(run.method), "")
    else:
        method_order = (2, 0, run.method)
    return (run.train_split != main_split, run.train_split, method_order, run.rank)


def cer_table(runs: Sequence[Run], base: dict[str, ScoreResult], test_sets: Sequence[str]) -> list[str]:
    """Return the Markdown table of CER per run and test set, the base model first."""
    lines = [
        "| method | rank | train split | " + " | ".join(f"{name} CER %" for name in test_sets) + " |",
        "|---|---:|---|" + "---:|" * len(test_sets),
    ]
    if base:
        cers = [_percent(base[name].cer) if name in base else "n/a" for name in test_sets]
        lines.append("| base model (zero-shot) | – | – | " + " | ".join(cers) + " |")
    for run in runs:
        rank = str(run.rank) if run.rank else "–"
        cers = " | ".join(_percent(run.scores[name].cer) for name in test_sets)
        lines.append(f"| {run_label(run, runs)} | {rank} | {run.train_split} | {cers} |")
    return lines


def comparison_table(comparisons: Sequence[Comparison], runs: Sequence[Run] = ()) -> list[str]:
    """Return the Markdown table of relative CER changes against the reference runs."""
    lines = [
        "| method | rank | train split | test set | CER % | reference CER % | relative change % | 95% CI % "
        "| p (bootstrap) | p (sign test) | utterances better / worse / tied |",
        "|---|---:|---|---|---:|---:|---:|---|---:|---:|---|",
    ]
    for comparison in comparisons:
        run, sign = comparison.run, comparison.sign
        rank = str(run.rank) if run.rank else "–"
        bootstrap = comparison.bootstrap
        if bootstrap is None:
            change = interval = p_bootstrap = "n/a"
        else:
            change = _signed_percent(bootstrap.relative_change)
            interval = (f"[{_signed_percent(bootstrap.relative_ci_low)}, {_signed_percent(bootstrap.relative_ci_high)}]"
                        if not math.isnan(bootstrap.relative_ci_low) else "n/a")
            p_bootstrap = format_p_value(bootstrap.p_value)
        lines.append(
            f"| {run_label(run, runs)} | {rank} | {run.train_split} | {comparison.test_set} "
            f"| {_percent(run.scores[comparison.test_set].cer)} "
            f"| {_percent(comparison.reference.scores[comparison.test_set].cer)} "
            f"| {change} | {interval} | {p_bootstrap} | {format_p_value(sign.p_value)} "
            f"| {sign.b_better} / {sign.a_better} / {sign.ties} |"
        )
    return lines


def cost_table(runs: Sequence[Run], thresholds: dict[str, float | None], threshold_label: str) -> list[str]:
    """Return the Markdown table of trainable parameters, times and convergence per run.

    `thresholds` maps a run tag to the dev CER (fraction) that its convergence column
    uses, or None when there is none.
    """
    lines = [
        "| method | rank | train split | trainable parameters | share % | init s | training min | epochs "
        f"| final dev CER % | first epoch at dev CER ≤ {threshold_label} |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for run in runs:
        rank = str(run.rank) if run.rank else "–"
        trainable = f"{run.trainable:,}" if run.trainable is not None else "n/a"
        share = _percent(run.trainable_share, 3)
        init = f"{run.init_seconds:.3f}" if run.init_seconds is not None else "n/a"
        minutes = f"{run.train_minutes:.2f}" if run.train_minutes is not None else "n/a"
        threshold = thresholds.get(run.tag)
        if threshold is None:
            converged = "n/a"
        else:
            epoch = convergence_epoch(run.epochs, threshold)
            converged = f"{epoch if epoch is not None else 'not reached'} (≤ {_percent(threshold)}%)"
        epochs = str(len(run.epochs)) if run.finished else f"{run.last_epoch} of {run.planned_epochs}"
        lines.append(
            f"| {run_label(run, runs)} | {rank} | {run.train_split} | {trainable} | {share} | {init} | {minutes} "
            f"| {epochs} | {_percent(run.final_dev_cer)} | {converged} |"
        )
    return lines


def ablation_table(runs: Sequence[Run], test_sets: Sequence[str], split: str, rank: int) -> list[str]:
    """Return the Markdown table of the SPaRLoRA ablation at one training split and rank.

    Returns no lines when fewer than two of the ablation's runs exist. A missing step
    gets a row marked "not run".
    """
    by_method = {}
    for method in {run.method for run in runs}:
        chosen = preferred_run([run for run in runs if run.method == method and run.train_split == split and run.rank == rank])
        if chosen is not None:
            by_method[method] = chosen
    present = [step for step in ABLATION_STEPS if step[1] in by_method]
    if len(present) < 2:
        return []
    baseline = by_method.get(ABLATION_STEPS[0][1])
    header = "| step | method config | A | B | frozen weight | " + " | ".join(
        f"{name} CER % | {name} change %" for name in test_sets) + " |"
    lines = [header, "|---|---|---|---|---|" + "---:|---:|" * len(test_sets)]
    for label, method, a_init, b_init, frozen in ABLATION_STEPS:
        run = by_method.get(method)
        cells = []
        for name in test_sets:
            if run is None:
                cells += ["not run", ""]
                continue
            cer = run.scores[name].cer
            base_cer = baseline.scores[name].cer if baseline is not None else None
            change = _signed_percent((cer - base_cer) / base_cer) if cer is not None and base_cer else "n/a"
            cells += [_percent(cer), change]
        lines.append(f"| {label} | {method} | {a_init} | {b_init} | {frozen} | " + " | ".join(cells) + " |")
    return lines


@dataclass
class ComparisonReport:
    """Everything RESULTS.md shows, computed once so tests can read the numbers."""

    runs: list[Run]
    base: dict[str, ScoreResult]
    test_sets: list[str]
    main_split: str
    main_rank: int
    reference_method: str
    comparisons: list[Comparison]
    thresholds: dict[str, float | None]
    threshold_label: str
    resamples: int
    seed: int
    notes: list[str] = field(default_factory=list)  # data problems that RESULTS.md lists before the tables


def report_notes(runs: Sequence[Run], test_sets: Sequence[str]) -> list[str]:
    """Return one line per problem that makes a run's numbers differ from a clean run's."""
    notes = []
    for run in runs:
        if not run.finished:
            notes.append(f"{run.tag}: unfinished, train.log ends at epoch {run.last_epoch} of {run.planned_epochs}")
        for test_set in test_sets:
            scores = run.scores[test_set]
            if scores.missing_hyp:
                notes.append(f"{run.tag}, {test_set}: {len(scores.missing_hyp)} of {len(scores.utterances)} utterances "
                             "have no hypothesis and count as deletions")
            if scores.extra_hyp:
                notes.append(f"{run.tag}, {test_set}: {len(scores.extra_hyp)} hypotheses without a reference, ignored")
        for test_set, weights in run.other_weights.items():
            notes.append(f"{run.tag}, {test_set}: decoded with {', '.join(weights)}, not final_model "
                         "(decode.checkpoint last or adapter)")
    for group in duplicate_groups(runs):
        chosen = preferred_run(group)
        notes.append(f"runs with the same method, rank and training split: {', '.join(run.tag for run in group)} "
                     f"(tables add the folder name; the reference and the ablation table use {chosen.tag})")
    return notes


def build_report(runs: Sequence[Run], base: dict[str, ScoreResult], test_sets: Sequence[str], main_split: str,
                 main_rank: int, reference_method: str = "lora", target_dev_cer: float | None = None,
                 resamples: int = 10_000, seed: int = 0) -> ComparisonReport:
    """Pair every run with its reference run and compute the statistics and convergence thresholds.

    `target_dev_cer` (a fraction) sets one dev CER for the convergence column of all
    runs. When it is None, each run uses the final dev CER of its reference run.
    """
    ordered = sorted(runs, key=lambda run: (_run_sort_key(run, main_split, reference_method), run.tag))
    comparisons = []
    thresholds: dict[str, float | None] = {}
    notes = report_notes(ordered, test_sets)
    for run in ordered:
        reference = reference_run(run, ordered, reference_method)
        thresholds[run.tag] = target_dev_cer if target_dev_cer is not None else (
            reference.final_dev_cer if reference is not None else None)
        if reference is None or reference is run:
            continue
        if run.scoring_text != reference.scoring_text:
            # Other normalization means other reference lengths: the paired statistics do not apply.
            notes.append(f"{run.tag}: not compared with {reference.tag}, because their scoring.text settings differ")
            continue
        for test_set in test_sets:
            comparisons.append(compare_runs(run, reference, test_set, resamples, seed))
    label = f"{100 * target_dev_cer:.2f}%" if target_dev_cer is not None else f"{reference_method}'s final"
    for note in notes:
        logger.warning("%s", note)
    return ComparisonReport(list(ordered), dict(base), list(test_sets), main_split, main_rank, reference_method,
                            comparisons, thresholds, label, resamples, seed, notes)


def results_markdown(report: ComparisonReport, corpus: str, figures: Sequence[tuple[str, str]] = (),
                     command: Sequence[str] | None = None) -> str:
    """Return the text of the comparison RESULTS.md; `figures` lists (caption, file name) pairs."""
    runs = report.runs
    seeds = sorted({str(run.train_settings.get("seed")) for run in runs})
    lines = [
        f"# Method comparison: {corpus}",
        "",
        *provenance_lines(command),
        f"- runs: {len(runs)}; main training split: {report.main_split}; main rank: {report.main_rank}; "
        f"training seed: {', '.join(seeds) if seeds else 'n/a'}",
        f"- test sets: {', '.join(report.test_sets)}",
    ]
    differing = differing_settings(runs)
    lines.append(f"- settings that differ between runs: {', '.join(differing) if differing else 'none'}")
    if report.notes:
        lines += ["", "Check before reading the tables:", "", *[f"- {note}" for note in report.notes]]

    lines += [
        "",
        "## Character error rate",
        "",
        "CER = (S + D + I) / N over reference characters, after the `scoring.text` normalization, "
        "all whitespace removed.",
        "",
        *cer_table(runs, report.base, report.test_sets),
        "",
        f"## Change against {report.reference_method}",
        "",
        f"Relative change = (CER − CER_ref) / CER_ref, against the {report.reference_method} run of the same "
        "training split and rank (full fine-tuning: the one with the highest rank). 95% CI and p (bootstrap): "
        f"paired bootstrap over utterances, {report.resamples:,} resamples, seed {report.seed}, two-sided "
        "(n/a when every resample gives the same nonzero difference). "
        "p (sign test): exact two-sided sign test of per-utterance error counts, ties left out. "
        "Better / worse / tied counts the utterances with fewer / more / equal errors than the reference.",
        "",
    ]
    lines += comparison_table(report.comparisons, runs) if report.comparisons else [f"No run has a {report.reference_method} run to compare with."]

    lines += [
        "",
        "## Cost and convergence",
        "",
        "Trainable parameters: `log_trainable` in stage 3. Init s: adapter initialization time from the "
        "stage 3 log. Training min: training wall time at the end of the last epoch (dev decoding included). "
        "The last column gives the first epoch whose dev CER reaches the threshold in brackets.",
        "",
        *cost_table(runs, report.thresholds, report.threshold_label),
    ]

    ablation = ablation_table(runs, report.test_sets, report.main_split, report.main_rank)
    if ablation:
        lines += [
            "",
            f"## SPaRLoRA ablation (rank {report.main_rank}, {report.main_split})",
            "",
            f"Each step adds one part of SPaRLoRA to the one above. Change % is relative to {ABLATION_STEPS[0][0]}.",
            "",
            *ablation,
        ]

    if figures:
        lines += ["", "## Figures", ""]
        for caption, name in figures:
            lines += [f"![{caption}]({name})", ""]
        lines.pop()
    return "\n".join(lines) + "\n"


def base_scores(exp_root: Path, data_dir: Path, test_sets: Sequence[str], norm_cfg: TextNormConfig) -> dict[str, ScoreResult]:
    """Score the base model's zero-shot decodes; test sets without one are left out with a warning."""
    scores = {}
    for test_set in test_sets:
        hyp_path = exp_root / "base" / f"decode_{test_set}" / "hyp"
        if not hyp_path.is_file():
            logger.warning("base model decode not found: %s; the zero-shot row shows n/a for %s", hyp_path, test_set)
            continue
        scores[test_set] = score_hyp_file(data_dir / test_set / "text", hyp_path, norm_cfg)
    return scores


def write_comparison(report: ComparisonReport, out_path: Path, corpus: str, command: Sequence[str] | None = None) -> Path:
    """Write RESULTS.md and its figures into the folder of `out_path`; return `out_path`."""
    from sparlora.plots import plot_cer_vs_rank, plot_dev_cer

    out_path.parent.mkdir(parents=True, exist_ok=True)
    figures = []
    main_runs = [run for run in report.runs if run.train_split == report.main_split]
    curve_runs = [run for run in main_runs if run.rank in (report.main_rank, 0)]
    if plot_dev_cer(curve_runs, out_path.parent / DEV_CER_FIGURE):
        figures.append((f"dev CER per epoch, rank {report.main_rank}, {report.main_split}", DEV_CER_FIGURE))
    if plot_cer_vs_rank(main_runs, report.test_sets, out_path.parent / RANK_FIGURE, report.base):
        figures.append((f"test CER against rank, {report.main_split}", RANK_FIGURE))
    atomic_write_text(out_path, results_markdown(report, corpus, figures, command))
    return out_path


def main(argv: Sequence[str] | None = None) -> int:
    from sparlora.config import load_config, setup_logging

    parser = argparse.ArgumentParser(description="Compare the fine-tuning runs of one corpus and write RESULTS.md.")
    parser.add_argument("--config", required=True, help="recipe config, e.g. conf/demo.yaml")
    parser.add_argument("--tags", nargs="+", help="run folders under exp_root to compare (default: every folder with a train.log)")
    parser.add_argument("--reference-method", default="lora", help="method name the others are compared with (default: lora)")
    parser.add_argument("--main-rank", type=int, help="rank of the dev CER figure and the ablation table (default: the config's method.rank)")
    parser.add_argument("--target-dev-cer", type=float,
                        help="dev CER in percent for the convergence column (default: the reference run's final dev CER)")
    parser.add_argument("--resamples", type=int, default=10_000, help="bootstrap resamples (default: 10000)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: 0)")
    parser.add_argument("--out", help="output file (default: <exp_root>/RESULTS.md)")
    parser.add_argument("--command", help="command line to record in RESULTS.md (default: this process's own)")
    parser.add_argument("overrides", nargs="*", help="hydra overrides, e.g. data_dir=data/demo")
    args = parser.parse_args(argv)
    setup_logging()
    if args.tags:
        # Overrides written after --tags land in its list. A folder name with "=" is not a tag.
        args.overrides = [*args.overrides, *(tag for tag in args.tags if "=" in tag)]
        args.tags = [tag for tag in args.tags if "=" not in tag]
        if not args.tags:
            parser.error("--tags lists no run folder, only overrides; name the folders under exp_root to compare")

    cfg = load_config(args.config, args.overrides)
    exp_root, data_dir = Path(cfg.exp_root), Path(cfg.data_dir)
    test_sets = decode_split_names(cfg)
    runs = find_runs(exp_root, data_dir, test_sets, args.tags)
    if not runs:
        raise FileNotFoundError(f"no finished run found in {exp_root}; run scripts/compare_methods.sh or run.sh stages 3-5 first")
    logger.info("comparing %d runs: %s", len(runs), " ".join(run.tag for run in runs))

    norm_cfg = TextNormConfig.from_dict(cfg.scoring.text)
    report = build_report(
        runs, base_scores(exp_root, data_dir, test_sets, norm_cfg), test_sets,
        main_split=str(cfg.corpus.train_split),
        main_rank=args.main_rank if args.main_rank is not None else int(cfg.method.rank),
        reference_method=args.reference_method,
        target_dev_cer=args.target_dev_cer / 100 if args.target_dev_cer is not None else None,
        resamples=args.resamples, seed=args.seed,
    )
    command = shlex.split(args.command) if args.command else None
    out_path = write_comparison(report, Path(args.out) if args.out else exp_root / "RESULTS.md", str(cfg.corpus.name), command)
    logger.info("wrote %s", out_path)
    return 0


if __name__ == "__main__":
    from sparlora.config import run_main

    raise SystemExit(run_main(main))
