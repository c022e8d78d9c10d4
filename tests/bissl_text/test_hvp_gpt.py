"""HVPs through the GPT backbone (SDPA attention, padding mask) equal double backward, every HVP mode."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import hypergrad
from applications.bissl.text.stage import math_attention

from .helpers import batches, tiny_lm


def _loss_fn(lm, head_w, xd, yd, xp, yp):
    """A loss touching both the LM head (pretext) and the pooled features (padded documents)."""

    def f(p):
        out = torch.func.functional_call(lm.backbone, p, (xd,))
        lp = torch.func.functional_call(lm, {f"backbone.{k}": v for k, v in p.items()}, (xp, yp))
        return lp + F.cross_entropy(out @ head_w, yd)

    return f


@pytest.mark.parametrize("mode", hypergrad.HVP_MODES)
def test_hvp_through_gpt_equals_double_backward(mode):
    lm = tiny_lm()
    assert lm.backbone.body.config._attn_implementation == "sdpa"
    (xp, yp, _), (xd, yd) = batches()
    head_w = torch.randn(4, 3, dtype=torch.float64)
    params = {k: v.detach() for k, v in lm.backbone.named_parameters()}
    v = {k: torch.randn_like(t) for k, t in params.items()}
    f = _loss_fn(lm, head_w, xd, yd, xp, yp)
    if mode == "fwd_rev_linearized":  # the padding mask is data-dependent control flow: tracing must refuse clearly
        with pytest.raises(RuntimeError, match=r"mode='fwd_rev_linearized' could not trace .*data-dependent"):
            hypergrad.hvp(f, params, v, mode=mode)
        return
    with math_attention():
        leaves = {k: t.clone().requires_grad_(True) for k, t in params.items()}
        g = torch.autograd.grad(f(leaves), list(leaves.values()), create_graph=True)
        dot = sum((gi * v[k]).sum() for gi, k in zip(g, leaves))
        ref = dict(zip(leaves, torch.autograd.grad(dot, list(leaves.values()))))
    with warnings.catch_warnings():  # no wrapper: hypergrad's default handles SDPA
        warnings.simplefilter("error", hypergrad.HVPFallbackWarning)
        got = hypergrad.hvp(f, params, v, mode=mode)
    # finite differences are exact only to about eps^(2/3)
    scale = max(float(r.abs().max()) for r in ref.values())
    rtol = 1e-5 if mode == "finite_diff" else 1e-10
    for k in params:
        torch.testing.assert_close(got[k], ref[k], rtol=rtol, atol=rtol * scale)
    assert sum(float(r.abs().sum()) for r in ref.values()) > 1e-3  # a non-trivial product


def test_float32_auto_mode_needs_no_fallback():
    """float32 CPU SDPA has no double backward nor forward-mode AD of its own; hypergrad's default must
    still not fall back (it resolves to the cached reverse graph; before the default changed this test
    pinned forward-over-reverse)."""
    lm = tiny_lm().float()
    (xp, yp, _), _ = batches()
    params = {k: v.detach() for k, v in lm.backbone.named_parameters()}
    v = {k: torch.randn_like(t) for k, t in params.items()}

    def f(p):
        return torch.func.functional_call(lm, {f"backbone.{k}": t for k, t in p.items()}, (xp, yp))

    with warnings.catch_warnings():
        warnings.simplefilter("error", hypergrad.HVPFallbackWarning)
        op = hypergrad.HessianOperator(f, params, mode="auto")
        out = op(v)
    assert op.mode == "rev_rev_cached"
    with math_attention():
        ref = hypergrad.hvp(f, params, v, mode="rev_rev")
    for k in params:
        torch.testing.assert_close(out[k], ref[k], rtol=1e-4, atol=1e-4 * float(ref[k].abs().max()) + 1e-6)
