import pytest
import torch

from wordlm.errors import UsageError
from wordlm.generate import apply_temperature, check_sampling, sample, top_k_filter, top_p_filter

LOGITS = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))


def test_temperature_sharpens_and_flattens():
    p = LOGITS.softmax(-1)
    cold = apply_temperature(LOGITS, 0.5).softmax(-1)
    hot = apply_temperature(LOGITS, 2.0).softmax(-1)
    assert cold[0] > p[0] > hot[0]
    torch.testing.assert_close(apply_temperature(LOGITS, 1.0), LOGITS)


def test_top_k_keeps_the_k_best():
    out = top_k_filter(LOGITS, 2)
    assert torch.isfinite(out).tolist() == [True, True, False, False]
    assert torch.equal(top_k_filter(LOGITS, 0), LOGITS)


@pytest.mark.parametrize("p, kept", [(0.5, 1), (0.51, 2), (0.8, 2), (0.81, 3), (0.96, 4), (1.0, 4)])
def test_top_p_keeps_the_smallest_set_reaching_p(p, kept):
    out = top_p_filter(LOGITS, p)
    assert int(torch.isfinite(out).sum()) == kept
    assert torch.isfinite(out[:kept]).all()  # the kept ones are the most likely


def test_top_p_respects_the_original_order():
    shuffled = LOGITS[[2, 0, 3, 1]]
    assert torch.isfinite(top_p_filter(shuffled, 0.8)).tolist() == [False, True, False, True]


def test_sample_frequencies_and_seed():
    g = torch.Generator().manual_seed(0)
    draws = sample(LOGITS.expand(20000, 4), generator=g)
    freq = torch.bincount(draws, minlength=4).float() / 20000
    torch.testing.assert_close(freq, LOGITS.exp(), atol=0.015, rtol=0)
    a = sample(LOGITS.expand(50, 4), generator=torch.Generator().manual_seed(1))
    b = sample(LOGITS.expand(50, 4), generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert set(sample(LOGITS.expand(200, 4), top_k=1).tolist()) == {0}


def test_bad_sampling_arguments():
    # named as the Python API's keywords; as the command line's options inside errors.options (as the CLI runs it)
    from wordlm.errors import options

    for args, needle in (((0.0, 0, 1.0), "temperature must be > 0, got 0.0 (use top_k=1 for greedy decoding)"),
                         ((1.0, -1, 1.0), "top_k must be >= 0"), ((1.0, 0, 0.0), "top_p must be in (0, 1]"),
                         ((1.0, 0, 1.5), "top_p must be in (0, 1]")):
        with pytest.raises(UsageError) as e:
            check_sampling(*args)
        assert str(e.value).startswith(needle)
        with options(temperature="--temperature", top_k="--top-k", top_p="--top-p"), pytest.raises(UsageError) as e:
            check_sampling(*args)
        assert str(e.value).startswith("--" + needle.replace("top_k=1", "--top-k 1").replace("_", "-"))
        with pytest.raises(UsageError) as e:  # the names are put back when the block ends
            check_sampling(*args)
        assert str(e.value).startswith(needle)
    check_sampling(0.7, 40, 0.9)  # valid arguments pass
