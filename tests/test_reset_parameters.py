"""reset_parameters() on every layer with mixing weights: the constructor's
start again, as HF's _init_weights and from_pretrained need when a
checkpoint lacks the mix weights."""
import pytest
import torch
from torch import nn

import simplex_param as sp


def scramble(module):
    """Garbage in every parameter, as torch.empty leaves a model built on the
    meta device and moved with to_empty (values like -2.3e+33 or 4e-41)."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.tensor([-2.3e33, 4e-41, 7.0, -1.0]).repeat(p.numel())[: p.numel()].view_as(p))


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


LAYERS = {
    "SimplexFusion": lambda: sp.SimplexFusion(4, bias=True),
    "SimplexFusion-sparsemax": lambda: sp.SimplexFusion(4, map="sparsemax"),
    "ScalarMix": lambda: sp.ScalarMix(3),
    "ScalarMix-initial": lambda: sp.ScalarMix(3, initial_scalar_parameters=[0.5, float("-inf"), 2.0]),
    "ScalarMix-frozen": lambda: sp.ScalarMix(3, trainable=False),
    "WeightedLayerSum": lambda: sp.WeightedLayerSum(5),
    "WeightedLayerSum.hf": lambda: sp.WeightedLayerSum.hf(5),
    "WeightedLayerSum.s3prl": lambda: sp.WeightedLayerSum.s3prl(5, normalize=True),
    "WeightedLayerSum.speechbrain": lambda: sp.WeightedLayerSum.speechbrain(5),
    "MixedOp": lambda: sp.MixedOp([nn.Identity(), nn.Tanh(), nn.ReLU()]),
    "LearnedSoup": lambda: sp.LearnedSoup([nn.Linear(3, 2) for _ in range(4)]),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_reset_parameters_gives_the_constructors_start(name):
    torch.manual_seed(0)
    fresh = LAYERS[name]()
    torch.manual_seed(0)
    layer = LAYERS[name]()
    requires = [p.requires_grad for p in layer.parameters()]
    scramble(layer)
    assert not torch.equal(next(iter(layer.state_dict().values())), next(iter(fresh.state_dict().values())))
    layer.reset_parameters()
    assert_same_state(layer, fresh)
    assert [p.requires_grad for p in layer.parameters()] == requires
    # The weights the layer applies are the constructor's too.
    assert torch.equal(layer.weight, fresh.weight)


def test_reset_weights_are_uniform_or_the_initial_ones():
    assert torch.equal(sp.WeightedLayerSum.hf(4).layer_weights, torch.full((4,), 0.25))
    mix = sp.WeightedLayerSum.hf(4)
    with torch.no_grad():
        mix.layer_weights.normal_()
    mix.reset_parameters()
    assert torch.equal(mix.layer_weights, torch.full((4,), 0.25))  # HF's ones(L) / L
    assert torch.equal(mix.weight, torch.full((4,), 0.25))
    plain = sp.WeightedLayerSum(4, formula="hf")
    plain.reset_parameters()
    assert torch.equal(plain.layer_weights, torch.zeros(4))  # this constructor's start: zeros
    scalar = sp.ScalarMix(3, initial_scalar_parameters=[0.0, 0.0, 1.0])
    with torch.no_grad():
        scalar.gamma.fill_(3.0)
        scalar.scalar_parameters[2].fill_(-5.0)
    scalar.reset_parameters()
    assert scalar.gamma.item() == 1.0
    assert [p.item() for p in scalar.scalar_parameters] == [0.0, 0.0, 1.0]
    soup = sp.LearnedSoup([nn.Linear(3, 2) for _ in range(4)], granularity="model")
    soup.weight = torch.tensor([[0.7, 0.1, 0.1, 0.1]])
    soup.reset_parameters()
    assert torch.equal(soup.weight, torch.full((1, 4), 0.25))


def test_reset_parameters_of_lazy_and_own_weights_false_layers():
    lazy = sp.LazySimplexFusion(bias=True)
    lazy.reset_parameters()  # before the dry run: nothing to reset, no error
    assert lazy.has_uninitialized_params()
    lazy([torch.ones(2)] * 3)
    scramble(lazy)
    lazy.reset_parameters()
    assert torch.equal(lazy.parametrizations.weight.original, torch.zeros(3))
    assert lazy.bias.item() == 0.0
    shared = sp.MixedOp([nn.Identity(), nn.Tanh()], own_weights=False)
    shared.reset_parameters()  # no weights of its own: nothing happens
    assert list(shared.parameters()) == []


def test_mixed_op_reset_leaves_the_candidates_alone():
    torch.manual_seed(1)
    mixed = sp.MixedOp([nn.Linear(2, 2), nn.Identity()])
    before = mixed.candidates[0].weight.detach().clone()
    scramble(mixed.candidates[0])
    trained = mixed.candidates[0].weight.detach().clone()
    with torch.no_grad():
        mixed.parametrizations.weight.original.copy_(torch.tensor([3.0, -3.0]))
    mixed.reset_parameters()
    assert torch.equal(mixed.weight, torch.tensor([0.5, 0.5]))
    assert torch.equal(mixed.candidates[0].weight, trained) and not torch.equal(trained, before)


# ----- the HF pattern, without transformers --------------------------------

class Classifier(nn.Module):
    """Stands for an HF audio classifier with use_weighted_layer_sum: an
    encoder whose L hidden states are mixed by `layer_weights`."""

    def __init__(self, num_layers=5, hidden=8, labels=3):
        super().__init__()
        self.encoder = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(num_layers - 1))
        self.layer_weights = nn.Parameter(torch.ones(num_layers) / num_layers)
        self.classifier = nn.Linear(hidden, labels)

    def hidden_states(self, x):
        states = [x]
        for layer in self.encoder:
            states.append(torch.tanh(layer(states[-1])))
        return tuple(states)

    def forward(self, x):
        h = torch.stack(self.hidden_states(x), dim=1)
        w = nn.functional.softmax(self.layer_weights, dim=-1)
        return self.classifier((h * w.view(-1, 1, 1)).sum(dim=1).mean(dim=1))


class MixedClassifier(Classifier):
    def __init__(self, num_layers=5, **kwargs):
        super().__init__(num_layers, **kwargs)
        del self.layer_weights
        self.layer_sum = sp.WeightedLayerSum.hf(num_layers)

    def forward(self, x):
        return self.classifier(self.layer_sum(self.hidden_states(x)).mean(dim=1))


def test_a_base_checkpoint_without_the_mix_weights():
    torch.manual_seed(2)
    trained = Classifier()
    with torch.no_grad():
        trained.layer_weights.normal_()
    base = {k: v for k, v in trained.state_dict().items() if k != "layer_weights"}  # a base checkpoint
    # As from_pretrained builds a model: on the meta device, then empty memory.
    with torch.device("meta"):
        model = MixedClassifier()
    model = model.to_empty(device="cpu")
    result = model.load_state_dict(base, strict=False)
    assert result.missing_keys == ["layer_sum.layer_weights"]
    for name, module in model.named_modules():
        if isinstance(module, sp.WeightedLayerSum) and f"{name}.layer_weights" in result.missing_keys:
            module.reset_parameters()
    assert torch.equal(model.layer_sum.layer_weights, torch.full((5,), 0.2))
    # The HF class started from the same base checkpoint: bit for bit the same model.
    reference = Classifier()
    reference.load_state_dict(base, strict=False)
    x = torch.randn(2, 7, 8)
    assert torch.equal(model(x), reference(x))


def test_a_whole_model_checkpoint_renamed_both_ways():
    torch.manual_seed(3)
    hf = Classifier()
    with torch.no_grad():
        hf.layer_weights.normal_()
    renamed = {("layer_sum.layer_weights" if k == "layer_weights" else k): v for k, v in hf.state_dict().items()}
    model = MixedClassifier()
    model.load_state_dict(renamed)
    x = torch.randn(2, 7, 8)
    assert torch.equal(model(x), hf(x))
    back = Classifier()
    back.load_state_dict({("layer_weights" if k == "layer_sum.layer_weights" else k): v
                          for k, v in model.state_dict().items()})
    assert torch.equal(back(x), hf(x))


# ----- the same with transformers, when it is installed -------------------

def test_hf_wav2vec2_migration():
    transformers = pytest.importorskip("transformers")
    import tempfile

    Head = transformers.Wav2Vec2ForSequenceClassification

    class MixedHead(Head):
        def __init__(self, config):
            super().__init__(config)
            del self.layer_weights
            self.layer_sum = sp.WeightedLayerSum.hf(config.num_hidden_layers + 1)
            self.post_init()

        def forward(self, input_values, attention_mask=None, labels=None):
            outputs = self.wav2vec2(input_values, attention_mask=attention_mask, output_hidden_states=True)
            hidden = self.projector(self.layer_sum(outputs.hidden_states))
            return transformers.modeling_outputs.SequenceClassifierOutput(logits=self.classifier(hidden.mean(dim=1)))

    config = transformers.Wav2Vec2Config(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        conv_dim=(8, 8), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2, classifier_proj_size=8, num_labels=3, use_weighted_layer_sum=True,
    )
    torch.manual_seed(4)
    hf = Head(config).eval()
    with torch.no_grad():
        hf.layer_weights.normal_()
    model = MixedHead(config).eval()
    model.load_state_dict(
        {("layer_sum.layer_weights" if k == "layer_weights" else k): v for k, v in hf.state_dict().items()}
    )
    x = torch.randn(2, 800)
    assert torch.equal(model(x).logits, hf(x).logits)
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        loaded = MixedHead.from_pretrained(tmp, key_mapping={"^layer_weights": "layer_sum.layer_weights"}).eval()
        assert torch.equal(loaded(x).logits, hf(x).logits)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        back = Head.from_pretrained(tmp, key_mapping={r"^layer_sum\.layer_weights": "layer_weights"}).eval()
        assert torch.equal(back(x).logits, hf(x).logits)
    with tempfile.TemporaryDirectory() as tmp:
        hf.wav2vec2.save_pretrained(tmp)  # a base checkpoint: no layer_weights
        started, info = MixedHead.from_pretrained(tmp, output_loading_info=True)
        if "layer_sum.layer_weights" in info["missing_keys"]:
            started.layer_sum.reset_parameters()
        assert torch.equal(started.layer_sum.layer_weights, torch.full((3,), 1 / 3))
