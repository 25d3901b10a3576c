#!/usr/bin/env python3
"""Benchmark training step time and memory of SPaRLoRA, LoRA, DoRA, PiSSA and full fine-tuning.

Two models: the demo base model (`local/demo/base_model`, d_model 128, 6 encoder blocks)
and a Paraformer with paraformer-large's shapes and random weights
(`bench_init.build_large_paraformer`). Every method trains its own copy of the model on
the same random batch of LFR features, in training mode (dropout, glancing sampler).
One step is what stage 3 does per batch: forward, backward, gradient clipping, AdamW
step, zero_grad.

Step time: after `--warmup` untimed rounds, `--rounds` rounds run one step of each
method in a rotating order. The methods are interleaved so that machine noise spreads
over all of them, and the median is reported.

Memory is measured in a fresh process per method, after the model is built and the
method applied. On CPU it is the peak resident set size (RSS, VmHWM of
/proc/self/status) during `--memory-steps` steps minus the RSS before them. Before the
steps, glibc's malloc_trim returns the memory that the init freed (PiSSA's SVD
temporaries, for example) to the system, so the steps cannot reuse it unseen, and
/proc/self/clear_refs resets VmHWM. tracemalloc is not used, because it does not see
torch's tensor allocations. On CUDA it is torch.cuda.max_memory_allocated() minus the
memory allocated before the steps. Both include the optimizer state, gradients and
activations.

Usage:
    python scripts/bench_train.py [--models demo,large] [--rounds 7] [--threads 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from sparlora.adapters import apply_method  # noqa: E402
from sparlora.train import forward_loss  # noqa: E402

DEMO_MODEL = ROOT / "local" / "demo" / "base_model"
# Random batch per model: utterances x LFR frames (60 ms each), tokens per utterance.
BATCH_SHAPES = {"demo": (8, 100, 20), "large": (2, 60, 12)}


def method_specs(rank: int) -> dict[str, dict]:
    sparlora = dict(basis="dft_complex", select="lowest", b_init="lstsq", residual=True)
    return {
        "SPaRLoRA": dict(name="sparlora", type="lora", rank=rank, alpha=2 * rank, init="sparlora", sparlora=sparlora),
        "LoRA": dict(name="lora", type="lora", rank=rank, alpha=2 * rank, init="default"),
        "DoRA": dict(name="dora", type="lora", rank=rank, alpha=2 * rank, init="default", use_dora=True),
        "PiSSA": dict(name="pissa", type="lora", rank=rank, alpha=2 * rank, init="pissa"),
        "full": dict(name="full", type="full"),
    }


def build_model(name: str) -> torch.nn.Module:
    if name == "demo":
        from sparlora.model import load_paraformer

        model, _ = load_paraformer(DEMO_MODEL)
    elif name == "large":
        from bench_init import build_large_paraformer

        torch.manual_seed(0)
        model = build_large_paraformer()
    else:
        raise ValueError(f"invalid model {name!r}: expected demo or large")
    return model.train()


def random_batch(model: torch.nn.Module, name: str, device: str) -> dict:
    """Return a batch of random normalized LFR features and token ids, shaped as BATCH_SHAPES[name]."""
    utterances, frames, tokens = BATCH_SHAPES[name]
    generator = torch.Generator().manual_seed(0)
    vocab_size = model.vocab_size
    return {
        "speech": torch.randn(utterances, frames, 560, generator=generator).to(device),
        "speech_lengths": torch.full((utterances,), frames, dtype=torch.long).to(device),
        # Ids 3 and up: 0-2 are <blank>, <s> and </s>.
        "text": torch.randint(3, vocab_size - 1, (utterances, tokens), generator=generator).to(device),
        "text_lengths": torch.full((utterances,), tokens, dtype=torch.long).to(device),
    }


class MethodRun:
    """One method's model, optimizer and step."""

    def __init__(self, base: torch.nn.Module, spec: dict, device: str):
        self.model = apply_method(copy.deepcopy(base), spec).to(device).train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4)
        self.device = device

    def step(self, batch: dict) -> None:
        loss, _, _ = forward_loss(self.model, batch, self.device)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 5.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def timed_step(self, batch: dict) -> float:
        synchronize(self.device)
        start = time.perf_counter()
        self.step(batch)
        synchronize(self.device)
        return time.perf_counter() - start


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def time_methods(model_name: str, specs: dict[str, dict], device: str, warmup: int, rounds: int) -> dict[str, float]:
    """Return the median step seconds of each method, from interleaved rounds."""
    base = build_model(model_name)
    runs = {name: MethodRun(base, spec, device) for name, spec in specs.items()}
    del base
    batch = random_batch(runs["LoRA"].model, model_name, device)
    names = list(runs)
    for _ in range(warmup):
        for name in names:
            runs[name].step(batch)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(runs[name].timed_step(batch))
    return {name: statistics.median(values) for name, values in times.items()}


