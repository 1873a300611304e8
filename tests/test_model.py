r"""The small GPT: shapes, the loss at initialization, weight tying, causality, checks, parameter groups."""

import math

import pytest
import torch

from sophia import SophiaG
from sophia.experiments.model import GPT, GPTConfig

TINY = dict(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return GPT(GPTConfig(**TINY))


def test_forward_and_backward_shapes(model):
    idx = torch.randint(0, 64, (3, 10))
    targets = torch.randint(0, 64, (3, 10))
    logits, loss = model(idx, targets)
    assert logits.shape == (3, 10, 64)
    assert loss.shape == ()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.shape == p.shape, name
        assert torch.isfinite(p.grad).all(), name


def test_without_targets_there_is_no_loss(model):
    logits, loss = model(torch.randint(0, 64, (2, 16)))
    assert logits.shape == (2, 16, 64) and loss is None


def test_loss_at_initialization_is_log_vocab():
    torch.manual_seed(0)
    config = GPTConfig()
    model = GPT(config)
    idx = torch.randint(0, config.vocab_size, (8, config.block_size))
    targets = torch.randint(0, config.vocab_size, (8, config.block_size))
    with torch.no_grad():
        _, loss = model(idx, targets)
    assert loss.item() == pytest.approx(math.log(config.vocab_size), abs=0.1)


def test_head_is_tied_to_the_token_embedding(model):
    assert model.lm_head.weight is model.transformer.wte.weight
    names = [name for name, _ in model.named_parameters()]
    assert "lm_head.weight" not in names
    assert model.num_params() == sum(p.numel() for p in model.parameters())
    idx = torch.randint(0, 64, (2, 8))
    _, loss = model(idx, idx)
    loss.backward()
    assert model.transformer.wte.weight.grad is model.lm_head.weight.grad


def test_changing_a_future_token_leaves_earlier_logits_alone(model):
    model.eval()
    idx = torch.randint(0, 64, (2, 16))
    changed = idx.clone()
    changed[:, 9] = (changed[:, 9] + 1) % 64
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(changed)
    assert torch.equal(a[:, :9], b[:, :9])
    assert not torch.allclose(a[:, 9:], b[:, 9:])


def test_default_config_is_about_a_million_parameters():
    n = GPT(GPTConfig()).num_params()
    assert 0.5e6 < n < 2e6
    assert 8e6 < GPT(GPTConfig.gpu()).num_params() < 30e6


@pytest.mark.parametrize(
    "changes, match",
    [
        (
            dict(n_embd=100, n_head=3),
            r"n_embd must be divisible by n_head, got n_embd=100 and n_head=3",
        ),
        (dict(n_layer=0), r"GPTConfig.n_layer must be a positive int, got 0"),
        (dict(block_size=-4), r"GPTConfig.block_size must be a positive int, got -4"),
        (dict(vocab_size=2.5), r"GPTConfig.vocab_size must be a positive int, got 2.5"),
        (dict(n_head=True), r"GPTConfig.n_head must be a positive int, got True"),
        (dict(dropout=1.0), r"GPTConfig.dropout must be a number in \[0, 1\), got 1.0"),
    ],
)
def test_config_errors_name_the_field_and_value(changes, match):
    with pytest.raises(ValueError, match=match):
        GPTConfig(**{**TINY, **changes})


def test_replace_checks_again():
    with pytest.raises(ValueError, match="n_embd must be divisible by n_head"):
        GPTConfig().replace(n_head=3)
    with pytest.raises(ValueError, match="no field"):
        GPTConfig().replace(n_heads=3)
    assert GPTConfig().replace(n_layer=2).n_layer == 2


def test_sequence_longer_than_block_size_is_refused(model):
    with pytest.raises(
        ValueError, match=r"sequence length 17 is longer than block_size=16"
    ):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_bad_index_tensors_are_refused(model):
    with pytest.raises(ValueError, match=r"\(batch, time\) tensor"):
        model(torch.zeros(16, dtype=torch.long))
    with pytest.raises(ValueError, match="integer token ids"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="targets must have the shape"):
        model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 5, dtype=torch.long))


def test_param_groups_decay_the_linear_weights_only(model):
    decay, no_decay = model.param_groups(0.2)
    assert decay["weight_decay"] == 0.2 and no_decay["weight_decay"] == 0.0
    ids = [id(p) for g in (decay, no_decay) for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    # The authors' rule: the weights of the attention and MLP linear layers, by name;
    # not the embeddings (nor the head tied to one), LayerNorms or biases.
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = sorted(names[id(p)] for p in decay["params"])
    per_block = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    expected = [
        f"transformer.h.{i}.{layer}.weight"
        for i in range(model.config.n_layer)
        for layer in per_block
    ]
    assert decayed == sorted(expected)
    assert not any(p is model.transformer.wte.weight for p in decay["params"])
    assert any(p is model.lm_head.weight for p in no_decay["params"])
    # Any optimizer takes them.
    torch.optim.AdamW(model.param_groups(0.1), lr=1e-3)
    SophiaG(model.param_groups(0.1), lr=1e-3)
    with pytest.raises(
        ValueError, match="weight_decay must be a finite number >= 0, got -1"
    ):
        model.param_groups(-1)


def test_default_model_decays_the_authors_count():
    # 4 blocks x (3C^2 + C^2 + 4C^2 + 4C^2) with C = 128; decaying every 2-D tensor,
    # as before, added the token and position embeddings: 827,392.
    model = GPT(GPTConfig())
    decay, _ = model.param_groups(0.1)
    assert sum(p.numel() for p in decay["params"]) == 786_432
    assert len(decay["params"]) == 16
    assert sum(p.numel() for p in model.parameters() if p.dim() >= 2) == 827_392
