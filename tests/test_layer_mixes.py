"""Layer mixes of other libraries: HF transformers' use_weighted_layer_sum,
s3prl's Featurizer and speechbrain's WeightedSSLModel, written out below in
plain PyTorch as those libraries write them, against sp.WeightedLayerSum,
bit for bit (torch.equal) on outputs, gradients and training steps; and
ScalarMix's layer_norm option.

The exact formulas run PyTorch ops only, so both paths (compiled and
fallback) must give the same bits; the fused formula is checked within
rounding."""
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import simplex_param as sp

from conftest import DTYPES, assert_close


# ----- The sources, as they write them -------------------------------------

class HFWeightedLayerSum(nn.Module):
    """transformers' Wav2Vec2ForSequenceClassification (and HuBERT, WavLM,
    Whisper, ... heads) with config.use_weighted_layer_sum=True."""

    def __init__(self, num_layers):
        super().__init__()
        self.layer_weights = nn.Parameter(torch.ones(num_layers) / num_layers)

    def forward(self, hidden_states):  # a tuple of (batch, time, dim)
        hidden_states = torch.stack(hidden_states, dim=1)
        norm_weights = nn.functional.softmax(self.layer_weights, dim=-1)
        return (hidden_states * norm_weights.view(-1, 1, 1)).sum(dim=1)


class S3prlFeaturizer(nn.Module):
    """s3prl's Featurizer: its weights and _weighted_sum."""

    def __init__(self, layer_num, normalize=False):
        super().__init__()
        self.layer_num = layer_num
        self.normalize = normalize
        self.weights = nn.Parameter(torch.zeros(layer_num))

    def forward(self, feature):  # a list of (batch, time, dim)
        stacked_feature = torch.stack(feature, dim=0)
        if self.normalize:
            stacked_feature = F.layer_norm(stacked_feature, (stacked_feature.shape[-1],))
        _, *origin_shape = stacked_feature.shape
        stacked_feature = stacked_feature.view(self.layer_num, -1)
        norm_weights = F.softmax(self.weights, dim=-1)
        weighted_feature = (norm_weights.unsqueeze(-1) * stacked_feature).sum(dim=0)
        return weighted_feature.view(*origin_shape)


class SpeechbrainWeightedSSL(nn.Module):
    """speechbrain's WeightedSSLModel, its weighting (without the encoder and
    its .detach(), so that the inputs' gradients can be compared too)."""

    def __init__(self, num_layers, layernorm=False):
        super().__init__()
        self.num_layers = num_layers
        self.layernorm = layernorm
        self.weights = nn.Parameter(torch.zeros(num_layers))

    def forward(self, hidden_states):  # a list of (batch, time, dim)
        hidden_states = torch.stack(hidden_states, dim=0)
        norm_weights = F.softmax(self.weights, dim=-1)
        if self.layernorm:
            hidden_states = [F.layer_norm(t, (t.shape[-1],)) for t in hidden_states]
        weighted_feats = hidden_states[0] * norm_weights[0]
        for i in range(1, len(hidden_states)):
            weighted_feats += hidden_states[i] * norm_weights[i]
        return weighted_feats


def hidden_states(L, dtype, seed, shape=(2, 7, 24)):
    """L layer outputs of different scales, as a transformer's grow."""
    gen = torch.Generator().manual_seed(seed)
    return [((1 + l / 4) * torch.randn(*shape, generator=gen) + 0.1 * l).to(dtype) for l in range(L)]


