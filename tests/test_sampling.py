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
