"""LearnedSoup, from a user's side: a soup of K models behaves like the
template loaded with its merged state_dict, equals the model-soups recipe,
trains only its weights, and says which member differs when they do."""
import re

import pytest
import torch
from torch import nn

import simplex_param as sp


def net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def trained_members(K):
    """K nets whose BatchNorm statistics have moved away from the defaults."""
    members = [net(seed) for seed in range(K)]
    for k, m in enumerate(members):
        m.train()
        m(torch.randn(32, 4) + k)
    return members


def recipe(members, alpha):
    """The model-soups recipe (learned_bylayer.py), written as its users do:
    softmax over each tensor's row, then sum(alpha_k * p_k)."""
    names = [n for n, _ in members[0].named_parameters()]
    paramslist = [tuple(p for _, p in m.named_parameters()) for m in members]
    params = tuple(
        sum(pi * ai for pi, ai in zip(p, alpha[j].softmax(-1))) for j, p in enumerate(zip(*paramslist))
    )
    return dict(zip(names, params))


def test_outputs_equal_the_template_with_the_merged_state_dict():
    members = trained_members(3)
    soup = sp.LearnedSoup(members).eval()
    with torch.no_grad():
        soup.parametrizations.weight.original.normal_()
    x = torch.randn(5, 4)
    template = net(99)
    template.load_state_dict(soup.merged_state_dict())
    template.eval()
    torch.testing.assert_close(soup(x), template(x))
    # The running statistics: mixed with the weights of their BatchNorm's weight.
    w = soup.weight[soup.mixed_names.index("1.weight")].detach()
    expected = sum(w[k] * m[1].running_mean for k, m in enumerate(members))
    torch.testing.assert_close(template[1].running_mean, expected)
    assert template[1].num_batches_tracked == members[0][1].num_batches_tracked


def test_equals_the_model_soups_recipe_in_values_and_gradients():
    members = trained_members(4)
    soup = sp.LearnedSoup(members, buffers=0).eval()
    alpha = torch.randn(soup.weight.shape, requires_grad=True)
    with torch.no_grad():
        soup.parametrizations.weight.original.copy_(alpha)
    x = torch.randn(6, 4)
    buffers = dict(members[0].named_buffers())
    template = net(99).eval()
    expected = torch.func.functional_call(template, {**recipe(members, alpha), **buffers}, (x,))
    got = soup(x)
    torch.testing.assert_close(got, expected)
    got.square().sum().backward()
    expected.square().sum().backward()
    torch.testing.assert_close(soup.parametrizations.weight.original.grad, alpha.grad)


def test_members_get_no_gradients_and_keep_their_bits():
    members = trained_members(3)
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in members]
    soup = sp.LearnedSoup(members)
    opt = torch.optim.Adam(soup.parameters(), lr=0.1)
    assert [n for n, _ in soup.named_parameters()] == ["parametrizations.weight.original"]
    for _ in range(3):
        opt.zero_grad()
        soup(torch.randn(16, 4)).square().mean().backward()
        opt.step()
    for m, state in zip(members, before):
        assert all(p.grad is None for p in m.parameters())
        for key, value in m.state_dict().items():
            assert torch.equal(value, state[key]), key
    # No copies: the soup holds the members' own storage.
    assert soup._members[0][1].data_ptr() == members[1][0].weight.data_ptr()


def test_learning_moves_towards_the_best_member():
    torch.manual_seed(0)
    teacher = nn.Linear(4, 1)
    members = [nn.Linear(4, 1) for _ in range(3)]
    members[2].load_state_dict(teacher.state_dict())
    soup = sp.LearnedSoup(members, granularity="model")
    opt = torch.optim.Adam(soup.parameters(), lr=0.1)
    for _ in range(200):
        x = torch.randn(64, 4)
        loss = (soup(x) - teacher(x).detach()).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert soup.weight.shape == (1, 3)
    assert soup.weight[0, 2] > 0.9


