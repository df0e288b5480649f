"""The row-chunked soft read-out `soft_embed` and entropy regulariser against their dense formulas.

Agreement is measured as max |chunked - dense| / max |dense| per tensor (the blocks sum the same terms in another
order, so elementwise relative error is meaningless where a value cancels to ~0). fp32: <= 1e-6.
"""

from __future__ import annotations

import pytest
import torch

import gear_hf.models.chunked_softmax as chunked_softmax
import gear_hf.models.quantizers as quantizers
from gear_hf.models.quantizers import VectorQuantizer, entropy_loss, soft_embed
from gear_hf.testing_utils import peak_allocated_bytes, saved_tensor_bytes

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of at most 4096 logits, so tiny inputs span several blocks (and a partial last one)."""
    monkeypatch.setattr(chunked_softmax, "BLOCK_ELEMENTS", 4096)


def assert_rel_close(actual, expected, tol=1e-6):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    scale = expected.abs().max().clamp_min(torch.finfo(expected.dtype).tiny)
    assert (actual - expected).abs().max() <= tol * scale, ((actual - expected).abs().max() / scale).item()


def soft_embed_with_grads(logits, weight, temperature, grad_out, chunked):
    out = soft_embed(logits, weight, temperature, chunked=chunked)
    return (out, *torch.autograd.grad(out, (logits, weight), grad_out))


def entropy_with_grad(logits, chunked, **kwargs):
    loss, sample, avg = entropy_loss(logits, chunked=chunked, **kwargs)
    return (loss, sample, avg, *torch.autograd.grad(loss, logits))


# Leading dims, K and D: several blocks of 4096 // K rows each, the last one partial.
SHAPES = [((97,), 100, 16), ((3, 11), 257, 8), ((2, 5, 7), 64, 5)]


@pytest.mark.parametrize("lead, codebook_size, dim", SHAPES)
@pytest.mark.parametrize("temperature", [1.0, 0.1, 1e-4])
def test_soft_embed_matches_dense(small_blocks, lead, codebook_size, dim, temperature):
    logits = (3 * torch.randn(*lead, codebook_size)).requires_grad_()
    weight = torch.randn(codebook_size, dim, requires_grad=True)
    grad_out = torch.randn(*lead, dim)
    rows, block_rows = logits[..., 0].numel(), chunked_softmax.rows_per_block(codebook_size)
    assert rows > block_rows and rows % block_rows != 0
    dense = soft_embed_with_grads(logits, weight, temperature, grad_out, chunked=False)
    chunked = soft_embed_with_grads(logits, weight, temperature, grad_out, chunked=True)
    assert chunked[0].shape == (*lead, dim)
    for actual, expected in zip(chunked, dense):
        assert_rel_close(actual, expected)
    # The dense reference is the paper's u = softmax(A / tau) E.
    torch.testing.assert_close(dense[0], quantizers.soft_readout(logits, temperature) @ weight, rtol=0, atol=0)


def test_soft_embed_at_tiny_temperature_is_the_hard_embedding(small_blocks):
    logits = torch.randn(50, 300)
    weight = torch.randn(300, 8)
    out = soft_embed(logits, weight, 1e-6, chunked=True)
    assert torch.equal(out, weight[logits.argmax(-1)])


def test_minus_inf_logits(small_blocks):
    """Masked codes (-inf) get zero weight and zero gradient; a row without any finite logit is NaN, as dense."""
    logits = torch.randn(30, 200)
    logits[:, ::3] = float("-inf")
    logits[7] = float("-inf")
    logits.requires_grad_()
    weight = torch.randn(200, 6, requires_grad=True)
    grad_out = torch.randn(30, 6)
    dense = soft_embed_with_grads(logits, weight, 0.1, grad_out, chunked=False)
    chunked = soft_embed_with_grads(logits, weight, 0.1, grad_out, chunked=True)
    finite = torch.ones(30, dtype=torch.bool)
    finite[7] = False
    out, grad_logits, grad_weight = chunked
    assert out[7].isnan().all() and out[finite].isfinite().all()
    assert torch.equal(grad_logits[finite][:, ::3], torch.zeros_like(grad_logits[finite][:, ::3]))
    assert_rel_close(out[finite], dense[0][finite])
    assert_rel_close(grad_logits[finite], dense[1][finite])
    assert torch.equal(grad_weight.isnan(), dense[2].isnan())  # the NaN row reaches every code


def test_non_contiguous_logits(small_blocks):
    """`A[:, :-1]` (GEAR's soft branch drops the last token) cannot be flattened without a copy."""
    full = torch.randn(4, 9, 300, requires_grad=True)
    weight = torch.randn(300, 6, requires_grad=True)
    for logits in (full[:, :-1], full[:, 1:].transpose(0, 1), full[::2, ::2]):
        assert chunked_softmax._as_rows(logits) is None
        grad_out = torch.randn(*logits.shape[:-1], 6)
        dense = soft_embed_with_grads(logits, weight, 0.5, grad_out, chunked=False)
        chunked = soft_embed_with_grads(logits, weight, 0.5, grad_out, chunked=True)
        grads = [torch.autograd.grad(o, (full, weight), grad_out) for o in (
            soft_embed(logits, weight, 0.5, chunked=True), soft_embed(logits, weight, 0.5, chunked=False))]
        for actual, expected in zip((*chunked, *grads[0]), (*dense, *grads[1])):
            assert_rel_close(actual, expected)


def test_row_blocks_cover_every_row_once():
    x = torch.arange(5 * 7 * 3 * 4, dtype=torch.float32).view(5, 7, 3, 4)
    for view in (x, x[:, :-1], x[1:, :, 1:], x.transpose(0, 1)):
        for rows in (1, 2, 5, 6, 100):
            source, blocks = chunked_softmax.row_blocks(view, rows)
            pieces = [source[index].reshape(-1, 4) for _, index in blocks]
            assert all(0 < len(p) <= max(rows, 1) for p in pieces)
            assert [start for start, _ in blocks] == [sum(map(len, pieces[:i])) for i in range(len(pieces))]
            assert torch.equal(torch.cat(pieces), view.reshape(-1, 4))


def test_bf16_inputs_computed_in_fp32(small_blocks):
    """bf16 A and E: the chunked path is the fp32 computation on the upcast inputs, rounded once to bf16 (so it
    equals that bit for bit). Against the dense path it can differ by one bf16 rounding step (relative 2^-7):
    both fp32 results agree to ~1e-7 but may straddle a bf16 rounding boundary."""
    logits = (3 * torch.randn(6, 40, 300)).bfloat16().requires_grad_()
    weight = torch.randn(300, 16).bfloat16().requires_grad_()
    grad_out = torch.randn(6, 40, 16).bfloat16()
    chunked = soft_embed_with_grads(logits, weight, 0.1, grad_out, chunked=True)
    assert [t.dtype for t in chunked] == [torch.bfloat16] * 3
    logits32 = logits.detach().float().requires_grad_()
    weight32 = weight.detach().float().requires_grad_()
    fp32 = soft_embed_with_grads(logits32, weight32, 0.1, grad_out.float(), chunked=True)
    for actual, expected in zip(chunked, fp32):
        assert torch.equal(actual, expected.bfloat16())
    dense = soft_embed_with_grads(logits, weight, 0.1, grad_out, chunked=False)
    for actual, expected in zip(chunked, dense):
        scale = expected.float().abs().max().item()
        torch.testing.assert_close(actual, expected, rtol=2**-7, atol=2e-6 * scale)


@pytest.mark.parametrize("chunked", [False, True])
def test_autocast_does_not_lower_precision(small_blocks, chunked):
    """bf16 autocast leaves fp32 inputs in fp32: the forward (and, chunked, even a backward run inside autocast,
    which would run the dense path's matmul backward in bf16) equals the computation without autocast."""
    logits = torch.randn(2, 60, 200, requires_grad=True)
    weight = torch.randn(200, 8, requires_grad=True)
    grad_out = torch.randn(2, 60, 8)
    reference = soft_embed_with_grads(logits, weight, 0.1, grad_out, chunked)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = soft_embed(logits, weight, 0.1, chunked=chunked)
        loss, _, _ = entropy_loss(logits, chunked=chunked)
        inside = soft_embed_with_grads(logits, weight, 0.1, grad_out, chunked) if chunked else reference
    assert out.dtype == loss.dtype == torch.float32
    assert loss == entropy_loss(logits, chunked=chunked)[0]
    outside = (out, *torch.autograd.grad(out, (logits, weight), grad_out))
    for after, within, expected in zip(outside, inside, reference):
        assert torch.equal(after, expected) and torch.equal(within, expected)


def test_no_grad_and_frozen_inputs(small_blocks):
    logits = torch.randn(3, 50, 200, requires_grad=True)
    weight = torch.randn(200, 8, requires_grad=True)
    expected = soft_embed(logits, weight, 0.1, chunked=False).detach()
    with torch.no_grad():
        out = soft_embed(logits, weight, 0.1, chunked=True)
        loss, _, _ = entropy_loss(logits, chunked=True)
    assert not out.requires_grad and not loss.requires_grad
    assert_rel_close(out, expected)
    assert_rel_close(loss, entropy_loss(logits.detach(), chunked=False)[0])
    # GEAR's soft branch: E frozen, gradient to A only (and the other way round).
    grad_out = torch.randn(3, 50, 8)
    dense_grads = torch.autograd.grad(soft_embed(logits, weight, 0.1, chunked=False), (logits, weight), grad_out)
    (grad_logits,) = torch.autograd.grad(soft_embed(logits, weight.detach(), 0.1, chunked=True), logits, grad_out)
    (grad_weight,) = torch.autograd.grad(soft_embed(logits.detach(), weight, 0.1, chunked=True), weight, grad_out)
    assert_rel_close(grad_logits, dense_grads[0])
    assert_rel_close(grad_weight, dense_grads[1])


def test_gradcheck_float64(monkeypatch):
    monkeypatch.setattr(chunked_softmax, "BLOCK_ELEMENTS", 60)  # 5 rows per block, 3 blocks
    logits = torch.randn(2, 7, 12, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(12, 3, dtype=torch.float64, requires_grad=True)
    assert soft_embed(logits, weight, 0.5, chunked=True).dtype == torch.float64
    assert torch.autograd.gradcheck(lambda a, e: soft_embed(a, e, 0.5, chunked=True), (logits, weight))
    assert torch.autograd.gradcheck(
        lambda a: entropy_loss(a, temperature=0.5, sample_weight=1.5, avg_weight=0.7, chunked=True), (logits,))


def test_threshold_dispatch(monkeypatch):
    logits = torch.randn(8, 64, requires_grad=True)
    weight = torch.randn(64, 4, requires_grad=True)

    def saved_bytes(fn):
        return saved_tensor_bytes(fn, exclude=(logits, weight))[0]

    monkeypatch.setattr(quantizers, "CHUNKED_MIN_ELEMENTS", logits.numel())
    assert saved_bytes(lambda: soft_embed(logits, weight, 0.1)) == 0  # only A and E kept: chunked
    assert saved_bytes(lambda: entropy_loss(logits)) <= 4 * 64 * 4  # a few (K,) vectors of the p-bar term
    assert saved_bytes(lambda: soft_embed(logits, weight, 0.1, chunked=False)) >= logits.numel() * 4
    monkeypatch.setattr(quantizers, "CHUNKED_MIN_ELEMENTS", logits.numel() + 1)
    assert saved_bytes(lambda: soft_embed(logits, weight, 0.1)) >= logits.numel() * 4  # softmax kept: dense
    assert saved_bytes(lambda: entropy_loss(logits)) >= 2 * logits.numel() * 4
    assert saved_bytes(lambda: soft_embed(logits, weight, 0.1, chunked=True)) == 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="temperature"):
        soft_embed(torch.randn(2, 8), torch.randn(8, 3), 0.0)
    with pytest.raises(ValueError, match="share K"):
        soft_embed(torch.randn(2, 8), torch.randn(9, 3), 0.1)


@pytest.mark.parametrize("lead, codebook_size", [((37,), 100), ((3, 11), 257)])
@pytest.mark.parametrize("temperature", [0.01, 1.0])
@pytest.mark.parametrize("weights", [(1.0, 1.0), (2.0, 0.5)])
def test_entropy_loss_matches_dense(small_blocks, lead, codebook_size, temperature, weights):
    logits = (3 * torch.randn(*lead, codebook_size)).requires_grad_()
    kwargs = dict(temperature=temperature, sample_weight=weights[0], avg_weight=weights[1])
    dense = entropy_with_grad(logits, chunked=False, **kwargs)
    chunked = entropy_with_grad(logits, chunked=True, **kwargs)
    for actual, expected in zip(chunked, dense):
        assert_rel_close(actual, expected)


def test_quantizer_entropy_terms_unchanged_by_chunking(small_blocks, monkeypatch):
    """The VQ quantizer's training losses and gradients with the chunked entropy regulariser forced on."""
    quantizer = VectorQuantizer(codebook_size=300, embed_dim=8).train()
    z = torch.randn(2, 8, 6, 6, requires_grad=True)
    results = []
    for threshold in (float("inf"), 0):
        monkeypatch.setattr(quantizers, "CHUNKED_MIN_ELEMENTS", threshold)
        out = quantizer(z)
        total = out.entropy_loss + out.commitment_loss + out.codebook_loss
        grads = torch.autograd.grad(total, (z, quantizer.embedding.weight))
        results.append((out.entropy_loss, out.sample_entropy, out.avg_entropy, *grads))
    for actual, expected in zip(results[1], results[0]):
        assert_rel_close(actual, expected)


def test_chunked_memory_is_a_fraction_of_dense(monkeypatch):
    """Activation memory (peak over forward + backward of everything allocated, the returned gradients excluded;
    inputs exist before) from the allocator events, at N = 1024 (from `A[:, :-1]`), K = 1024, 16 blocks."""
    monkeypatch.setattr(chunked_softmax, "BLOCK_ELEMENTS", 64 * 1024)
    full = torch.randn(8, 129, 1024, requires_grad=True)
    logits = full[:, :-1]
    weight = torch.randn(1024, 64, requires_grad=True)
    grad_out = torch.randn(8, 128, 64)
    logits_bytes = logits.numel() * 4

    def peak(fn):
        return peak_allocated_bytes(fn, ignore=lambda grads: grads)[0]

    def soft(chunked):
        return lambda: torch.autograd.grad(soft_embed(logits, weight, 0.1, chunked=chunked), (logits, weight),
                                           grad_out)

    def entropy(chunked):
        return lambda: torch.autograd.grad(entropy_loss(logits, chunked=chunked)[0], logits)

    dense_soft, chunked_soft = peak(soft(False)), peak(soft(True))
    dense_entropy, chunked_entropy = peak(entropy(False)), peak(entropy(True))
    assert dense_soft >= 2 * logits_bytes and dense_entropy >= 3 * logits_bytes
    assert chunked_soft <= 0.25 * dense_soft
    assert chunked_entropy <= 0.25 * dense_entropy
    saved = saved_tensor_bytes(lambda: soft_embed(logits, weight, 0.1, chunked=True), exclude=(full, weight))[0]
    assert saved == 0


def test_torch_compile_fullgraph(small_blocks):
    """torch.compile traces both Functions without graph breaks; the block loops stay opaque custom ops, so the
    compiled results equal eager's and need no more memory (the inductor backend behaves alike: see the report in
    the README)."""
    logits = torch.randn(2, 40, 300, requires_grad=True)
    weight = torch.randn(300, 8, requires_grad=True)
    grad_out = torch.randn(2, 40, 8)
    cases = [
        (lambda a, e: soft_embed(a, e, 0.1, chunked=True), (logits, weight), grad_out),
        (lambda a: entropy_loss(a, chunked=True)[0], (logits,), None),
    ]
    for fn, inputs, grad in cases:
        compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
        peaks, results = [], []
        for f in (fn, compiled):
            peak, result = peak_allocated_bytes(lambda: (out := f(*inputs), *torch.autograd.grad(out, inputs, grad)),
                                                ignore=lambda result: result[1:])
            peaks.append(peak)
            results.append(result)
        for actual, expected in zip(results[1], results[0]):
            assert torch.equal(actual, expected)
        assert peaks[0] < logits.numel() * 4
        assert peaks[1] <= peaks[0] + 1024  # the graph may hold a few scalars longer
