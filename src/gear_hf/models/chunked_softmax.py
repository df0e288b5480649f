"""Row-chunked softmax reductions over the codebook, with the softmax rebuilt in the backward.

GEAR's soft read-out `softmax(A / tau) E` and the entropy regulariser both act on assignment logits A (N, K).
With K = 16,384 and N = 8,192 rows (batch 32 x 256 tokens) every dense (N, K) fp32 intermediate is 537 MB and
autograd keeps several of them. The autograd Functions here walk A in blocks of rows and save only their inputs:
each block's softmax is recomputed in the backward, so the memory beyond inputs, outputs and gradients is a few
(rows per block, K) buffers. Softmax and every accumulation run in fp32 with autocast off, whatever the input
dtype (float64 stays float64). `gear_hf.models.quantizers` chooses between these and the dense formulas.
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

# fp32 logits per block (16 MiB): rows per block = max(1, BLOCK_ELEMENTS // K), 256 rows at K = 16,384.
# A block's matmul stays large enough to run at full speed; the working set is a few such blocks.
BLOCK_ELEMENTS = 1 << 22


def rows_per_block(codebook_size: int) -> int:
    return max(1, BLOCK_ELEMENTS // max(codebook_size, 1))


def _as_rows(x: torch.Tensor) -> torch.Tensor | None:
    """x (..., K) as an (N, K) view, or None when the leading dims cannot merge without a copy."""
    lead = [(size, stride) for size, stride in zip(x.shape[:-1], x.stride()[:-1]) if size != 1]
    if all(outer[1] == inner[1] * inner[0] for outer, inner in zip(lead, lead[1:])):
        return x.reshape(-1, x.shape[-1])
    return None


def row_blocks(x: torch.Tensor, rows: int) -> tuple[torch.Tensor, list[tuple[int, tuple]]]:
    """`(source, [(first row, index), ...])`: `source[index].reshape(-1, K)` are the blocks of at most `rows` rows
    of x (..., K), in row-major order.

    The blocks are views of x where its layout allows; otherwise (e.g. `A[:, :-1]`) a block is copied when it is
    taken, so x as a whole is never copied. Indices, not tensors, so that only one block exists at a time.
    """
    flat = _as_rows(x)
    if flat is not None:
        return flat, [(start, (slice(start, start + rows),)) for start in range(0, flat.shape[0], rows)]
    return x, _leading_blocks(tuple(x.shape[:-1]), rows, (), 0)


def _leading_blocks(lead: tuple[int, ...], rows: int, prefix: tuple, offset: int) -> list[tuple[int, tuple]]:
    per_item = math.prod(lead[1:])
    if per_item >= rows and len(lead) > 1:  # one leading item holds a block or more: split inside it
        return [block for item in range(lead[0])
                for block in _leading_blocks(lead[1:], rows, prefix + (item,), offset + item * per_item)]
    step = max(1, rows // max(per_item, 1))
    return [(offset + item * per_item, prefix + (slice(item, item + step),)) for item in range(0, lead[0], step)]


def _fp32(device: torch.device):
    return torch.autocast(device_type=device.type, enabled=False)


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """x in fp32, or kept in float64 (so that float64 gradchecks test the real formulas)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class SoftEmbedFunction(torch.autograd.Function):
    """u = softmax(A / tau) @ E for A (..., K), E (K, D); output dtype = E's. Saves A and E only."""

    @staticmethod
    def forward(ctx, logits, weight, temperature):
        ctx.save_for_backward(logits, weight)
        ctx.temperature = temperature
        return torch.ops.gear_hf.soft_embed_forward(logits, weight, temperature)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        logits, weight = ctx.saved_tensors
        need_logits, need_weight = ctx.needs_input_grad[:2]
        grad_logits, grad_weight = torch.ops.gear_hf.soft_embed_backward(
            grad_out, logits, weight, ctx.temperature, need_logits, need_weight)
        return grad_logits if need_logits else None, grad_weight if need_weight else None, None