def status_kib(field: str) -> int:
    """Return a field of /proc/self/status in KiB (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def release_freed_memory() -> None:
    """Return freed heap memory to the system with glibc's malloc_trim. Does nothing without glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.malloc_trim(0)


def measure_memory(model_name: str, spec: dict, device: str, steps: int) -> dict:
    """Return the training memory of one method in this process, in MiB (see the module docstring)."""
    base = build_model(model_name)
    run = MethodRun(base, spec, device)
    del base
    batch = random_batch(run.model, model_name, device)
    parameters_mib = sum(p.numel() * p.element_size() for p in run.model.parameters()) / 2**20
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        for _ in range(steps):
            run.step(batch)
        torch.cuda.synchronize(device)
        return {"training_mib": (torch.cuda.max_memory_allocated(device) - before) / 2**20, "parameters_mib": parameters_mib,
                "measure": "torch.cuda.max_memory_allocated"}
    release_freed_memory()
    before = status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux 4.0 and later, proc(5))
    for _ in range(steps):
        run.step(batch)
    return {"training_mib": (status_kib("VmHWM") - before) / 1024, "parameters_mib": parameters_mib, "measure": "peak RSS"}


def memory_in_subprocess(model_name: str, method: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--memory-child", model_name, method, "--rank", str(args.rank),
               "--threads", str(args.threads), "--device", args.device, "--memory-steps", str(args.memory_steps)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"memory measurement of {method} on {model_name} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def print_table(model_name: str, seconds: dict[str, float], memory: dict[str, dict]) -> None:
    lora = seconds["LoRA"]
    measure = next(iter(memory.values()))["measure"] if memory else ""
    print(f"\n### {model_name}: batch of {BATCH_SHAPES[model_name][0]} x {BATCH_SHAPES[model_name][1]} LFR frames, "
          f"{BATCH_SHAPES[model_name][2]} tokens each\n")
    print(f"| method | median step seconds | / LoRA | training memory MiB ({measure}) | parameters MiB |")
    print("|---|---:|---:|---:|---:|")
    for name, value in seconds.items():
        used = memory.get(name, {})
        training = f"{used['training_mib']:.0f}" if used else "-"
        parameters = f"{used['parameters_mib']:.0f}" if used else "-"
        print(f"| {name} | {value:.4f} | {value / lora:.3f} | {training} | {parameters} |")
    print(f"\nSPaRLoRA / LoRA step time = {seconds['SPaRLoRA'] / lora:.3f} (target <= 1.02)")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="demo,large", help="comma-separated: demo, large")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds before timing")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds, of which the median is reported")
    parser.add_argument("--memory-steps", type=int, default=2, help="steps of each memory measurement")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--skip-memory", action="store_true", help="report step times only")
    parser.add_argument("--memory-child", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    specs = method_specs(args.rank)
    if args.memory_child:
        model_name, method = args.memory_child
        print(json.dumps(measure_memory(model_name, specs[method], args.device, args.memory_steps)))
        return 0

    device_name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else (platform.processor() or platform.machine())
    print(f"machine: {device_name}, {os.cpu_count()} CPUs, torch {torch.__version__}, {args.threads} threads, rank {args.rank}")
    print(f"step time: median of {args.rounds} interleaved rounds after {args.warmup} warm-up rounds")
    for model_name in args.models.split(","):
        seconds = time_methods(model_name, specs, args.device, args.warmup, args.rounds)
        memory = {} if args.skip_memory else {name: memory_in_subprocess(model_name, name, args) for name in specs}
        print_table(model_name, seconds, memory)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
