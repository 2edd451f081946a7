import pytest
import torch
import torch.nn.functional as F

from focusnfix.objective import beta_at, focus_n_fix_loss, regional_constraint, reward_composite


def test_frobenius_constraint_matches_definition():
    torch.manual_seed(0)
    policy, ref = torch.rand(3, 3, 8, 8), torch.rand(3, 3, 8, 8)
    mask = (torch.rand(3, 1, 8, 8) > 0.5).float()
    got = regional_constraint(policy, ref, mask)
    want = torch.stack([(((1 - mask[b]) * (policy[b] - ref[b])) ** 2).sum().sqrt() for b in range(3)])
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(regional_constraint(policy, ref, mask, "squared"), want**2)
    torch.testing.assert_close(regional_constraint(policy, ref, mask, "mean"), want**2 / (3 * 8 * 8))


def test_change_inside_mask_is_free_and_outside_is_not():
    ref = torch.zeros(1, 3, 4, 4)
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2] = 1
    inside = ref.clone()
    inside[..., :2] = 1.0
    assert regional_constraint(inside, ref, mask).item() == 0.0
    outside = ref.clone()
    outside[..., 3] = 1.0
    assert regional_constraint(outside, ref, mask).item() == pytest.approx((3 * 4) ** 0.5)


def test_zero_difference_gives_zero_constraint_and_finite_zero_gradient():
    ref = torch.rand(2, 3, 4, 4)
    policy = ref.clone().requires_grad_(True)
    c = regional_constraint(policy, ref, torch.zeros(2, 1, 4, 4))
    assert torch.equal(c, torch.zeros(2))
    c.sum().backward()
    assert torch.isfinite(policy.grad).all() and policy.grad.abs().sum() == 0


def test_the_constraint_gradient_flows_outside_the_mask_only():
    g = torch.Generator().manual_seed(1)
    ref = torch.rand(2, 3, 8, 8, generator=g)
    policy = torch.rand(2, 3, 8, 8, generator=g).requires_grad_(True)
    mask = torch.zeros(2, 1, 8, 8)
    mask[..., :4] = 1.0  # the left half may change
    regional_constraint(policy, ref, mask).sum().backward()
    assert torch.equal(policy.grad[..., :4], torch.zeros(2, 3, 8, 4))
    assert (policy.grad[..., 4:] != 0).all()


def test_loss_combines_terms_and_beta_zero_is_draft():
    policy = torch.rand(2, 3, 4, 4, requires_grad=True)
    ref = torch.rand(2, 3, 4, 4)
    mask = torch.zeros(2, 1, 4, 4)
    reward = policy.mean(dim=(1, 2, 3))
    terms = focus_n_fix_loss(reward, policy, ref, mask, beta=0.5)
    want = -reward.mean() + 0.5 * regional_constraint(policy, ref, mask).mean()
    torch.testing.assert_close(terms.loss, want)
    draft = focus_n_fix_loss(policy.mean(dim=(1, 2, 3)), policy, ref, mask, beta=0.0)
    (g,) = torch.autograd.grad(draft.loss, policy)
    torch.testing.assert_close(g, torch.full_like(g, -1 / (2 * 48)))  # only the reward term
    assert draft.constraint.gt(0).all()  # still measured and logged


def test_mask_is_resized_and_bad_shapes_are_named():
    policy, ref = torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8)
    full = regional_constraint(policy, ref, torch.ones(1, 1, 2, 2))
    assert full.item() == 0.0
    left = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])  # a latent-size mask: the left half may change
    resized = F.interpolate(left, size=(8, 8), mode="bilinear", align_corners=False)
    got = regional_constraint(policy, ref, left)
    assert torch.equal(got, regional_constraint(policy, ref, resized)) and got.item() > 0
    with pytest.raises(ValueError, match="mask must be"):
        regional_constraint(policy, ref, torch.ones(1, 8, 8))
    with pytest.raises(ValueError, match="beta"):
        focus_n_fix_loss(torch.zeros(1), policy, ref, torch.ones(1, 1, 8, 8), beta=-1)


def test_reward_composite_takes_the_policy_inside_the_mask_and_passes_gradient_only_there():
    g = torch.Generator().manual_seed(0)
    policy = torch.rand(2, 3, 8, 8, generator=g, requires_grad=True)
    reference = torch.rand(2, 3, 8, 8, generator=g, requires_grad=True)
    mask = torch.zeros(2, 1, 8, 8)
    mask[0, :, 2:5, 3:6] = 1.0  # image 1: empty mask (a clean image) -> the reward sees only Î0
    out = reward_composite(policy, reference, mask)
    assert torch.equal(out[0, :, 2:5, 3:6], policy[0, :, 2:5, 3:6].detach())
    inside = mask.expand(-1, 3, -1, -1).bool()
    assert torch.equal(out[~inside], reference[~inside].detach())
    out.sum().backward()
    assert torch.equal(policy.grad, inside.float())  # d out / d policy = M, exactly
    assert reference.grad is None  # the reference is a constant
    with pytest.raises(ValueError, match="shape"):
        reward_composite(policy, reference[:1], mask)


def test_beta_schedule_holds_then_ramps_linearly_to_beta_end():
    # constant without beta_end
    assert [beta_at(s, 10, 0.7) for s in range(10)] == [0.7] * 10
    # 120 steps, ramp from step 60: beta until 60, beta_end exactly at the last step, linear between
    values = [beta_at(s, 120, 0.5, 2.0, 0.5) for s in range(120)]
    assert values[:61] == [0.5] * 61
    assert values[-1] == 2.0
    assert values[90] == pytest.approx(0.5 + 1.5 * 30 / 59)
    assert all(b > a for a, b in zip(values[60:-1], values[61:], strict=True))
    # a ramp may also fall, and may start at step 0
    assert beta_at(0, 11, 1.0, 0.0, 0.0) == 1.0 and beta_at(10, 11, 1.0, 0.0, 0.0) == 0.0
    assert beta_at(5, 11, 1.0, 0.0, 0.0) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="step"):
        beta_at(10, 10, 0.5, 1.0)
    with pytest.raises(ValueError, match="ramp_start"):
        beta_at(0, 10, 0.5, 1.0, 1.0)
