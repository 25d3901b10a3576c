"""PEFT wiring: put a fine-tuning method on a model from one config mapping.

Methods: full fine-tuning (`type: full`) and every LoRA-family method PEFT provides
(`type: lora`): LoRA (`init: default`), DoRA (`use_dora: true`), PiSSA
(`init: pissa` or `pissa_niter_K`), OLoRA (`init: olora`) and SPaRLoRA
(`init: sparlora`), which lets PEFT build ordinary LoRA layers and then overwrites their
factors with `sparlora.init` (and residualizes the frozen weights). AdaLoRA
(`type: adalora`) uses PEFT's AdaLoRA layers; `AdaloraHooks` adds its orthogonal
regularization to the loss and updates its rank budget after every optimizer step,
because PEFT does both only inside the forward of transformers models. Nothing here imports
FunASR: the same functions work on any torch model with Linear layers.

Trainable-parameter policy, the same for every LoRA-family method: only the adapter
factors train (PEFT's `bias="none"`); biases, LayerNorms, the CIF predictor and the
output layer stay frozen. Full fine-tuning trains every parameter.
"""

from __future__ import annotations

import collections
import json
import logging
import re
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from sparlora.init import SparloraConfig, build_a, residualize, sparlora_factors

logger = logging.getLogger(__name__)

# Linear layers of FunASR's Paraformer that adapters target: in the SANM encoder the
# fused q/k/v projection (d_out = 3 d_model), the attention output and the two
# feed-forward layers; in the SANM decoder the cross-attention projections and the
# feed-forward layers. Left out on purpose: the FSMN depthwise Conv1d (`fsmn_block`),
# the decoder's output layer, the embedding and the CIF predictor.
TARGET_PRESETS = {
    "paraformer": r"^(?:.*\.)?(?:encoder|decoder)\..*\.(?:self_attn\.linear_q_k_v|self_attn\.linear_out|src_attn\.linear_q|src_attn\.linear_k_v|src_attn\.linear_out|feed_forward\.w_1|feed_forward\.w_2)$",
}

PEFT_INITS = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora"}


def resolve_targets(model: nn.Module, targets) -> list[str]:
    """Return the names of the Linear modules that `targets` selects.

    `targets` is a preset name from TARGET_PRESETS, a regular expression matched
    against full module names, or a list of name suffixes. A selected module that is
    not a Linear, or a pattern that selects nothing, raises ValueError naming it.
    """
    if isinstance(targets, str):
        pattern = re.compile(TARGET_PRESETS.get(targets, targets))
        selected = [(name, module) for name, module in model.named_modules() if name and pattern.search(name)]
        description = f"target pattern {targets!r}"
    else:
        suffixes = list(targets)
        selected = [(name, module) for name, module in model.named_modules()
                    if name and any(name == s or name.endswith("." + s) for s in suffixes)]
        description = f"target modules {suffixes}"
    if not selected:
        raise ValueError(f"{description} matches no module of {type(model).__name__}")
    for name, module in selected:
        if not isinstance(module, nn.Linear):
            shape = tuple(getattr(module, "weight", torch.empty(0)).shape)
            raise ValueError(f"{description} selects {name}, a {type(module).__name__} with weight shape {shape}; only Linear layers are supported")
    return [name for name, _ in selected]


def lora_config(method: Mapping[str, Any], target_names: list[str]):
    """Build the PEFT LoraConfig of a LoRA-family method."""
    from peft import LoraConfig

    init = method.get("init", "default")
    if init == "sparlora":
        init_lora_weights = True  # overwritten by apply_sparlora
    elif init in PEFT_INITS:
        init_lora_weights = PEFT_INITS[init]
    elif re.fullmatch(r"pissa_niter_\d+", str(init)):
        init_lora_weights = init
    else:
        raise ValueError(f"invalid method.init {init!r}; allowed: sparlora, default, gaussian, pissa, pissa_niter_K, olora")
    return LoraConfig(
        r=int(method["rank"]),
        lora_alpha=float(method["alpha"]),
        lora_dropout=float(method.get("dropout", 0.0)),
        use_rslora=bool(method.get("use_rslora", False)),
        use_dora=bool(method.get("use_dora", False)),
        init_lora_weights=init_lora_weights,
        target_modules=target_names,
        bias="none",
    )


