"""Differentiable composition of consecutive linear layers into one.

Every function here is a plain function of tensors, so autograd differentiates through it:
collapsed-mode training composes the factors on each forward pass and the gradients reach
every factor.

Convolution in PyTorch is cross-correlation. For two convolutions applied one after the
other without padding between them, ``(x ⋆ W1) ⋆ W2 = x ⋆ K`` where K is the full (true)
convolution of the kernels, summed over the intermediate channels:

    K[o, i, u] = Σ_c Σ_{a + b = u} W1[c, i, a] · W2[o, c, b]      (size k1 + k2 - 1)

A stride on the *last* layer and the same dilation on every layer carry over unchanged, so
the composed kernel uses the last layer's stride and the shared dilation.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["compose_chain", "compose_conv", "compose_linear", "compose_parallel_kernels"]


def compose_conv(
    first_weight: torch.Tensor,
    first_bias: torch.Tensor | None,
    second_weight: torch.Tensor,
    second_bias: torch.Tensor | None,
    groups: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Compose two grouped convolutions applied one after the other into one.

    Both layers use the same ``groups`` and the same dilation, and the first has stride 1
    and no padding, so the composition is exact at every output pixel.

    Args:
        first_weight: ``(P, M / g, k1h, k1w)`` kernel of the first layer.
        first_bias: ``(P,)`` or None.
        second_weight: ``(N, P / g, k2h, k2w)`` kernel of the second layer.
        second_bias: ``(N,)`` or None.
        groups: The shared number of groups ``g``.

    Returns:
        The ``(N, M / g, k1h + k2h - 1, k1w + k2w - 1)`` kernel and the ``(N,)`` bias
        ``b2 + Σ_{c, v} W2[o, c, v] · b1[c]`` (None when neither layer has a bias).
    """
    p, in_per_group, k1h, k1w = first_weight.shape
    n, p_per_group, k2h, k2w = second_weight.shape

    first = first_weight.reshape(groups, p // groups, in_per_group, k1h * k1w)
    second = second_weight.reshape(groups, n // groups, p_per_group, k2h * k2w)
    kernel_size = (k1h + k2h - 1, k1w + k2w - 1)
    if k1h * k1w == 1 or k2h * k2w == 1:
        # A 1×1 factor (as in CL) only mixes channels: one matrix product per group and
        # no tap placement, which saves the fold and its backward on every step.
        weight = torch.einsum("gocb,gci->goib", second, first[..., 0]) if k1h * k1w == 1 else (
            torch.einsum("goc,gcia->goia", second[..., 0], first)
        )
        weight = weight.reshape(n, in_per_group, *kernel_size)
    else:
        # Outer products of the kernel taps, one matrix product per group:
        # taps[g, o, i, a, b] = Σ_c W2[g, o, c, b] · W1[g, c, i, a] for tap a of W1 and tap b of W2.
        taps = torch.einsum("gocb,gcia->goiab", second, first)

        # Tap a of W1 combined with tap b of W2 lands at offset a + b of the composed kernel.
        # fold sums the k1h×k1w blocks placed at each of the k2h×k2w offsets: a col2im.
        blocks = taps.reshape(1, n * in_per_group * k1h * k1w, k2h * k2w)
        weight = F.fold(blocks, output_size=kernel_size, kernel_size=(k1h, k1w))
        weight = weight.reshape(n, in_per_group, *kernel_size)

    bias = second_bias
    if first_bias is not None:
        # Every output pixel of the first layer carries b1 because no layer after the first
        # pads, so b1 passes through the spatial sum of the second kernel.
        summed = second.sum(dim=-1)  # (g, N/g, P/g)
        carried = torch.einsum("goc,gc->go", summed, first_bias.reshape(groups, p_per_group)).reshape(n)
        bias = carried if second_bias is None else carried + second_bias
    return weight, bias


def compose_linear(
    first_weight: torch.Tensor,
    first_bias: torch.Tensor | None,
    second_weight: torch.Tensor,
    second_bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Compose ``y = W2 (W1 x + b1) + b2`` into ``y = (W2 W1) x + (W2 b1 + b2)``."""
    weight = second_weight @ first_weight
    bias = second_bias
    if first_bias is not None:
        carried = second_weight @ first_bias
        bias = carried if second_bias is None else carried + second_bias
    return weight, bias


def compose_parallel_kernels(
    kernels: list[torch.Tensor], kernel_size: tuple[int, int]
) -> torch.Tensor:
    """Sum parallel branch kernels after zero-padding each to ``kernel_size``, centred.

    This is the ACNet merge: a k×k, a 1×k and a k×1 branch reading the same padded input,
    with the asymmetric ones aligned to the centre row and column, add up to one k×k kernel.
    """
    total = None
    for kernel in kernels:
        dh = kernel_size[0] - kernel.shape[-2]
        dw = kernel_size[1] - kernel.shape[-1]
        padded = F.pad(kernel, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2))
        total = padded if total is None else total + padded
    assert total is not None
    return total


Factor = tuple[torch.Tensor, "torch.Tensor | None"]


def compose_chain(
    factors: list[Factor],
    compose: Callable[[Factor, Factor], Factor],
    cost: Callable[[torch.Size, torch.Size], int],
) -> Factor:
    """Compose a chain of affine layers, first layer first, in the cheapest order.

    Composition is associative, so any bracketing gives the same map. As in the classic
    matrix-chain problem, the order changes the cost a lot: a 512 → 2048 → 256 → 64 linear
    chain costs 277M multiplies left to right and 101M right to left. The order is chosen
    by dynamic programming over ``cost(first_shape, second_shape)``.

    Args:
        factors: ``(weight, bias)`` of each layer in application order.
        compose: Composes ``(first, second)`` into one factor.
        cost: Multiplies needed to compose two factors of the given weight shapes.
    """
    count = len(factors)
    shapes = [weight.shape for weight, _ in factors]
    # best[i][j]: (cost, split, shape) of composing factors i..j; the split k composes
    # i..k and k+1..j last.
    best: dict[tuple[int, int], tuple[int, int, torch.Size]] = {
        (i, i): (0, i, shapes[i]) for i in range(count)
    }
    for length in range(2, count + 1):
        for i in range(count - length + 1):
            j = i + length - 1
            options = []
            for k in range(i, j):
                left, right = best[(i, k)], best[(k + 1, j)]
                total = left[0] + right[0] + cost(left[2], right[2])
                options.append((total, k))
            total, split = min(options)
            shape = _composed_shape(best[(i, split)][2], best[(split + 1, j)][2])
            best[(i, j)] = (total, split, shape)

    def build(i: int, j: int) -> Factor:
        if i == j:
            return factors[i]
        split = best[(i, j)][1]
        return compose(build(i, split), build(split + 1, j))

    return build(0, count - 1)


def _composed_shape(first: torch.Size, second: torch.Size) -> torch.Size:
    # Linear: (N, P) after (P, M) is (N, M). Conv: kernels grow to k1 + k2 - 1.
    if len(first) == 2:
        return torch.Size((second[0], first[1]))
    return torch.Size((second[0], first[1], first[2] + second[2] - 1, first[3] + second[3] - 1))


def linear_composition_cost(first: torch.Size, second: torch.Size) -> int:
    """Return the multiplies of ``W2 @ W1`` for weights of shapes (P, M) and (N, P)."""
    return second[0] * second[1] * first[1]


def conv_composition_cost(first: torch.Size, second: torch.Size, groups: int) -> int:
    """Return the multiplies of :func:`compose_conv` for kernels of the given shapes."""
    n, p_per_group, k2h, k2w = second
    _, m_per_group, k1h, k1w = first
    return n * p_per_group * m_per_group * k1h * k1w * k2h * k2w
