"""lora.py against hand-written formulas, bitsandbytes' own dequantization, and PEFT (the file-format reference)."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lora
import weights
from weights import CheckpointError

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


class Block(nn.Module):
    """A tiny module with HF-style names: attention projections, an MLP and a norm."""

    def __init__(self, d=32):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.mlp = nn.Sequential()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, x):  # (B, T, d)
        h = self.norm(x)
        h = self.o_proj(torch.tanh(self.q_proj(h)) * self.k_proj(h) + self.v_proj(h))
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(h)))


def randomize_adapters(module):
    for name, p in module.named_parameters():
        if "lora_" in name:
            with torch.no_grad():
                p.normal_(0, 0.2)


def dequant(layer):
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state)


# ----------------------------------------------------------------------------------------------------------------
# LoRALinear maths


def test_init_equals_base_then_formula():
    base = nn.Linear(16, 24, bias=True)
    layer = lora.LoRALinear.from_linear(base, r=4, alpha=8)
    x = torch.randn(2, 5, 16)
    assert torch.equal(layer(x), base(x))  # lora_B starts at zero
    assert layer.lora_A.weight.abs().sum() > 0 and layer.lora_B.weight.abs().sum() == 0
    randomize_adapters(layer)
    A, B = layer.lora_A.weight, layer.lora_B.weight  # (r, in), (out, r)
    torch.testing.assert_close(layer(x), base(x) + (8 / 4) * (x @ A.T) @ B.T)
    assert set(layer.state_dict()) == {"weight", "bias", "lora_A.weight", "lora_B.weight"}


def test_merge_matches_unmerged():
    model = Block()
    inject = lora.inject_lora(model, ["q_proj", "v_proj", "fc1"], r=4, alpha=16, dropout=0.0)
    assert inject == ["q_proj", "v_proj", "mlp.fc1"]
    randomize_adapters(model)
    q = model.q_proj
    torch.testing.assert_close(q.merged_weight(), q.weight + 4.0 * q.lora_B.weight @ q.lora_A.weight)
    x = torch.randn(2, 3, 32)
    want = model(x)
    merged = lora.merge_lora(copy.deepcopy(model))
    assert not any(isinstance(m, lora.LoRALinear) for m in merged.modules())
    assert type(merged.mlp.fc1) is nn.Linear and merged.mlp.fc1.bias is not None
    torch.testing.assert_close(merged(x), want, rtol=1e-5, atol=1e-5)
    assert set(merged.state_dict()) == set(Block().state_dict())


def test_inject_targets_and_freezing():
    model, plain = Block(), Block()
    plain.load_state_dict(model.state_dict())
    names = lora.inject_lora(model, ["k_proj", "fc2"], r=2, alpha=4, dropout=0.0)
    assert names == ["k_proj", "mlp.fc2"]
    kinds = {n: type(m).__name__ for n, m in model.named_children()}
    assert kinds["k_proj"] == "LoRALinear" and kinds["q_proj"] == kinds["v_proj"] == kinds["o_proj"] == "Linear"
    assert isinstance(model.mlp.fc2, lora.LoRALinear) and type(model.mlp.fc1) is nn.Linear
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == [f"{n}.lora_{ab}.weight" for n in ("k_proj", "mlp.fc2") for ab in "AB"]
    assert sorted(n for n in model.state_dict() if '.lora_' in n) == trainable
    # a base checkpoint still loads: the base keys are unchanged, only adapter keys are added
    missing, unexpected = model.load_state_dict(plain.state_dict(), strict=False)
    assert unexpected == [] and sorted(missing) == trainable
    x = torch.randn(1, 4, 32)
    torch.testing.assert_close(model(x), plain(x))
    with pytest.raises(ValueError, match="out_proj"):
        lora.inject_lora(Block(), ["q_proj", "out_proj"], r=2, alpha=4, dropout=0.0)


def test_dropout_only_on_adapter_input():
    base = nn.Linear(16, 8)
    layer = lora.LoRALinear.from_linear(base, r=4, alpha=4, dropout=0.5)
    randomize_adapters(layer)
    x = torch.randn(3, 16)
    A, B = layer.lora_A.weight, layer.lora_B.weight
    layer.train()
    torch.manual_seed(1)
    got = layer(x)
    torch.manual_seed(1)
    xd = F.dropout(x, 0.5, training=True)  # the same mask nn.Dropout draws
    torch.testing.assert_close(got, base(x) + (xd @ A.T) @ B.T)
    layer.eval()
    torch.testing.assert_close(layer(x), base(x) + (x @ A.T) @ B.T)
    no_drop = lora.LoRALinear.from_linear(base, r=4, alpha=4, dropout=0.0).train()
    assert isinstance(no_drop.dropout, nn.Identity)



def test_packed_dropout_is_nn_dropout():
    """extras.lora_dropout: on a CPU it draws nn.Dropout's very mask (bernoulli_(1 - p) on a tensor like x), so the
    output and every gradient must equal the plain layer's under the same seed."""
    from extras.lora_dropout import DropoutLinear, pack_lora_dropout

    base = nn.Linear(32, 24)
    plain = lora.LoRALinear.from_linear(base, r=4, alpha=8, dropout=0.3).train()
    randomize_adapters(plain)
    packed = copy.deepcopy(plain)
    weight = packed.lora_A.weight
    assert pack_lora_dropout(packed) == 1
    assert isinstance(packed.lora_A, DropoutLinear) and isinstance(packed.dropout, nn.Identity)
    assert [n for n, _ in packed.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert packed.lora_A.weight is weight and pack_lora_dropout(packed) == 0  # the same Parameter; moved once
    # left to nn.Dropout: no dropout at all, or an input width the bit packing cannot split into bytes
    assert pack_lora_dropout(lora.LoRALinear.from_linear(nn.Linear(32, 4), r=2, alpha=4, dropout=0.0)) == 0
    assert pack_lora_dropout(lora.LoRALinear.from_linear(nn.Linear(12, 4), r=2, alpha=4, dropout=0.1)) == 0
    x = torch.randn(2, 5, 32)
    results = []
    for layer in (plain, packed):
        xi = x.clone().requires_grad_()
        torch.manual_seed(7)
        y = layer(xi)
        (y * torch.linspace(-1, 1, 24)).sum().backward()
        results.append((y, xi.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad))
    assert (results[0][0] != base(x)).any()  # the adapter and its dropout are in play
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want)
    packed.eval()
    torch.testing.assert_close(packed(x), base(x) + (x @ packed.lora_A.weight.T) @ packed.lora_B.weight.T * 2)


