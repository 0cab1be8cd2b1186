"""One computation in two forms: one to evaluate, another to differentiate.

XLA:CPU wants different programs for a forward alone and for a forward that will be
differentiated (the fp32 attention, the chunked FFN, the layer-stack loop); `differentiate_as` pairs the
two under a custom VJP. The forms must compute the same function (they may differ by float
rounding); static settings are bound in the callables (closures of Python values, not arrays).
"""

import jax


def differentiate_as(primal, differentiated):
    """f(*args) = primal(*args); under a gradient, the VJP of differentiated(*args) instead (its
    forward runs in place of the primal, its residuals are what the backward keeps)."""

    @jax.custom_vjp
    def f(*args):
        return primal(*args)

    def fwd(*args):
        return jax.vjp(differentiated, *args)  # (output, its VJP as the residual)

    def bwd(vjp, g):
        return vjp(g)

    f.defvjp(fwd, bwd)
    return f