def adalora_config(method: Mapping[str, Any], target_names: list[str], total_steps: int | None):
    """Build the PEFT AdaLoraConfig: ranks start at `adalora.init_r` and are pruned to `rank` on average.

    The budget schedule: `tinit` steps at full rank, pruning until `total_steps - tfinal`,
    then fixed ranks. Both default to a tenth of the run.
    """
    from peft import AdaLoraConfig

    if not total_steps or total_steps <= 0:
        raise ValueError("AdaLoRA needs the run's total number of optimizer steps (total_steps > 0)")
    settings = dict(method.get("adalora") or {})
    tinit = int(settings["tinit"]) if settings.get("tinit") is not None else total_steps // 10
    tfinal = int(settings["tfinal"]) if settings.get("tfinal") is not None else total_steps // 10
    # The allocator scores importance on the steps before total_steps - tfinal and fixes
    # the ranks at that step, so it needs at least one scoring step first.
    if total_steps - tfinal < max(2, tinit + 1):
        raise ValueError(
            f"AdaLoRA needs at least one importance-scoring step before its final phase: total_steps {total_steps}, "
            f"tinit {tinit}, tfinal {tfinal}; train for more steps or lower tinit and tfinal"
        )
    return AdaLoraConfig(
        init_r=int(settings.get("init_r", 64)),
        target_r=int(method["rank"]),
        lora_alpha=float(method["alpha"]),
        lora_dropout=float(method.get("dropout", 0.0)),
        target_modules=target_names,
        total_step=int(total_steps),
        tinit=tinit,
        tfinal=tfinal,
        deltaT=int(settings.get("deltaT", 1)),
        beta1=float(settings.get("beta1", 0.85)),
        beta2=float(settings.get("beta2", 0.85)),
        orth_reg_weight=float(settings.get("orth_reg_weight", 0.5)),
    )


class AdaloraHooks:
    """AdaLoRA's two training-loop duties for models whose forward is not a transformers model's.

    `regularization(model)` returns orth_reg_weight times the mean over AdaLoRA factors of
    ||P P^T - I||_F (P^T P for the B factors), the term PEFT adds to `outputs.loss`;
    `after_step(model, step)` calls PEFT's `update_and_allocate`, which must run after
    `optimizer.step()` and before `zero_grad()`.
    """

    def __init__(self, model: nn.Module, adapter_name: str = "default"):
        self.adapter_name = adapter_name
        self.weight = model.peft_config[adapter_name].orth_reg_weight

    def regularization(self, model: nn.Module) -> torch.Tensor | None:
        terms = []
        for name, parameter in model.named_parameters():
            if not parameter.requires_grad or f".{self.adapter_name}" not in name or parameter.numel() == 0:
                continue
            if ".lora_A." in name:
                gram = parameter @ parameter.T
            elif ".lora_B." in name:
                gram = parameter.T @ parameter
            else:
                continue
            identity = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
            terms.append(torch.linalg.matrix_norm(gram - identity))
        if not terms:
            return None
        return self.weight * torch.stack(terms).mean()

    def after_step(self, model: nn.Module, step: int) -> None:
        model.base_model.update_and_allocate(step)

    def state_dict(self, model: nn.Module) -> dict:
        """Return the rank allocator's importance statistics and the rank pattern, for checkpoints."""
        allocator = model.base_model.rankallocator
        return {
            "ipt": allocator.ipt,
            "exp_avg_ipt": allocator.exp_avg_ipt,
            "exp_avg_unc": allocator.exp_avg_unc,
            "rank_pattern": model.peft_config[self.adapter_name].rank_pattern,
        }

    def load_state_dict(self, model: nn.Module, state: dict) -> None:
        allocator = model.base_model.rankallocator
        allocator.ipt = state["ipt"]
        allocator.exp_avg_ipt = state["exp_avg_ipt"]
        allocator.exp_avg_unc = state["exp_avg_unc"]
        model.peft_config[self.adapter_name].rank_pattern = state["rank_pattern"]


def training_hooks(model: nn.Module):
    """Return the method-specific hooks of the training loop, or None."""
    from peft import PeftModel
    from peft.tuners.adalora import AdaLoraModel

    if isinstance(model, PeftModel) and isinstance(model.base_model, AdaLoraModel):
        return AdaloraHooks(model)
    return None