def test_packed_dropout_keeps_one_bit_per_element():
    """What backward keeps of q, k and v's three adapters on one input x: x once and three 1-bit masks, where autograd
    keeps three dropped copies of x and three masks (on a CPU nn.Dropout keeps its mask as a scaled copy in x's dtype,
    on a GPU as bool), plus, in both, each adapter's r-wide A output. Parameters are not counted."""
    from extras.lora_dropout import pack_bits, pack_lora_dropout, unpack_bits

    keep = torch.rand(3, 64) > 0.5
    assert pack_bits(keep).shape == (3, 8) and torch.equal(unpack_bits(pack_bits(keep)), keep)
    r, n, d = 4, 128, 64
    layers = [lora.LoRALinear.from_linear(nn.Linear(d, d, bias=False), r=r, alpha=8, dropout=0.1).train()
              for _ in range(3)]

    def saved_bytes(x):
        storages = {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in params:
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            sum(layer(x).sum() for layer in layers)
        return sum(storages.values())

    x = torch.randn(n, d, dtype=torch.bfloat16, requires_grad=True)
    for layer in layers:
        layer.to(torch.bfloat16)
    params = {p.untyped_storage().data_ptr() for layer in layers for p in layer.parameters()}
    a_outputs = 3 * n * r * 2
    assert saved_bytes(x) == 3 * (n * d * 2 + n * d * 2) + a_outputs
    for layer in layers:
        pack_lora_dropout(layer)
    assert saved_bytes(x) == n * d * 2 + 3 * n * d // 8 + a_outputs

# ----------------------------------------------------------------------------------------------------------------
# NF4 (QLoRA)


def test_nf4_equals_lora_on_dequantized_weight():
    base = nn.Linear(64, 48, bias=True)
    layer = lora.LoRALinear.from_linear(base, r=4, alpha=8, nf4=True)
    st = layer.weight.quant_state
    assert layer.weight.dtype == torch.uint8 and st.quant_type == "nf4" and st.blocksize == 64 and st.nested
    randomize_adapters(layer)
    w = dequant(layer)  # (out, in) float32
    assert 0 < (w - base.weight).abs().max() < 0.2  # it really is quantized, and close
    ref = lora.LoRALinear.from_linear(nn.Linear(64, 48), r=4, alpha=8)
    ref.weight.data, ref.bias.data = w, base.bias.data
    ref.load_state_dict({"lora_A.weight": layer.lora_A.weight, "lora_B.weight": layer.lora_B.weight}, strict=False)
    x = torch.randn(2, 5, 64)
    torch.testing.assert_close(layer(x), ref(x), rtol=1e-6, atol=1e-6)
    # merge from NF4 = dequantized base + delta
    torch.testing.assert_close(layer.merged_weight(), w + 2.0 * layer.lora_B.weight @ layer.lora_A.weight)
    # bf16 compute: the base product runs in bf16, the output keeps the input dtype
    layer.compute_dtype = torch.bfloat16
    y = layer(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, ref(x), rtol=2e-2, atol=2e-2)


def test_nf4_gradients_reach_adapters_only():
    model = Block()
    lora.inject_lora(model, ["q_proj", "k_proj", "v_proj", "o_proj"], r=4, alpha=8, dropout=0.1, nf4=True)
    randomize_adapters(model)
    x = torch.randn(2, 3, 32, requires_grad=True)
    model(x).square().mean().backward()
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name
    assert x.grad is not None and x.grad.abs().sum() > 0  # the frozen NF4 base still passes gradients through


def test_r0_nf4_frozen_base_then_adapters():
    model = Block()
    ref = copy.deepcopy(model)
    names = lora.quantize_nf4(model, ["q_proj", "fc1"])
    assert names == ["q_proj", "mlp.fc1"]
    for n in names:
        layer = model.get_submodule(n)
        assert layer.r == 0 and layer.lora_A is None and not layer.weight.requires_grad
        ref.get_submodule(n).weight.data = dequant(layer)
    x = torch.randn(2, 3, 32)
    torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)
    assert not any('.lora_' in n for n in model.state_dict())
    # QLoRA flow: quantize first, then add adapters to the already-NF4 layers
    lora.inject_lora(model, ["q_proj", "fc1"], r=2, alpha=4, dropout=0.0)
    assert model.q_proj.nf4 and model.q_proj.r == 2
    torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)
    merged = lora.merge_lora(model)
    torch.testing.assert_close(merged(x), ref(x), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# PEFT files

LLAMA_TABLE = {f"model.layers.{{}}.{p}.{n}.weight": f"layers.{{}}.{p}.{n}.weight"
               for p, names in (("self_attn", LLAMA_TARGETS[:4]), ("mlp", LLAMA_TARGETS[4:])) for n in names}


def test_hf_name_mapper():
    table = {"vision_model.encoder.layers.{}.self_attn.q_proj.weight": "layers.{}.self_attn.q_proj.weight",
             "vision_model.encoder.layers.{}.self_attn.q_proj.bias": "layers.{}.self_attn.q_proj.bias",
             "logit_scale": None}
    to_hf, from_hf = weights.hf_name_mapper(table)
    assert to_hf("layers.11.self_attn.q_proj") == "vision_model.encoder.layers.11.self_attn.q_proj"
    assert from_hf("vision_model.encoder.layers.11.self_attn.q_proj") == "layers.11.self_attn.q_proj"
    with pytest.raises(KeyError):
        to_hf("layers.0.mlp.fc1")


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_peft_loads_our_adapter(tiny_llama, tmp_path):
    from peft import PeftModel

    to_hf, _ = weights.hf_name_mapper(LLAMA_TABLE)
    ours = copy.deepcopy(tiny_llama)
    lora.inject_lora(ours.model, LLAMA_TARGETS, r=4, alpha=8, dropout=0.05)  # our module = the decoder, HF's "model."
    randomize_adapters(ours)
    ours.eval()
    lora.save_adapter(ours.model, tmp_path, to_hf, r=4, alpha=8, dropout=0.05, targets=LLAMA_TARGETS,
                      task_type="CAUSAL_LM", base_model="tiny")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(tiny_llama), tmp_path).eval()
    assert peft_model.peft_config["default"].r == 4 and peft_model.peft_config["default"].lora_alpha == 8
    ids = torch.randint(0, 64, (2, 7))
    want = logits(peft_model, ids)
    assert (want - logits(tiny_llama, ids)).abs().max() > 1e-3  # the adapter really changes the output
    torch.testing.assert_close(logits(ours, ids), want, rtol=1e-5, atol=1e-5)


