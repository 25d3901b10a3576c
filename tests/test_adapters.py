"""PEFT wiring of every method, on plain Linears and on a FunASR Paraformer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparlora.adapters import apply_method, apply_sparlora, merged_state_dict, resolve_targets
from sparlora.init import SparloraConfig
from sparlora.model import load_paraformer

SPARLORA = dict(name="sparlora", type="lora", rank=4, alpha=8, init="sparlora",
                sparlora=dict(basis="dft_complex", select="lowest", b_init="lstsq", residual=True))


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(17, 24), nn.ReLU(), nn.Linear(24, 9))

    def forward(self, x):
        return self.encoder(x)


@pytest.fixture(scope="module")
def paraformer(tiny_model_dir):
    model, kwargs = load_paraformer(tiny_model_dir)
    return model, kwargs


def paraformer_outputs(model, seed=0):
    """Encoder output and decoder logits of a fixed random batch, in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    speech = torch.randn(2, 40, 560, generator=generator)
    lengths = torch.tensor([40, 31])
    model.eval()
    with torch.no_grad():
        enc, enc_lens = model.encode(speech, lengths)
        acoustic_embeds, token_num, _, _ = model.calc_predictor(enc, enc_lens)[:4]
        token_num = token_num.round().long().clamp_min(1)
        dec = model.cal_decoder_with_predictor(enc, enc_lens, acoustic_embeds, token_num)[0]
    return enc, dec


def fresh_paraformer(model_dir):
    return load_paraformer(model_dir)[0]


def test_paraformer_preset_targets(paraformer):
    names = resolve_targets(paraformer[0], "paraformer")
    suffixes = {name.rsplit(".", 2)[-2] + "." + name.rsplit(".", 1)[-1] for name in names}
    assert suffixes == {"self_attn.linear_q_k_v", "self_attn.linear_out", "feed_forward.w_1", "feed_forward.w_2",
                        "src_attn.linear_q", "src_attn.linear_k_v", "src_attn.linear_out"}
    assert not any("output_layer" in name or "predictor" in name or "fsmn" in name for name in names)


def test_sparlora_keeps_paraformer_outputs(tiny_model_dir):
    model = fresh_paraformer(tiny_model_dir)
    enc0, dec0 = paraformer_outputs(model)
    peft_model = apply_method(model, SPARLORA)
    enc1, dec1 = paraformer_outputs(peft_model)
    assert (enc1 - enc0).abs().max().item() <= 1e-4
    assert (dec1 - dec0).abs().max().item() <= 1e-4


def test_sparlora_changes_base_weights(tiny_model_dir):
    model = fresh_paraformer(tiny_model_dir)
    before = model.encoder.encoders[0].feed_forward.w_1.weight.clone()
    peft_model = apply_method(model, SPARLORA)
    layer = peft_model.base_model.model.encoder.encoders[0].feed_forward.w_1
    assert not torch.equal(layer.base_layer.weight, before)
    assert torch.count_nonzero(layer.lora_B["default"].weight) > 0


def test_merge_matches_unmerged(tiny_model_dir):
    model = fresh_paraformer(tiny_model_dir)
    peft_model = apply_method(model, SPARLORA)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:
                parameter.add_(0.01 * torch.randn_like(parameter))
    enc_adapter, dec_adapter = paraformer_outputs(peft_model)
    merged = fresh_paraformer(tiny_model_dir)
    merged.load_state_dict(merged_state_dict(peft_model))
    enc_merged, dec_merged = paraformer_outputs(merged)
    assert (enc_merged - enc_adapter).abs().max().item() <= 1e-4
    assert (dec_merged - dec_adapter).abs().max().item() <= 1e-4


@pytest.mark.parametrize("method", [
    dict(name="lora", type="lora", rank=4, alpha=8, init="default"),
    dict(name="dora", type="lora", rank=4, alpha=8, init="default", use_dora=True),
    dict(name="pissa", type="lora", rank=4, alpha=8, init="pissa"),
    dict(name="olora", type="lora", rank=4, alpha=8, init="olora"),
    dict(name="full", type="full"),
    SPARLORA,
])
def test_method_trains_one_step(method):
    torch.manual_seed(0)
    model = apply_method(TwoLayer(), dict(method, target_modules=["encoder.0", "encoder.2"]))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    x, y = torch.randn(8, 17), torch.randn(8, 9)
    before = [p.detach().clone() for p in params]
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(p, q) for p, q in zip(params, before))


def test_lora_freezes_base_and_bias():
    model = apply_method(TwoLayer(), dict(name="lora", type="lora", rank=4, alpha=8, init="default", target_modules=["encoder.0"]))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"base_model.model.encoder.0.lora_A.default.weight", "base_model.model.encoder.0.lora_B.default.weight"}


def test_target_matching_nothing_rejected():
    with pytest.raises(ValueError, match="matches no module"):
        resolve_targets(TwoLayer(), ["decoder.w_9"])


def test_non_linear_target_rejected():
    model = nn.Sequential(nn.Conv1d(8, 8, 11, groups=8, bias=False))
    with pytest.raises(ValueError, match=r"selects 0, a Conv1d with weight shape \(8, 1, 11\)"):
        resolve_targets(model, ["0"])


def test_odd_rank_names_module():
    with pytest.raises(ValueError, match=r"encoder\.0 \(Linear 17->24\).*even"):
        apply_method(TwoLayer(), dict(SPARLORA, rank=3, target_modules=["encoder.0"]))


