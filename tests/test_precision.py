"""The fp32 islands of bf16 training: quantizer distances / logits, softmax(A/τ), the entropy terms, RMSNorm and
RoPE are computed in fp32 under bf16 autocast (the precision context of every engine: DDP / FSDP2 through
accelerate, DeepSpeed through `TrainingEngines.autocast` and its engines' `torch_autocast`), while the matmuls
around them really run in bf16. Reference values are the same functions evaluated without autocast on the same
(fp32) inputs, or on the bf16-rounded inputs autocast hands them; equality is exact wherever the island is fp32
end to end.

The same dtypes are checked inside the 2-process DDP / DeepSpeed / FSDP2 bf16 runs in
`test_training_loop.py` (weights, codebook and norm weights fp32 during the forward, assignment logits and soft
read-out fp32, linear outputs bf16).
"""

from __future__ import annotations

import pytest
import torch

from gear_hf.models.configuration_gear_ar import GEARConfig
from gear_hf.models.configuration_gear_tokenizer import GEARTokenizerConfig
from gear_hf.models.modeling_gear_ar import GEARForCausalImageLM, GEARRMSNorm, apply_2d_rope, build_2d_rope_table
from gear_hf.models.modeling_gear_tokenizer import GEARTokenizerModel
from gear_hf.models.quantizers import entropy_loss, soft_embed, soft_readout

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def bf16_autocast():
    return torch.autocast(device_type="cpu", dtype=torch.bfloat16)


def tiny_tokenizer(quantizer: str) -> GEARTokenizerModel:
    extra = {} if quantizer == "lfq" else {"z_channels": 32, "codebook_embed_dim": 8}  # lfq: width log2 K = 6
    config = GEARTokenizerConfig(quantizer=quantizer, codebook_size=64, image_size=16, base_channels=32,
                                 channel_multipliers=[1, 2], num_res_blocks=1, attention_levels=[], **extra)
    return GEARTokenizerModel(config).train()


@pytest.mark.parametrize("quantizer", ["vq", "lfq", "ibq"])
def test_quantizer_distances_and_entropy_are_fp32_under_bf16_autocast(quantizer):
    """The encoder runs in bf16; the quantizer receives its latent and computes A (distances / logits), argmax
    and the entropy terms in fp32: exactly the fp32 quantizer applied to that latent."""
    model = tiny_tokenizer(quantizer)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    seen = {}

    def capture(module, args):
        seen["z"] = args[0]

    handle = model.quantize.register_forward_pre_hook(capture)
    with bf16_autocast():
        out = model.encode(x, return_assignment=True)
    handle.remove()
    assert seen["z"].dtype == torch.bfloat16, "the encoder should run in bf16 under autocast (test premise)"
    assert out.assignment_logits.dtype == torch.float32
    with torch.no_grad():
        reference = model.quantize(seen["z"].float(), return_assignment=True)  # fp32, no autocast
    torch.testing.assert_close(out.assignment_logits, reference.assignment_logits, rtol=0, atol=0)
    assert torch.equal(out.indices, reference.indices)

    # Entropy terms (also inside the quantizer in training mode): fp32 and autocast-independent.
    logits = reference.assignment_logits.detach()
    with bf16_autocast():
        under = entropy_loss(logits, temperature=0.01)
    plain = entropy_loss(logits, temperature=0.01)
    for a, b in zip(under, plain):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_soft_readout_is_fp32_softmax():
    """softmax(A/τ) in fp32 whatever the dtype of A (bf16 logits from an autocast region included), and the soft
    pass's softmax(A/τ)·E (`soft_embed`, fp32 table) in fp32 under autocast too."""
    logits = torch.randn(2, 5, 64) * 3
    table = torch.randn(64, 16)
    for dtype in (torch.float32, torch.bfloat16):
        a = logits.to(dtype)
        with bf16_autocast():
            pi = soft_readout(a, 0.1)
            embedded = soft_embed(a, table, 0.1)
        assert pi.dtype == torch.float32 and embedded.dtype == torch.float32
        torch.testing.assert_close(pi, torch.softmax(a.float() / 0.1, dim=-1), rtol=0, atol=0)
        torch.testing.assert_close(embedded, soft_embed(a.float(), table, 0.1), rtol=0, atol=0)


def test_rmsnorm_and_rope_compute_in_fp32():
    """RMSNorm and RoPE under autocast: fp32 inputs give the no-autocast result bit for bit; bf16 inputs are
    normalised / rotated in fp32 and rounded once at the end (not computed in bf16)."""
    torch.manual_seed(0)
    norm = GEARRMSNorm(32)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 7, 32) * 4
    with bf16_autocast():
        under = norm(x)
    assert torch.equal(under, norm(x))
    xb = x.bfloat16()
    with bf16_autocast():
        got = norm(xb)
    xf = xb.float()
    expected = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.eps)).bfloat16() * norm.weight
    assert torch.equal(got, expected)

    table = build_2d_rope_table(grid_size=4, head_dim=16, theta=10000.0)
    q = torch.randn(2, table.shape[0], 3, 16)
    with bf16_autocast():
        under = apply_2d_rope(q, table)
    assert torch.equal(under, apply_2d_rope(q, table))
    with bf16_autocast():
        rotated = apply_2d_rope(q.bfloat16(), table)
    assert rotated.dtype == torch.bfloat16
    assert torch.equal(rotated, apply_2d_rope(q.bfloat16().float(), table).bfloat16())


def test_ar_under_bf16_autocast_keeps_fp32_tables_and_logits():
    """The AR under autocast: blocks compute in bf16, the RoPE table stays fp32, the logits are fp32, and the soft
    read-out π·E multiplies the fp32 π by the (fp32) embedding table inside autocast's bf16 matmul."""
    config = GEARConfig(vocab_size=64, num_classes=10, image_size=16, downsample_factor=4, hidden_size=32,
                        num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    model = GEARForCausalImageLM(config).eval()
    ids = torch.randint(0, 64, (2, 15))
    labels = torch.randint(0, 10, (2,))
    dtypes = {}

    def record(module, args, output):
        dtypes["wqkv"] = output.dtype

    model.layers[0].attention.wqkv.register_forward_hook(record)
    with torch.no_grad(), bf16_autocast():
        out = model(input_ids=ids, class_labels=labels)
    assert dtypes["wqkv"] == torch.bfloat16
    assert out.logits.dtype == torch.float32
    assert model.rope_table(torch.device("cpu")).dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.parameters())