@pytest.fixture
def peft_adapter(tiny_llama, tmp_path):
    """An adapter 'trained' by PEFT (random lora_B), and its logits."""
    from peft import LoraConfig, get_peft_model

    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM")
    model = get_peft_model(copy.deepcopy(tiny_llama), config)
    randomize_adapters(model)
    ids = torch.randint(0, 64, (2, 7))
    return model, targets, ids, logits(model.eval(), ids)


@pytest.mark.parametrize("safe", [True, False])
def test_our_module_loads_peft_adapter(tiny_llama, peft_adapter, tmp_path, safe):
    model, targets, ids, want = peft_adapter
    model.save_pretrained(tmp_path / "ad", safe_serialization=safe)
    to_hf, _ = weights.hf_name_mapper(LLAMA_TABLE)
    ours = copy.deepcopy(tiny_llama)
    lora.inject_lora(ours.model, targets, r=2, alpha=4, dropout=0.0)  # other r / alpha: load re-creates the adapters
    loaded = lora.load_adapter(ours.model, tmp_path / "ad", to_hf)
    assert len(loaded) == 2 * 4 and ours.model.layers[0].self_attn.q_proj.r == 8
    assert ours.model.layers[1].self_attn.o_proj.scaling == 2.0
    torch.testing.assert_close(logits(ours, ids), want, rtol=1e-5, atol=1e-5)