class EntropyTermsFunction(torch.autograd.Function):
    """The two reductions of the entropy regulariser over A (..., K), without keeping any (N, K) tensor.

    With p = softmax(A / T) and log q = log_softmax(A / T + eps) (the regulariser's literal shift), returns
    `row_sums (N,) = sum_k p log q` and `prob_sums (K,) = sum_n p` (fp32; float64 for float64 A). Saves A only.
    """

    @staticmethod
    def forward(ctx, logits, temperature, eps):
        ctx.save_for_backward(logits)
        ctx.temperature, ctx.eps = temperature, eps
        return torch.ops.gear_hf.entropy_terms_forward(logits, temperature, eps)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_row_sums, grad_prob_sums):
        (logits,) = ctx.saved_tensors
        return torch.ops.gear_hf.entropy_terms_backward(
            grad_row_sums, grad_prob_sums, logits, ctx.temperature, ctx.eps), None, None


# The block loops are custom ops: torch.compile calls them as opaque kernels instead of tracing them, whose
# functionalised block writes would otherwise bring back (N, K) buffers.

@torch.library.custom_op("gear_hf::soft_embed_forward", mutates_args=())
def _soft_embed_forward(logits: torch.Tensor, weight: torch.Tensor, temperature: float) -> torch.Tensor:
    codebook_size, dim = weight.shape
    out = weight.new_empty(logits.shape[:-1].numel(), dim)
    with _fp32(logits.device):
        weight32 = at_least_fp32(weight)
        source, blocks = row_blocks(logits, rows_per_block(codebook_size))
        for start, index in blocks:
            block = source[index].reshape(-1, codebook_size)
            _soft_embed_block_forward(block, weight32, temperature, out[start:start + block.shape[0]])
    return out.view(*logits.shape[:-1], dim)


@_soft_embed_forward.register_fake
def _(logits, weight, temperature):
    return weight.new_empty(*logits.shape[:-1], weight.shape[1])


