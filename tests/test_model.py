import pytest
import torch

from wordlm.config import ModelConfig
from wordlm.errors import ConfigError
from wordlm.model import LSTMLanguageModel, num_parameters


def make(**kw):
    return LSTMLanguageModel(50, ModelConfig(**{"embedding_size": 16, "hidden_size": 16, "num_layers": 2, **kw}))


def test_output_shapes_and_state():
    m = make()
    ids = torch.randint(0, 50, (7, 3))  # (T, B)
    logits, (h, c) = m(ids)
    assert logits.shape == (7, 3, 50)
    assert h.shape == c.shape == (2, 3, 16)
    nll, _ = m.nll(ids, ids)
    assert nll.shape == (7, 3) and nll.dtype == torch.float32


def test_carrying_the_state_equals_reading_at_once():
    torch.manual_seed(0)
    m = make().eval()
    ids = torch.randint(0, 50, (10, 2))
    full, _ = m(ids, m.init_state(2))
    a, state = m(ids[:4], m.init_state(2))
    b, _ = m(ids[4:], state)
    torch.testing.assert_close(torch.cat([a, b]), full)


def test_tied_weights_share_one_matrix():
    tied, untied = make(tie_weights=True), make()
    assert tied.decoder.weight is tied.embedding.weight
    assert num_parameters(untied) - num_parameters(tied) == 50 * 16


def test_tie_weights_error_names_the_sizes():
    with pytest.raises(ConfigError, match=r"embedding_size == model.hidden_size \(got 8 and 16\)"):
        make(embedding_size=8, tie_weights=True)


def test_init_state_follows_the_weights():
    m = make().double()
    h, c = m.init_state(5)
    assert h.dtype == torch.float64 and h.shape == (2, 5, 16) and not h.any()


def test_initialisation_range():
    m = make(init_range=0.05)
    assert max(p.abs().max().item() for p in m.parameters()) <= 0.05
    assert not m.decoder.bias.any()


@pytest.mark.parametrize("layered", [False, True], ids=["fused-lstm", "per-layer-lstm"])
def test_awd_initialisation_keeps_the_lstms_own_range(layered):
    # AWD-LSTM: embedding (and tied decoder) in +-init_range, the LSTM in nn.LSTM's +-1/sqrt(hidden_size).
    kw = dict(hidden_size=400, init_range=0.1, lstm_init="pytorch", weight_drop=0.5 if layered else 0.0)
    m = make(**kw)
    lstm = list((m.layers if layered else m.lstm).parameters())
    bound = 1 / 400 ** 0.5
    assert max(p.abs().max().item() for p in lstm) <= bound
    assert min(p.abs().max().item() for p in lstm) > 0.9 * bound  # spread over the whole range
    assert 0.09 < m.embedding.weight.abs().max().item() <= 0.1
    zaremba = make(**{**kw, "lstm_init": "uniform"})
    assert max(p.abs().max().item() for p in (zaremba.layers if layered else zaremba.lstm).parameters()) > 0.09


def test_awd_lstm_shape_has_the_papers_parameter_count():
    # Merity et al. 2017 on PTB: 400 -> 1150 -> 1150 -> 400 LSTMs, a tied 400-d embedding, "24M parameters".
    m = LSTMLanguageModel(10000, ModelConfig(embedding_size=400, hidden_size=1150, last_hidden_size=400,
                                             num_layers=3, tie_weights=True))
    assert [(layer.input_size, layer.hidden_size) for layer in m.layers] == [(400, 1150), (1150, 1150), (1150, 400)]
    assert num_parameters(m) == 10000 * 400 + 4 * 1150 * (400 + 1150 + 2) + 4 * 1150 * (1150 + 1150 + 2) \
        + 4 * 400 * (1150 + 400 + 2) + 10000 == 24_221_600


def test_a_narrower_last_layer_carries_its_state_in_the_first_columns():
    torch.manual_seed(0)
    m = make(num_layers=3, embedding_size=8, last_hidden_size=8, tie_weights=True).eval()
    ids = torch.randint(0, 50, (10, 2))
    h0, c0 = m.init_state(2)
    assert h0.shape == c0.shape == (3, 2, 16)
    full, (h, c) = m(ids, (h0, c0))
    assert full.shape == (10, 2, 50)
    assert not h[2, :, 8:].any() and not c[2, :, 8:].any() and h[2, :, :8].any() and h[1, :, 8:].any()
    a, state = m(ids[:4], (h0, c0))
    b, _ = m(ids[4:], state)
    torch.testing.assert_close(torch.cat([a, b]), full)


def test_adaptive_softmax_gives_exact_log_probabilities():
    torch.manual_seed(0)
    m = LSTMLanguageModel(300, ModelConfig(embedding_size=16, hidden_size=16, num_layers=1, decoder="adaptive",
                                           adaptive_cutoffs=[20, 100, 5000])).eval()
    assert m.adaptive is not None and m.adaptive.cutoffs == [20, 100, 300]  # 5000 >= vocabulary: dropped
    ids, targets = torch.randint(0, 300, (6, 3)), torch.randint(0, 300, (6, 3))
    logits, _ = m(ids)
    torch.testing.assert_close(logits.exp().sum(-1), torch.ones(6, 3))  # a proper distribution
    nll, _ = m.nll(ids, targets)
    torch.testing.assert_close(nll, -logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1))


def test_adaptive_config_checks():
    from wordlm.config import Config

    with pytest.raises(ConfigError) as e:
        Config.from_dict({"model": {"decoder": "adaptive", "tie_weights": True, "adaptive_cutoffs": [10, 5]}})
    assert len(e.value.problems) == 2 and "increasing positive integers" in str(e.value)
    with pytest.raises(ConfigError, match="model.adaptive_cutoffs must be a list of integers"):
        Config.from_dict({"model": {"adaptive_cutoffs": "2000"}})