def test_state_dict_round_trip_and_initial_probabilities():
    members = trained_members(3)
    soup = sp.LearnedSoup(members)
    p = torch.tensor([0.6, 0.3, 0.1]).expand(soup.weight.shape).contiguous()
    soup.weight = p  # right_inverse: probabilities in, pre-weights stored
    torch.testing.assert_close(soup.weight, p)
    other = sp.LearnedSoup(members)
    other.load_state_dict(soup.state_dict())
    torch.testing.assert_close(other.weight, p)
    x = torch.randn(4, 4)
    soup.eval(), other.eval()
    assert torch.equal(soup(x), other(x))
    # Uniform at construction.
    torch.testing.assert_close(sp.LearnedSoup(members).weight, torch.full(soup.weight.shape, 1 / 3))


def test_state_dicts_with_a_template_and_bfloat16_storage():
    members = trained_members(3)
    states = [m.state_dict() for m in members]
    soup = sp.LearnedSoup(states, template=net(7), dtype=torch.bfloat16).eval()
    exact = sp.LearnedSoup(members).eval()
    assert soup._members[0][0].dtype == torch.bfloat16
    x = torch.randn(5, 4)
    out = soup(x)
    assert out.dtype == torch.float32  # mixed in bfloat16, cast back to the template's dtype
    torch.testing.assert_close(out, exact(x), rtol=0.05, atol=0.05)


def test_k1_and_tied_weights():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 3)
            self.b = nn.Linear(3, 3)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(self.a(x))

    members = [Tied(), Tied()]
    soup = sp.LearnedSoup(members)
    assert soup.mixed_names == ["a.weight", "a.bias", "b.bias"]
    merged = soup.merged_state_dict()
    assert torch.equal(merged["a.weight"], merged["b.weight"])
    t = Tied()
    t.load_state_dict(merged)
    x = torch.randn(2, 3)
    torch.testing.assert_close(soup(x), t(x))

    one = sp.LearnedSoup([members[0]])
    assert one.weight.shape == (3, 1)
    torch.testing.assert_close(one(x), members[0](x))


def test_summary_lists_the_soup():
    soup = sp.LearnedSoup(trained_members(2))
    text = str(sp.summary(nn.ModuleDict({"soup": soup})))
    assert "soup.weight" in text


ERRORS = [
    (lambda: sp.LearnedSoup([net(), nn.Linear(4, 3)]), ValueError,
     "members[1] differs from members[0]: it lacks the key '0.weight'"),
    (lambda: sp.LearnedSoup([net(), nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))]),
     ValueError, "members[1] differs from members[0] at key '3.weight': shape [2, 8] and dtype torch.float32, "
                 "but shape [3, 8] and dtype torch.float32 in members[0]"),
    (lambda: sp.LearnedSoup([net().state_dict()]), TypeError, "template is required when members are state_dicts"),
    (lambda: sp.LearnedSoup([]), ValueError, "members must contain at least one model"),
    (lambda: sp.LearnedSoup(net()), TypeError, "members must be a sequence of modules, of state_dicts or of safetensors paths, got Sequential"),
    (lambda: sp.LearnedSoup([net(), net().state_dict()]), TypeError, "members must be all modules, all state_dicts or all safetensors paths"),
    (lambda: sp.LearnedSoup([net()], granularity="layer"), ValueError,
     "granularity must be one of ('tensor', 'model'), got 'layer'"),
    (lambda: sp.LearnedSoup([net()], buffers=3), ValueError,
     "buffers must be 'mix', a member index in [0, 0], a module or a state_dict, got 3"),
    (lambda: sp.LearnedSoup([net()], buffers="base"), ValueError,
     "buffers must be 'mix', a member index in [0, 0], a module or a state_dict, got 'base'"),
    (lambda: sp.LearnedSoup([net()], buffers=[0]), ValueError,
     "buffers must be 'mix', a member index in [0, 0], a module or a state_dict, got a list"),
    (lambda: sp.LearnedSoup([net()], buffers=nn.Linear(4, 8)), ValueError,
     "buffers lacks the key '1.running_mean', a buffer of members[0]"),
    (lambda: sp.LearnedSoup([net()], buffers={**net().state_dict(), "1.running_var": torch.ones(7)}), ValueError,
     "buffers['1.running_var'] has shape [7] and dtype torch.float32, but shape [8] and dtype torch.float32 in "
     "members[0]"),
    (lambda: sp.LearnedSoup([net()], buffers={**net().state_dict(), "1.running_var": [1.0] * 8}), TypeError,
     "buffers['1.running_var'] must be a Tensor, got list"),
    (lambda: sp.LearnedSoup([net()], dtype=torch.int8), TypeError, "dtype must be a floating torch.dtype or None"),
    (lambda: sp.LearnedSoup([net()], map="relu"), ValueError, "map must be one of"),
    (lambda: sp.LearnedSoup([nn.ReLU()]), ValueError, "the template has no floating parameters to mix"),
]