@torch.library.custom_op("gear_hf::soft_embed_backward", mutates_args=())
def _soft_embed_backward(grad_out: torch.Tensor, logits: torch.Tensor, weight: torch.Tensor, temperature: float,
                         need_logits: bool, need_weight: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/dA, dL/dE); a gradient not asked for is an empty placeholder (custom ops return tensors)."""
    codebook_size, dim = weight.shape
    grad_logits = _new_grad(logits, need_logits)
    grad_rows = grad_logits.view(-1, codebook_size) if need_logits else None
    grad_out = grad_out.reshape(-1, dim)
    with _fp32(logits.device):
        weight32 = at_least_fp32(weight)
        grad_weight = torch.zeros_like(weight32) if need_weight else None
        source, blocks = row_blocks(logits, rows_per_block(codebook_size))
        for start, index in blocks:
            block = source[index].reshape(-1, codebook_size)
            stop = start + block.shape[0]
            _soft_embed_block_backward(block, at_least_fp32(grad_out[start:stop]), weight32, temperature,
                                       grad_weight, None if grad_rows is None else grad_rows[start:stop])
    return grad_logits, grad_weight.to(weight.dtype) if need_weight else weight.new_empty(0)


@_soft_embed_backward.register_fake
def _(grad_out, logits, weight, temperature, need_logits, need_weight):
    return _new_grad(logits, need_logits), torch.empty_like(weight) if need_weight else weight.new_empty(0)


def _soft_embed_block_forward(block, weight32, temperature, out_block):
    probs = _softmax(block, temperature)
    _into(out_block, lambda out: torch.mm(probs, weight32, out=out))


def _soft_embed_block_backward(block, grad_u, weight32, temperature, grad_weight, grad_block):
    """One block: adds p^T g to grad_weight and writes dL/dA into grad_block (each when not None).
    A function of its own so that the block's temporaries are freed before the next block's."""
    probs = _softmax(block, temperature)
    if grad_weight is not None:
        grad_weight.addmm_(probs.t(), grad_u)
    if grad_block is not None:
        _into(grad_block, lambda out: _softmax_backward(grad_u @ weight32.t(), probs, out).div_(temperature))


@torch.library.custom_op("gear_hf::entropy_terms_forward", mutates_args=())
def _entropy_terms_forward(logits: torch.Tensor, temperature: float, eps: float
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    row_sums, prob_sums = _entropy_terms_outputs(logits)
    prob_sums.zero_()
    with _fp32(logits.device):
        source, blocks = row_blocks(logits, rows_per_block(logits.shape[-1]))
        for start, index in blocks:
            block = source[index].reshape(-1, logits.shape[-1])
            row_sums[start:start + block.shape[0]] = _entropy_block_forward(block, temperature, eps, prob_sums)
    return row_sums, prob_sums


@_entropy_terms_forward.register_fake
def _(logits, temperature, eps):
    return _entropy_terms_outputs(logits)


@torch.library.custom_op("gear_hf::entropy_terms_backward", mutates_args=())
def _entropy_terms_backward(grad_row_sums: torch.Tensor, grad_prob_sums: torch.Tensor, logits: torch.Tensor,
                            temperature: float, eps: float) -> torch.Tensor:
    grad_logits = _new_grad(logits, True)
    grad_rows = grad_logits.view(-1, logits.shape[-1])
    with _fp32(logits.device):
        grad_prob_sums = at_least_fp32(grad_prob_sums)
        source, blocks = row_blocks(logits, rows_per_block(logits.shape[-1]))
        for start, index in blocks:
            block = source[index].reshape(-1, logits.shape[-1])
            stop = start + block.shape[0]
            _entropy_block_backward(block, temperature, eps, at_least_fp32(grad_row_sums[start:stop, None]),
                                    grad_prob_sums, grad_rows[start:stop])
    return grad_logits


@_entropy_terms_backward.register_fake
def _(grad_row_sums, grad_prob_sums, logits, temperature, eps):
    return _new_grad(logits, True)


def _new_grad(x: torch.Tensor, needed: bool) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format) if needed else x.new_empty(0)


def _entropy_terms_outputs(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = torch.promote_types(logits.dtype, torch.float32)
    return (logits.new_empty(logits.shape[:-1].numel(), dtype=dtype),
            logits.new_empty(logits.shape[-1], dtype=dtype))


def _entropy_block_forward(block, temperature, eps, prob_sums):
    probs, log_q = _probs_and_log_q(block, temperature, eps)
    prob_sums += probs.sum(dim=0)
    return (probs * log_q).sum(dim=-1)


def _entropy_block_backward(block, temperature, eps, grad_row, grad_prob_sums, grad_block):
    probs, log_q = _probs_and_log_q(block, temperature, eps)

    def grad(out):
        # d(p log q)/dp = log q, d(sum_n p)/dp = 1, d(p log q)/d(log q) = p
        out = _softmax_backward((log_q * grad_row).add_(grad_prob_sums), probs, out)
        out += _log_softmax_backward(probs.mul_(grad_row), log_q)
        return out.div_(temperature)

    _into(grad_block, grad)


def _softmax(block: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.softmax(at_least_fp32(block) / temperature, dim=-1)


def _probs_and_log_q(block: torch.Tensor, temperature: float, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    scaled = at_least_fp32(block) / temperature
    probs = torch.softmax(scaled, dim=-1)
    return probs, torch.log_softmax(scaled.add_(eps), dim=-1)


def _into(dest: torch.Tensor, compute) -> None:
    """dest = compute(out): in place when dest has the compute dtype, else through one cast copy."""
    if dest.dtype == torch.promote_types(dest.dtype, torch.float32):
        compute(dest)
    else:
        dest.copy_(compute(None))


# The kernels dense autograd runs for softmax / log_softmax, so that blockwise gradients round as the dense ones.
def _softmax_backward(grad_probs: torch.Tensor, probs: torch.Tensor, out: torch.Tensor | None = None
                      ) -> torch.Tensor:
    if out is None:
        return torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype)
    return torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype, grad_input=out)


def _log_softmax_backward(grad_log_q: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    return torch._log_softmax_backward_data(grad_log_q, log_q, -1, log_q.dtype)