def test_output_change_needs_permission():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(TwoLayer(), LoraConfig(r=4, lora_alpha=8, target_modules=["encoder.0"]))
    with pytest.raises(ValueError, match="allow_output_change"):
        apply_sparlora(model, SparloraConfig(b_init="lstsq", residual=False))


def test_other_adapter_name():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(TwoLayer(), LoraConfig(r=4, lora_alpha=8, target_modules=["encoder.0"]), adapter_name="dialect")
    x = torch.randn(3, 17)
    before = model(x)
    assert apply_sparlora(model, SparloraConfig(), adapter_name="dialect") == 1
    assert (model(x) - before).abs().max().item() <= 1e-5


def test_fsmn_conv_target_rejected(paraformer):
    with pytest.raises(ValueError, match=r"fsmn_block, a Conv1d with weight shape \(128, 1, 11\)"):
        resolve_targets(paraformer[0], ["self_attn.fsmn_block"])


def test_fused_qkv_adapter_shape(tiny_model_dir):
    model = apply_method(fresh_paraformer(tiny_model_dir), SPARLORA)
    layer = model.base_model.model.encoder.encoders[0].self_attn.linear_q_k_v
    assert tuple(layer.lora_A["default"].weight.shape) == (4, 128)
    assert tuple(layer.lora_B["default"].weight.shape) == (384, 4)


def test_adalora_prunes_ranks_and_regularizes(tiny_model_dir):
    from sparlora.adapters import training_hooks

    model = apply_method(TwoLayer(), dict(name="adalora", type="adalora", rank=2, alpha=4,
                                          adalora=dict(init_r=4, tinit=2, tfinal=2), target_modules=["encoder.0", "encoder.2"]),
                         total_steps=12)
    hooks = training_hooks(model)
    assert hooks is not None
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for step in range(1, 13):
        x, y = torch.randn(8, 17, generator=generator), torch.randn(8, 9, generator=generator)
        regularization = hooks.regularization(model)
        assert regularization is not None and regularization.item() > 0
        loss = nn.functional.mse_loss(model(x), y) + regularization
        loss.backward()
        optimizer.step()
        hooks.after_step(model, step)
        optimizer.zero_grad()
    rank_pattern = model.peft_config["default"].rank_pattern
    assert rank_pattern
    kept = sum(sum(mask) for mask in rank_pattern.values())
    assert kept == 2 * 2  # target rank 2 on average over the 2 layers


def test_adalora_needs_total_steps():
    with pytest.raises(ValueError, match="total number of optimizer steps"):
        apply_method(TwoLayer(), dict(type="adalora", rank=2, alpha=4, target_modules=["encoder.0"]))


def test_no_hooks_for_lora():
    from sparlora.adapters import training_hooks

    assert training_hooks(apply_method(TwoLayer(), dict(SPARLORA, target_modules=["encoder.0"]))) is None


def test_library_imports_without_funasr():
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['funasr'] = None\n"
        "import sparlora.init, sparlora.adapters\n"
        "assert 'funasr' not in [m.split('.')[0] for m in sys.modules if sys.modules[m] is not None]\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_adalora_needs_a_scoring_step():
    with pytest.raises(ValueError, match="importance-scoring step"):
        apply_method(TwoLayer(), dict(type="adalora", rank=2, alpha=4, target_modules=["encoder.0"]), total_steps=1)


def test_fast_path_matches_factors():
    from peft import LoraConfig, get_peft_model

    from sparlora.init import sparlora_factors

    model = TwoLayer()
    original = model.encoder[0].weight.detach().clone()
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["encoder.0"]))
    apply_sparlora(peft_model, SparloraConfig())
    layer = peft_model.base_model.model.encoder[0]
    a, b = sparlora_factors(original, 4, 2.0, SparloraConfig())
    assert torch.allclose(layer.lora_A["default"].weight, a, atol=1e-6)
    assert torch.allclose(layer.lora_B["default"].weight, b, atol=1e-6)
    assert torch.allclose(layer.base_layer.weight, original - 2.0 * b @ a, atol=1e-6)


def test_empty_peft_factors_are_filled():
    """With low_cpu_mem_usage=True PEFT leaves the factors on the meta device; SPaRLoRA fills them."""
    from peft import LoraConfig, get_peft_model

    model = TwoLayer()
    x = torch.randn(3, 17)
    before = model(x)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["encoder.0", "encoder.2"]),
                                low_cpu_mem_usage=True)
    assert peft_model.base_model.model.encoder[0].lora_A["default"].weight.device.type == "meta"
    assert apply_sparlora(peft_model, SparloraConfig()) == 2
    assert not [name for name, p in peft_model.named_parameters() if p.device.type == "meta"]
    trainable = sorted(name for name, p in peft_model.named_parameters() if p.requires_grad)
    assert len(trainable) == 4 and all(".lora_" in name for name in trainable)
    assert (peft_model(x) - before).abs().max().item() <= 1e-5


def test_apply_method_leaves_no_meta_tensor(tiny_model_dir):
    model = apply_method(fresh_paraformer(tiny_model_dir), SPARLORA)
    assert not [name for name, p in model.named_parameters() if p.device.type == "meta"]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    assert {id(p) for group in optimizer.param_groups for p in group["params"]} == \
        {id(p) for n, p in model.named_parameters() if "lora_" in n}