@pytest.mark.parametrize("make,kind,message", ERRORS)
def test_errors(make, kind, message):
    with pytest.raises(kind, match=re.escape(message)):
        make()


def test_train_mode_leaves_the_buffers_as_loaded_and_temperature_follows_set_temperature():
    members = trained_members(2)
    soup = sp.LearnedSoup(members, buffers=1)
    before = {k: v.clone() for k, v in soup.merged_state_dict().items()}
    soup.train()
    for _ in range(3):
        soup(torch.randn(8, 4) + 3)
    after = soup.merged_state_dict()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert torch.equal(after["1.running_mean"], members[1][1].running_mean)
    sp.set_temperature(soup, 0.5)
    assert soup.temperature == 0.5 and "temperature=0.5" in repr(soup)


def test_to_another_dtype_moves_members_and_mixes_alike():
    members = trained_members(2)
    soup = sp.LearnedSoup(members).double().eval()
    assert soup._members[0][0].dtype == torch.float64
    x = torch.randn(3, 4, dtype=torch.float64)
    out = soup(x)
    assert out.dtype == torch.float64
    template = net(5).double().eval()
    template.load_state_dict(soup.merged_state_dict())
    torch.testing.assert_close(out, template(x))


def test_buffers_from_the_base_model_as_they_are():
    # The model-soups recipe runs the soup with its base model's buffers.
    base = net(50)
    base.train()(torch.randn(64, 4) * 3 - 2)              # statistics unlike any member's
    base.eval()
    members = trained_members(3)
    x = torch.randn(6, 4)
    for given in (base, base.state_dict()):
        soup = sp.LearnedSoup(members, buffers=given).eval()
        with torch.no_grad():
            soup.parametrizations.weight.original.normal_(generator=torch.Generator().manual_seed(1))
        merged = soup.merged_state_dict()
        for key, b in base.named_buffers():
            assert torch.equal(merged[key], b), key
        # The parameters are still the mix; the outputs are the template's with them.
        w = soup.weight[soup.mixed_names.index("0.weight")].detach()
        torch.testing.assert_close(merged["0.weight"], sum(w[k] * m[0].weight for k, m in enumerate(members)))
        model = net(99)
        model.load_state_dict(merged)
        torch.testing.assert_close(soup(x), model.eval()(x))
        mixed = sp.LearnedSoup(members).eval()
        mixed.weight = soup.weight.detach()
        assert not torch.allclose(soup(x), mixed(x))      # the buffers matter here
    # Copied once: later changes to the base model do not reach the soup.
    soup = sp.LearnedSoup(members, buffers=base).eval()
    before = soup.merged_state_dict()["1.running_mean"]
    with torch.no_grad():
        base[1].running_mean.add_(1.0)
    assert torch.equal(soup.merged_state_dict()["1.running_mean"], before)
    # Train mode updates nothing in the soup.
    soup.train()(torch.randn(8, 4))
    assert torch.equal(soup.merged_state_dict()["1.running_mean"], before)