def test_xtuner_pth_keys_and_strictness(tiny_llama, peft_adapter):
    model, targets, ids, want = peft_adapter
    # an XTuner iter_N.pth: "llm." + PEFT's in-memory names (with ".default"), next to other parts of LLaVA
    sd = {"llm." + k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert any(".lora_A.default.weight" in k for k in sd)
    sd["projector.model.0.weight"] = torch.zeros(2, 2)
    sd["llm.base_model.model.output.lora_A.default.weight"] = torch.zeros(8, 32)  # InternLM2's head has LoRA too
    to_hf, _ = weights.hf_name_mapper(LLAMA_TABLE)
    ours = copy.deepcopy(tiny_llama)
    lora.inject_lora(ours.model, targets, r=8, alpha=16, dropout=0.0)
    before = copy.deepcopy(ours.state_dict())
    with pytest.raises(CheckpointError, match="output.lora_A"):
        lora.load_adapter(ours.model, sd, to_hf, prefix="llm.", config={"r": 8, "lora_alpha": 16})
    assert all(torch.equal(v, before[k]) for k, v in ours.state_dict().items())  # a failed load changes nothing
    lora.load_adapter(ours.model, sd, to_hf, prefix="llm.", skip=["output"], config={"r": 8, "lora_alpha": 16})
    torch.testing.assert_close(logits(ours, ids), want, rtol=1e-5, atol=1e-5)
    # a LoRA layer the adapter does not cover is an error too
    more = copy.deepcopy(tiny_llama)
    lora.inject_lora(more.model, targets + ["gate_proj"], r=8, alpha=16, dropout=0.0)
    with pytest.raises(CheckpointError, match="layers.0.mlp.gate_proj.lora_A"):
        lora.load_adapter(more.model, sd, to_hf, prefix="llm.", skip=["output"], config={"r": 8, "lora_alpha": 16})
