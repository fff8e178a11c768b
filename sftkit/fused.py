"""Autograd functions that do in a few large kernels what eager autograd does in many small ones.

lora_linear: the base matmul and the low-rank update of a LoRA layer as one function: three matmuls forward
(the update accumulated into the base output in place), five backward (the input gradients of base and
adapter accumulated in one), no casts of the activations and no separate adds, and the input saved once
however many adapters share it.

linear_cross_entropy: the output head and the cross-entropy of the trainable positions, chunk by chunk, with
the gradient computed in forward (the loss is the last thing before backward), so no chunk of logits is
kept for backward: only the gradient of the hidden states is.

Both compare against the eager paths (lora.LoRALinear, loss.loss_sum) in tests/test_fused.py.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

UPDATE_DTYPES = ("compute", "fp32")


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """What a matmul on x runs in: autocast's dtype when autocast is on for x's device, else x's own."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
                lora_B: torch.Tensor, scaling: float, dropout: float = 0.0, training: bool = False,
                update_dtype: str = "compute") -> torch.Tensor:
    """x W^T + b + scaling * dropout(x) A^T B^T, in the compute dtype.

    update_dtype "compute": the adapters are cast to the compute dtype (bf16 under autocast; their float32
    copies stay the masters the optimizer updates); "fp32": the low-rank products and the adapters' gradients
    run in float32 (float32 accumulation of the update, at the price of float32 copies of x and the output grad).
    The dropout mask is drawn as nn.Dropout draws it on CPU, so seeded runs match the eager layer there.
    """
    dtype = compute_dtype(x)
    adapter_dtype = torch.float32 if update_dtype == "fp32" else dtype
    keep = None
    if dropout and training:
        keep = torch.empty(x.shape, dtype=lora_A.dtype, device=x.device).bernoulli_(1 - dropout).bool()
    with torch.autocast(x.device.type, enabled=False):
        return _LoRALinear.apply(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype),
                                 lora_A.to(adapter_dtype), lora_B.to(adapter_dtype), keep, scaling, dropout)


class _LoRALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, keep, scaling, dropout):
        flat = x.reshape(-1, x.shape[-1])
        out = F.linear(flat, weight, bias)
        low = _adapter_input(flat, keep, lora_A.dtype, dropout) @ lora_A.t()  # (tokens, r)
        out.addmm_(low.to(out.dtype), lora_B.t().to(out.dtype), alpha=scaling)
        # x itself is saved (the adapter's input is rebuilt in backward), so adapters sharing an input share its memory.
        ctx.save_for_backward(flat, low, weight, lora_A, lora_B, keep)
        ctx.scaling, ctx.dropout, ctx.x_shape, ctx.bias_shape = scaling, dropout, x.shape, None if bias is None else bias.shape
        return out.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        flat, low, weight, lora_A, lora_B, keep = ctx.saved_tensors
        adapter_input = _adapter_input(flat, keep, lora_A.dtype, ctx.dropout)
        grad = grad_out.reshape(-1, grad_out.shape[-1])
        adapter_grad = grad.to(lora_B.dtype)
        grad_low = (adapter_grad @ lora_B) * ctx.scaling  # (tokens, r)
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            through_adapter = grad_low @ lora_A
            if keep is not None:
                through_adapter = through_adapter * keep.reshape(through_adapter.shape) * (1.0 / (1.0 - ctx.dropout))
            # The base's input gradient accumulated onto the adapter's in the same matmul (no separate add).
            grad_x = torch.addmm(through_adapter.to(grad.dtype), grad, weight).reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            raise NotImplementedError("lora_linear trains the adapters only: the base weight must be frozen")
        if ctx.needs_input_grad[2]:
            grad_bias = grad.sum(0).reshape(ctx.bias_shape)
        grad_A = grad_low.t() @ adapter_input if ctx.needs_input_grad[3] else None
        grad_B = (adapter_grad.t() @ low) * ctx.scaling if ctx.needs_input_grad[4] else None
        return grad_x, grad_weight, grad_bias, grad_A, grad_B, None, None, None


def _adapter_input(flat: torch.Tensor, keep: torch.Tensor | None, dtype: torch.dtype, dropout: float) -> torch.Tensor:
    adapter_input = flat.to(dtype)
    return adapter_input if keep is None else adapter_input * keep.reshape(flat.shape) * (1.0 / (1.0 - dropout))


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         weights: torch.Tensor | None = None, chunk_size: int = 1024, chunk_kernel=None) -> torch.Tensor:
    """Sum over rows of cross_entropy(hidden W^T, targets) (times weights), the logits in float32 a chunk at a time.

    The head's matmul runs in the compute dtype, as `head(hidden)` does under autocast. A trainable head gets
    its gradient in float32, accumulated over the chunks. chunk_kernel(logits, targets, weights) -> (loss, logit
    gradient) is chunk_loss_and_grad or a compiled version of it.
    """
    dtype = compute_dtype(hidden)
    with torch.autocast(hidden.device.type, enabled=False):
        return _LinearCrossEntropy.apply(hidden.to(dtype), weight.to(dtype), targets, weights, chunk_size,
                                         chunk_kernel or chunk_loss_and_grad)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, weights, chunk_size, chunk_kernel):
        wants_hidden, wants_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if wants_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if wants_weight else None
        for start in range(0, hidden.shape[0], chunk_size):
            rows = hidden[start:start + chunk_size]
            chunk_weights = None if weights is None else weights[start:start + chunk_size]
            loss, grad_logits = chunk_kernel(rows @ weight.t(), targets[start:start + chunk_size], chunk_weights)
            total += loss
            grad_logits = grad_logits.to(hidden.dtype)
            if wants_hidden:
                grad_hidden[start:start + chunk_size] = grad_logits @ weight
            if wants_weight:
                grad_weight.add_((grad_logits.t() @ rows).float())
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        grad_hidden = None if grad_hidden is None else grad_hidden * grad_total.to(grad_hidden.dtype)
        grad_weight = None if grad_weight is None else (grad_weight * grad_total).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None


def chunk_loss_and_grad(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None):
    """(sum of the rows' cross-entropy, its gradient with respect to the logits), computed in float32.

    The elementwise work of the loss: torch.compile fuses it into a couple of kernels (speed.training_loss
    compiles it when the layers are compiled).
    """
    logits = logits.float()
    log_norm = torch.logsumexp(logits, dim=-1)
    picked = logits.gather(1, targets[:, None]).squeeze(1)
    losses = log_norm - picked
    grad = torch.exp(logits - log_norm[:, None])
    grad.scatter_add_(1, targets[:, None], torch.full_like(picked[:, None], -1.0))
    if weights is not None:
        losses = losses * weights
        grad = grad * weights[:, None]
    return losses.sum(), grad