def test_update_bn_on_the_merged_model():
    # The merged model's BatchNorm statistics are a mix of the members';
    # torch.optim.swa_utils.update_bn recomputes them on data.
    members = trained_members(3)
    soup = sp.LearnedSoup(members).eval()
    soup.weight = torch.softmax(torch.randn(soup.weight.shape, generator=torch.Generator().manual_seed(2)), -1)
    merged = net(99)
    merged.load_state_dict(soup.merged_state_dict())
    x_held, y_held = torch.randn(256, 4) * 2 + 1, torch.randint(3, (256,))
    mixed_loss = nn.functional.cross_entropy(merged.eval()(x_held), y_held).item()
    loader = torch.utils.data.DataLoader(x_held, batch_size=256)   # one batch: exact statistics
    torch.optim.swa_utils.update_bn(loader, merged)
    h = merged[0](x_held).detach()
    torch.testing.assert_close(merged[1].running_mean, h.mean(0))
    torch.testing.assert_close(merged[1].running_var, h.var(0, unbiased=True))
    assert merged[1].num_batches_tracked == 1       # update_bn starts the statistics afresh
    recomputed_loss = nn.functional.cross_entropy(merged.eval()(x_held), y_held).item()
    print(f"held-out loss with the mixed statistics {mixed_loss:.4f}, after update_bn {recomputed_loss:.4f}")
    # The soup itself is untouched: its buffers are still the mix.
    assert not torch.equal(soup.merged_state_dict()["1.running_mean"], merged[1].running_mean)
    # Several batches give their (cumulative) mean, as update_bn documents.
    merged.load_state_dict(soup.merged_state_dict())
    torch.optim.swa_utils.update_bn(torch.utils.data.DataLoader(x_held, batch_size=64), merged)
    torch.testing.assert_close(merged[1].running_mean, h.mean(0))


def test_output_scale_is_the_recipes_beta_with_its_gradient():
    members = trained_members(4)
    soup = sp.LearnedSoup(members, buffers=0, output_scale=True).eval()
    assert [name for name, _ in soup.named_parameters()] == ["beta", "parametrizations.weight.original"]
    assert soup.beta.shape == () and soup.beta.item() == 1.0
    assert "output_scale=True" in repr(soup)
    alpha = torch.randn(soup.weight.shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        soup.parametrizations.weight.original.copy_(alpha)
        soup.beta.fill_(1.7)
    # The recipe: beta * functional_call(model, mixed params), beta a 0-D parameter.
    alpha_r = alpha.clone().requires_grad_()
    beta_r = nn.Parameter(torch.tensor(1.7))
    template = members[0].eval()
    x = torch.randn(6, 4)
    before = beta_r * torch.func.functional_call(template, recipe(members, alpha_r), (x,))
    after = soup(x)
    torch.testing.assert_close(after, before)
    before.square().sum().backward()
    after.square().sum().backward()
    torch.testing.assert_close(soup.beta.grad, beta_r.grad)
    torch.testing.assert_close(soup.parametrizations.weight.original.grad, alpha_r.grad)
    # d/dbeta sum((beta f)^2) = 2 beta sum(f^2), with f the unscaled logits.
    f = (after / 1.7).detach()
    torch.testing.assert_close(soup.beta.grad, 2 * 1.7 * f.square().sum())
    # beta is not in the merged state_dict: the template gives the unscaled logits.
    model = net(99)
    model.load_state_dict(soup.merged_state_dict())
    torch.testing.assert_close(soup.beta.detach() * model.eval()(x), after.detach())
    # An optimizer step moves beta, and reset_parameters puts it back to 1.
    torch.optim.SGD(soup.parameters(), lr=1e-3).step()
    assert soup.beta.item() != 1.7
    soup.reset_parameters()
    assert soup.beta.item() == 1.0 and torch.equal(soup.weight, torch.full(soup.weight.shape, 0.25))
    assert sp.LearnedSoup(members).beta is None


def test_output_scale_errors():
    with pytest.raises(TypeError, match="output_scale must be a bool, got str"):
        sp.LearnedSoup([net()], output_scale="yes")

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 2), nn.Linear(4, 2)

        def forward(self, x):
            return self.a(x), self.b(x)

    soup = sp.LearnedSoup([TwoHeads(), TwoHeads()], output_scale=True)
    with pytest.raises(TypeError, match="output_scale=True .* the output must be a Tensor .*, got tuple"):
        soup(torch.randn(3, 4))
