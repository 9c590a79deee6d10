"""Targets for testing a verdict: honest ones that must pass, faulty ones that must fail
(`tests/judge/` and `bench/verdict_catalogue.py` use both).

    honest.py   copies whose kernels differ as another correct device's do: perturb
                (half or one ulp), transcendental_ulps, with_threads, split_summation,
                decomposed_norms, math_attention, one_pass_norms
    faults.py   FAULTS[kind](model, module_name): one known fault in one module; a fused
                dropout kernel off its own mask (fused_dropout_kernel)
    models.py   USER_MODELS[name](): models as users write them (LSTM, GRU, a UNet, torch's
                transformer encoder, a 1-d audio stack) and a batch of inputs
"""

from align.testing.faults import (
    CLOSE_ACTIVATION,
    FAULTS,
    PORT_FAULTS,
    FusedDropout,
    fused_dropout_kernel,
)
from align.testing.honest import (
    ACCUMULATING,
    decomposed_norms,
    math_attention,
    module,
    one_pass_norms,
    override_forward,
    perturb,
    split_summation,
    transcendental_ulps,
    with_threads,
)
from align.testing.models import USER_MODELS

__all__ = [
    "ACCUMULATING",
    "CLOSE_ACTIVATION",
    "FAULTS",
    "PORT_FAULTS",
    "USER_MODELS",
    "FusedDropout",
    "decomposed_norms",
    "one_pass_norms",
    "fused_dropout_kernel",
    "math_attention",
    "module",
    "override_forward",
    "perturb",
    "split_summation",
    "transcendental_ulps",
    "with_threads",
]
