"""Initialisers shared by the model layers, and the one place that strips wrapper prefixes from parameter names."""

import math

import torch


def trunc_normal_init_(tensor: torch.Tensor, std: float = 1.0, lower: float = -2.0, upper: float = 2.0) -> torch.Tensor:
    """Fill `tensor` in place from a normal truncated to [lower, upper] standard units, with std exactly `std`.

    JAX/Flax-style (jax.random.truncated_normal + variance_scaling): unlike torch.nn.init.trunc_normal_, the
    pre-truncation std is inflated so that the *truncated* distribution has the requested std.
    Draws run in the tensor's own dtype. std == 0 gives zeros without drawing from the RNG.
    """
    with torch.no_grad():
        if std == 0:
            return tensor.zero_()

        sqrt2 = math.sqrt(2)
        a = math.erf(lower / sqrt2)
        b = math.erf(upper / sqrt2)
        z = (b - a) / 2

        c = (2 * math.pi) ** -0.5
        pdf_u = c * math.exp(-0.5 * lower**2)
        pdf_l = c * math.exp(-0.5 * upper**2)
        # Std of a unit normal truncated to [lower, upper]; divide it out so the result has std `std`.
        comp_std = std / math.sqrt(1 - (upper * pdf_u - lower * pdf_l) / z - ((pdf_u - pdf_l) / z) ** 2)

        # Inverse-CDF sampling: u ~ U(erf(lower/√2), erf(upper/√2)), x = √2·erfinv(u).
        tensor.uniform_(a, b)
        tensor.erfinv_()
        tensor.mul_(sqrt2 * comp_std)
        tensor.clip_(lower * comp_std, upper * comp_std)
    return tensor


# Prefixes that wrappers add to parameter names: torch.compile, DDP, and a typo found in the fork's files.
WRAPPER_PREFIXES = ("_orig_mod.", "module.", "_orig._mod.", ".")


def strip_wrapper_prefixes(name: str) -> str:
    """`_orig_mod.module.model.x` -> `model.x`: drop compile/DDP wrapper prefixes at the front of a name."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix):], True
    return name