def lora_layers(model: nn.Module, adapter_name: str):
    """Yield (name, layer) for every PEFT LoRA layer of `model` that carries `adapter_name`."""
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
            yield name, module


def _materialize(linear: nn.Linear, device: torch.device) -> torch.Tensor:
    """Give a LoRA factor created on the meta device real (uninitialized) storage on `device`.

    PEFT builds the factors on the meta device with `low_cpu_mem_usage=True`, which skips
    the random draws that SPaRLoRA would overwrite anyway. Returns the weight tensor.
    """
    weight = linear.weight
    if weight.device.type == "meta":
        linear.weight = nn.Parameter(torch.empty(weight.shape, dtype=weight.dtype, device=device),
                                     requires_grad=weight.requires_grad)
    return linear.weight


@torch.no_grad()
def apply_sparlora(model: nn.Module, cfg: SparloraConfig, adapter_name: str = "default") -> int:
    """Overwrite the LoRA factors of every layer carrying `adapter_name` with SPaRLoRA's.

    Works after `get_peft_model` or `inject_adapter_in_model`. Returns the number of
    layers initialized. With `cfg.residual` the frozen weights become W - s B A.
    """
    if cfg.changes_output:
        if not cfg.allow_output_change:
            raise ValueError(
                f"b_init={cfg.b_init} without residual changes the model's output at step 0; "
                "set residual=true, or allow_output_change=true to do it on purpose"
            )
        logger.warning("b_init=%s without residual: the model's output at step 0 differs from the base model's", cfg.b_init)
    count = 0
    for name, layer in lora_layers(model, adapter_name):
        base = layer.get_base_layer()
        if not isinstance(base, nn.Linear):
            raise ValueError(f"{name}: SPaRLoRA needs a Linear base layer, found {type(base).__name__} with weight shape {tuple(base.weight.shape)}")
        lora_a = _materialize(layer.lora_A[adapter_name], base.weight.device)
        lora_b = _materialize(layer.lora_B[adapter_name], base.weight.device)
        scale = layer.scaling[adapter_name]
        where = f"{name} (Linear {base.in_features}->{base.out_features})"
        all_float32 = base.weight.dtype == lora_a.dtype == lora_b.dtype == torch.float32
        if all_float32 and cfg.b_init == "lstsq" and cfg.basis != "kaiming":
            # The common case without temporaries: B = W A^T / s written straight into
            # lora_B (A's rows are orthonormal), then W -= s B A in place.
            lora_a.copy_(build_a(base.weight, lora_a.shape[0], cfg, where))
            torch.mm(base.weight, lora_a.T, out=lora_b).mul_(1.0 / scale)
            if cfg.residual:
                base.weight.addmm_(lora_b, lora_a, alpha=-scale)
        else:
            a, b = sparlora_factors(base.weight, lora_a.shape[0], scale, cfg, where)
            lora_a.copy_(a.to(lora_a.dtype))
            lora_b.copy_(b.to(lora_b.dtype))
            if cfg.residual:
                base.weight.copy_(residualize(base.weight, a, b, scale))
        count += 1
    if count == 0:
        raise ValueError(f"no LoRA layer carries adapter {adapter_name!r}")
    return count


def apply_method(model: nn.Module, method: Mapping[str, Any], total_steps: int | None = None) -> nn.Module:
    """Prepare `model` for fine-tuning with `method` (the `method:` config section).

    Returns the model to train: the model itself for full fine-tuning, a PEFT
    PeftModel for the LoRA family and AdaLoRA. AdaLoRA needs `total_steps`, the number
    of optimizer steps of the whole run, for its rank-budget schedule.
    """
    kind = method.get("type", "lora")
    if kind == "adalora":
        from peft import get_peft_model

        targets = resolve_targets(model, method.get("target_modules") or "paraformer")
        peft_model = get_peft_model(model, adalora_config(method, targets, total_steps))
        log_trainable(peft_model, method.get("name", "adalora"))
        return peft_model
    if kind == "full":
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        log_trainable(model, method.get("name", "full"))
        return model
    if kind != "lora":
        raise ValueError(f"invalid method.type {kind!r}; allowed: full, lora, adalora")

    from peft import get_peft_model

    targets = resolve_targets(model, method.get("target_modules") or "paraformer")
    sparlora_init = method.get("init") == "sparlora"
    # SPaRLoRA overwrites both factors, so PEFT need not draw random ones first.
    peft_model = get_peft_model(model, lora_config(method, targets), low_cpu_mem_usage=sparlora_init)
    if sparlora_init:
        sparlora_cfg = SparloraConfig(**dict(method.get("sparlora") or {}))
        layers = apply_sparlora(peft_model, sparlora_cfg)
        logger.info("SPaRLoRA initialized %d layers (basis %s, select %s, b_init %s, residual %s)",
                    layers, sparlora_cfg.basis, sparlora_cfg.select, sparlora_cfg.b_init, sparlora_cfg.residual)
    log_trainable(peft_model, method.get("name", "lora"))
    return peft_model


