import pytest
import torch

from modscope.masks.sampling import draw_uniforms, sample_masks


def test_keep_probability_is_sigmoid_of_logit():
    logits = torch.tensor([[-3.0, -1.0, 0.0, 0.5, 2.0, 4.0]])
    n = 200_000
    u = draw_uniforms((1, n, logits.shape[1]), torch.Generator().manual_seed(1))
    freq = sample_masks(logits, u).mean(dim=1)
    p = torch.sigmoid(logits)
    # binomial standard error at n = 200k is at most 0.0011; 5 sigma
    torch.testing.assert_close(freq, p, atol=5.6e-3, rtol=0)


def test_samples_are_hard_zero_one():
    logits = torch.randn(2, 50)
    m = sample_masks(logits, torch.rand(2, 3, 50))
    assert m.shape == (2, 3, 50)
    assert set(m.unique().tolist()) <= {0.0, 1.0}


def test_straight_through_gradient_is_soft_sample_derivative():
    logits = torch.randn(1, 7, requires_grad=True)
    u = torch.rand(1, 5, 7)
    weights = torch.randn(1, 5, 7)
    (sample_masks(logits, u, tau=0.5) * weights).sum().backward()
    ref_logits = logits.detach().clone().requires_grad_()
    soft = torch.sigmoid((ref_logits.unsqueeze(1) + torch.logit(u)) / 0.5)
    (soft * weights).sum().backward()
    torch.testing.assert_close(logits.grad, ref_logits.grad, rtol=1e-5, atol=1e-6)


def test_hard_sample_equals_gumbel_threshold():
    logits = torch.randn(1, 1000)
    u = torch.rand(1, 4, 1000)
    expected = (logits.unsqueeze(1) + torch.logit(u) > 0).float()
    assert (sample_masks(logits, u) != expected).float().mean() < 1e-3  # differ only by rounding at the boundary


def test_cpu_generator_stream_is_reproducible():
    a = draw_uniforms((3, 4), torch.Generator().manual_seed(5))
    b = draw_uniforms((3, 4), torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_fused_masked_weights_match_mask_times_weight_with_the_same_gradients():
    from modscope.masks.sampling import sample_masked_weights

    weights = [torch.randn(3, 4), torch.randn(5)]
    logits = (torch.randn(2, 17) * 3).requires_grad_()
    u = torch.rand(2, 4, 17)
    eff = sample_masked_weights(logits, u, weights, [0, 12])
    probe = [torch.randn_like(e) for e in eff]
    sum((e * p).sum() for e, p in zip(eff, probe)).backward()

    ref_logits = logits.detach().clone().requires_grad_()
    m = sample_masks(ref_logits, u)
    ref = [m[..., :12].reshape(2, 4, 3, 4) * weights[0], m[..., 12:] * weights[1]]
    sum((e * p).sum() for e, p in zip(ref, probe)).backward()
    for e, r in zip(eff, ref):
        torch.testing.assert_close(e, r)
    torch.testing.assert_close(logits.grad, ref_logits.grad, rtol=1e-5, atol=1e-6)


def test_soft_derivative_closed_form_equals_the_sigmoid_form():
    from modscope.masks.sampling import _soft_derivative

    logits = torch.linspace(-60, 60, 241).unsqueeze(0)
    u = torch.rand(3, 241).clamp(1e-6, 1 - 1e-6)
    s = torch.sigmoid(logits.double() + torch.logit(u.double()))
    expected = (s * (1 - s)).float()
    torch.testing.assert_close(_soft_derivative(logits, u.clone(), 1.0), expected, rtol=1e-4, atol=1e-12)
    assert torch.isfinite(_soft_derivative(torch.tensor([[-1e4, 1e4]]), torch.rand(2, 2), 1.0)).all()


@pytest.mark.slow
def test_compiled_sampler_matches_eager():
    from modscope.masks.sampling import SamplerKernels, sample_masked_weights

    weights = [torch.randn(30, 20), torch.randn(7)]
    u = torch.rand(2, 4, 607)
    probe = [torch.randn(2, 4, 30, 20), torch.randn(2, 4, 7)]
    grads = []
    for compiled in (False, True):
        logits = torch.randn(2, 607).requires_grad_()
        with torch.no_grad():
            logits.copy_(torch.linspace(-3, 3, 607).expand(2, -1))
        eff = sample_masked_weights(logits, u, weights, [0, 600], kernels=SamplerKernels(compile=compiled))
        sum((e * p).sum() for e, p in zip(eff, probe)).backward()
        grads.append((eff, logits.grad))
    for a, b in zip(grads[0][0], grads[1][0]):
        assert torch.equal(a, b)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-5, atol=1e-7)
