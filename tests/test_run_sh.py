"""run.sh option parsing: invalid values fail before any stage runs."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_sh(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "run.sh"), "--skip-setup", "true", *args],
                          cwd=cwd, capture_output=True, text=True, timeout=60)


def test_help_lists_stages():
    result = run_sh("--help")
    assert result.returncode == 0
    for number in range(6):
        assert f"  {number}  " in result.stdout


@pytest.mark.parametrize("args,message", [
    (["--stage", "abc"], "invalid --stage 'abc'"),
    (["--stage", "6"], "invalid --stage '6'"),
    (["--stop-stage", "data_dir=/tmp/x"], "invalid --stop-stage"),
    (["--stage", "3", "--stop-stage", "1"], "--stage 3 is after --stop-stage 1"),
    (["--stages", "1"], "invalid option --stages"),
    (["--stage=1"], "write options as '--name value'"),
    (["--config", "nosuch.yaml"], "config file not found: nosuch.yaml"),
    (["--nproc", "0"], "invalid --nproc '0'"),
    (["--nproc", "two"], "invalid --nproc 'two'"),
])
def test_invalid_options_rejected(args, message):
    result = run_sh(*args)
    assert result.returncode == 1
    assert message in result.stderr


def test_stage_error_is_one_line():
    import sys

    result = subprocess.run([sys.executable, "-m", "sparlora.train", "--config", "conf/demo.yaml", "train.accum_grad=0"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "invalid train.accum_grad 0" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args,message", [
    (["--methods", "lora sparlora_typo"], "unknown method 'sparlora_typo': conf/method/sparlora_typo.yaml not found; "
                                          "available: adalora dora full lora"),
    (["--sweep-methods", "nosuch"], "unknown method 'nosuch'"),
    (["--methods", "", "--sweep-methods", ""], "no runs: --methods and --sweep-methods are both empty"),
    (["--methods", "lora ../demo"], "invalid method name '../demo'"),
    (["--ranks", "abc"], "invalid rank 'abc' in --ranks or --sweep-ranks"),
    (["--ranks", "8 0"], "invalid rank '0'"),
    (["--sweep-ranks", "08"], "invalid rank '08'"),
    (["--ranks", ""], "--ranks is empty"),
])
def test_compare_methods_rejects_bad_method_lists(args, message, tmp_path):
    # Checked before any stage runs, so nothing is written under the experiment root.
    result = subprocess.run(["bash", str(ROOT / "scripts" / "compare_methods.sh"), "--skip-setup", "true", *args,
                             f"exp_root={tmp_path}/exp", f"data_dir={tmp_path}/data"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert message in result.stderr
    assert not (tmp_path / "exp").exists()
    assert not (tmp_path / "data").exists()