def source_and_ours(source, L, norm, dtype):
    """The source's module built in ``dtype`` (as from_pretrained(torch_dtype=...)
    builds it: the default dtype set during construction), and ours."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        theirs = {"hf": lambda: HFWeightedLayerSum(L), "s3prl": lambda: S3prlFeaturizer(L, normalize=norm),
                  "speechbrain": lambda: SpeechbrainWeightedSSL(L, layernorm=norm)}[source]()
    finally:
        torch.set_default_dtype(default)
    if source == "hf":
        return theirs, sp.WeightedLayerSum.hf(L, dtype=dtype)
    if source == "s3prl":
        return theirs, sp.WeightedLayerSum.s3prl(L, normalize=norm, dtype=dtype)
    return theirs, sp.WeightedLayerSum.speechbrain(L, layernorm=norm, dtype=dtype)


CASES = [
    (source, L, norm, dtype)
    for source, L, dtype in itertools.product(
        ["hf", "s3prl", "speechbrain"], [3, 13, 25], [torch.float32, torch.float64]
    )
    for norm in ([False] if source == "hf" else [False, True])
]


@pytest.mark.parametrize("source,L,norm,dtype", CASES)
def test_bit_for_bit_with_the_source(source, L, norm, dtype):
    theirs, ours = source_and_ours(source, L, norm, dtype)
    key = "layer_weights" if source == "hf" else "weights"
    # The same start: HF's ones(L) / L, the others' zeros; built in float32
    # and cast, or built in dtype.
    assert torch.equal(ours.layer_weights, theirs.state_dict()[key])
    built = {"hf": HFWeightedLayerSum(L), "s3prl": S3prlFeaturizer(L), "speechbrain": SpeechbrainWeightedSSL(L)}
    cast = {"hf": sp.WeightedLayerSum.hf(L), "s3prl": sp.WeightedLayerSum.s3prl(L),
            "speechbrain": sp.WeightedLayerSum.speechbrain(L)}
    assert torch.equal(cast[source].to(dtype).layer_weights, built[source].to(dtype).get_parameter(key))
    # The same (trained) weights, loaded from the source's state_dict.
    with torch.no_grad():
        theirs.get_parameter(key).copy_(torch.randn(L, generator=torch.Generator().manual_seed(L)))
    ours.load_state_dict({"layer_weights": theirs.state_dict()[key]})
    opt_theirs = torch.optim.Adam(theirs.parameters(), lr=0.1)
    opt_ours = torch.optim.Adam(ours.parameters(), lr=0.1)
    for step in range(3):
        hs = hidden_states(L, dtype, seed=100 * L + step)
        hs_theirs = [h.clone().requires_grad_() for h in hs]
        hs_ours = [h.clone().requires_grad_() for h in hs]
        out_theirs, out_ours = theirs(hs_theirs), ours(hs_ours)
        assert out_ours.dtype == dtype and torch.equal(out_ours, out_theirs)
        target = torch.randn(out_ours.shape, generator=torch.Generator().manual_seed(step), dtype=dtype)
        F.mse_loss(out_theirs, target).backward()
        F.mse_loss(out_ours, target).backward()
        assert torch.equal(ours.layer_weights.grad, theirs.get_parameter(key).grad)
        for a, b in zip(hs_ours, hs_theirs):
            assert torch.equal(a.grad, b.grad)
        opt_theirs.step()
        opt_ours.step()
        opt_theirs.zero_grad()
        opt_ours.zero_grad()
        assert torch.equal(ours.layer_weights, theirs.get_parameter(key))


@pytest.mark.parametrize("norm", [False, True])
def test_the_fused_formula_equals_them_within_rounding(norm):
    L = 13
    theirs = S3prlFeaturizer(L, normalize=norm)
    fused = sp.WeightedLayerSum(L, layer_norm="token" if norm else None)
    with torch.no_grad():
        theirs.weights.copy_(torch.randn(L, generator=torch.Generator().manual_seed(5)))
    fused.load_state_dict({"layer_weights": theirs.weights.detach()})
    hs = [h.requires_grad_() for h in hidden_states(L, torch.float32, seed=6)]
    out = fused(hs)
    expected = theirs(hs)
    assert_close(out, expected)
    for a, b in zip(torch.autograd.grad(out.square().sum(), [fused.layer_weights, *hs]),
                    torch.autograd.grad(expected.square().sum(), [theirs.weights, *hs])):
        assert_close(a, b, dtype=torch.float32)


def test_a_stacked_tensor_is_the_list_of_its_layers():
    hs = hidden_states(4, torch.float64, seed=7)
    for formula in sp.WeightedLayerSum.FORMULAS:
        mix = sp.WeightedLayerSum(4, formula=formula, dtype=torch.float64)
        with torch.no_grad():
            mix.layer_weights.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0]))
        assert torch.equal(mix(torch.stack(hs)), mix(hs))
        assert_close(mix(hs), sum(w * h for w, h in zip(torch.softmax(mix.layer_weights.detach(), 0), hs)))


def test_hf_checkpoint_loads_into_a_model():
    # A classification head trained with HF's use_weighted_layer_sum keeps
    # layer_weights at its top level; the layer takes it under its own name.
    hf_state = {"layer_weights": torch.tensor([0.1, 0.4, -0.3]), "projector.weight": torch.randn(2, 8)}
    model = nn.Module()
    model.layer_sum = sp.WeightedLayerSum.hf(3)
    model.load_state_dict({"layer_sum.layer_weights": hf_state["layer_weights"]})
    assert torch.equal(model.layer_sum.weight, torch.softmax(hf_state["layer_weights"], -1))
    assert list(model.state_dict()) == ["layer_sum.layer_weights"]


def test_weighted_layer_sum_compiles():
    torch._dynamo.reset()
    mix = sp.WeightedLayerSum(3, layer_norm="token")
    hs = hidden_states(3, torch.float32, seed=8)
    assert_close(torch.compile(mix, fullgraph=True)(hs), mix(hs))


def test_weighted_layer_sum_bad_arguments():
    known = r"\['fused', 'hf', 's3prl', 'speechbrain'\]"
    with pytest.raises(ValueError, match=rf"formula must be one of {known}, got 'allennlp'"):
        sp.WeightedLayerSum(3, formula="allennlp")
    with pytest.raises(ValueError, match='formula="hf" takes no layer_norm'):
        sp.WeightedLayerSum(3, formula="hf", layer_norm="token")
    with pytest.raises(ValueError, match=r'layer_norm must be "token" or None, got .tensor. \(AllenNLP'):
        sp.WeightedLayerSum(3, layer_norm="tensor")
    with pytest.raises(ValueError, match="num_layers must be at least 1"):
        sp.WeightedLayerSum(0)
    with pytest.raises(ValueError, match="layers has 2 tensors but num_layers is 3"):
        sp.WeightedLayerSum.hf(3)([torch.ones(2, 3)] * 2)


# ----- ScalarMix(layer_norm=...) -------------------------------------------

def token_norm(t):
    """Per-vector normalisation over the last dimension, eps 1e-5, in float64."""
    t = t.double()
    mean = t.mean(-1, keepdim=True)
    var = (t - mean).square().mean(-1, keepdim=True)
    return (t - mean) / torch.sqrt(var + 1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_scalar_mix_token_norm(dtype):
    scalars = [0.3, -0.2, 1.0]
    mix = sp.ScalarMix(3, initial_scalar_parameters=scalars, layer_norm="token")
    with torch.no_grad():
        mix.gamma.fill_(0.75)
    tensors = [t.to(dtype) for t in hidden_states(3, torch.float32, seed=9)]
    out = mix(tensors)  # no mask needed
    s = torch.softmax(torch.tensor(scalars), 0).double()
    expected = 0.75 * sum(s_k * token_norm(t) for s_k, t in zip(s, tensors))
    assert out.dtype == dtype
    assert_close(out, expected.to(dtype))
    # Each vector on its own: a padded position does not move the others.
    padded = [t.clone() for t in tensors]
    for t in padded:
        t[0, 5:] = 1e3
    assert_close(mix(padded)[0, :5], out[0, :5])
    assert mix.layer_norm == "token" and not mix.do_layer_norm


def test_scalar_mix_layer_norm_and_do_layer_norm():
    assert sp.ScalarMix(2).layer_norm is None
    assert sp.ScalarMix(2, False).layer_norm is None
    assert sp.ScalarMix(2, True).layer_norm == "tensor"
    assert sp.ScalarMix(2, do_layer_norm=True, layer_norm="tensor").do_layer_norm
    assert sp.ScalarMix(2, layer_norm="tensor").do_layer_norm
    for do, norm in [(True, "token"), (False, "tensor"), (False, "token")]:
        with pytest.raises(ValueError, match=f"do_layer_norm={do} contradicts layer_norm='{norm}'"):
            sp.ScalarMix(2, do_layer_norm=do, layer_norm=norm)
    with pytest.raises(ValueError, match=r'layer_norm must be "tensor", "token" or None, got \'batch\''):
        sp.ScalarMix(2, layer_norm="batch")
    # The whole-tensor norm is AllenNLP's, by either name.
    tensors = hidden_states(2, torch.float32, seed=10, shape=(2, 5, 4))
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[0, 3:] = False
    assert torch.equal(sp.ScalarMix(2, True)(tensors, mask), sp.ScalarMix(2, layer_norm="tensor")(tensors, mask))
    assert "layer_norm='token'" in repr(sp.ScalarMix(2, layer_norm="token"))


def test_scalar_mix_reads_the_truth_of_do_layer_norm():
    # As AllenNLP does: its own test passes do_layer_norm="scalar_norm_reg".
    for value in ["scalar_norm_reg", 1, [0], torch.tensor(True), 2.5]:
        assert sp.ScalarMix(3, do_layer_norm=value).layer_norm == "tensor", value
    for value in ["", 0, [], torch.tensor(0.0), 0.0]:
        assert sp.ScalarMix(3, do_layer_norm=value).layer_norm is None, value
    assert sp.ScalarMix(3, "yes", layer_norm="tensor").do_layer_norm
    with pytest.raises(ValueError, match=r"do_layer_norm='scalar_norm_reg' \(read as True\) contradicts layer_norm='token'"):
        sp.ScalarMix(3, do_layer_norm="scalar_norm_reg", layer_norm="token")
    with pytest.raises(ValueError, match=r"do_layer_norm='' \(read as False\) contradicts layer_norm='tensor'"):
        sp.ScalarMix(3, do_layer_norm="", layer_norm="tensor")
    with pytest.raises(TypeError, match="do_layer_norm must have a truth value .* got Tensor"):
        sp.ScalarMix(3, do_layer_norm=torch.ones(2))