def log_trainable(model: nn.Module, label: str) -> dict[str, int]:
    """Log the number and share of trainable parameters, in total and per module type."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    per_type: dict[str, int] = collections.Counter()
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            parts = [part for part in name.split(".") if not part.isdigit() and part not in ("default", "weight", "bias", "base_model", "model")]
            per_type[".".join(parts[-3:])] += parameter.numel()
    logger.info("%s: %d of %d parameters trainable (%.3f%%)", label, trainable, total, 100.0 * trainable / max(total, 1))
    for name, count in sorted(per_type.items()):
        logger.info("  %s: %d trainable", name, count)
    return {"trainable": trainable, "total": total}


def changes_base_weights(method: Mapping[str, Any]) -> bool:
    """True when the method's init rewrites the frozen weights (PiSSA, OLoRA, residual SPaRLoRA)."""
    init = str(method.get("init", "default"))
    if init == "sparlora":
        return bool((method.get("sparlora") or {}).get("residual", True))
    return init.startswith("pissa") or init == "olora"


def save_initial_adapter(peft_model, path: Path, adapter_name: str = "default") -> None:
    """Save the adapter as initialized, before any optimizer step.

    The saved config has `init_lora_weights: true`, as PEFT's conversion expects. The
    in-memory config is left as it was.
    """
    config = peft_model.peft_config[adapter_name]
    original = config.init_lora_weights
    config.init_lora_weights = True
    try:
        peft_model.save_pretrained(str(path), selected_adapters=[adapter_name])
    finally:
        config.init_lora_weights = original


def save_adapter_for_original_base(peft_model, path: Path, initial_path: Path) -> None:
    """Save the trained adapter as a plain LoRA adapter that applies to the original weights.

    When the init rewrote the frozen weights (W_res = W - s B0 A0), the update relative
    to the original W is s (B A - B0 A0) = s [B, -B0] [A; A0]: a rank-2r adapter, which
    PEFT writes with r and lora_alpha doubled (alpha times sqrt(2) with rsLoRA) so the
    scale stays the same. `initial_path` is the adapter saved by `save_initial_adapter`.
    The in-memory adapter and config are unchanged.
    """
    peft_model.save_pretrained(str(path), path_initial_model_for_weight_conversion=str(initial_path))


def load_adapter(base_model: nn.Module, adapter_dir: Path):
    """Return `base_model` wrapped in a PeftModel with the saved adapter of `adapter_dir`, for inference.

    For an AdaLoRA adapter, PEFT's check of rank_pattern keys against module names is
    silenced: AdaLoRA stores its pruning masks there under `<module>.lora_E` keys, which
    that check (present in peft 0.21.2) does not know, so it warns about every key.
    """
    from peft import PeftModel

    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text(encoding="utf-8"))
    with warnings.catch_warnings():
        if config.get("peft_type") == "ADALORA":
            warnings.filterwarnings("ignore", message="The following rank_pattern keys did not match", category=RuntimeWarning)
        model = PeftModel.from_pretrained(base_model, str(adapter_dir))
    model.eval()
    return model


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Return the state dict of the model with adapters merged into the weights.

    A PeftModel has its adapters merged in place (`merge_and_unload`). The keys are then
    those of the original model, so the result loads into it directly.
    """
    from peft import PeftModel

    if isinstance(model, PeftModel):
        model = model.merge_and_unload()
    return model.state_dict()
