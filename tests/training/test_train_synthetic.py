"""SyntheticActivations: planted dictionary, heavy-tailed frequencies, resumable stream."""
import pytest
import torch

from saefast.data.synthetic import SyntheticActivations


def test_rows_are_planted_combinations_with_zipf_frequencies():
    src = SyntheticActivations(16, 40, 512, mean_active=3.0, zipf_exponent=1.0, noise_std=0.0, seed=3)
    assert src.d_in == 16 and src.true_features.shape == (40, 16)
    torch.testing.assert_close(src.true_features.norm(dim=1), torch.ones(40))
    probs = src.feature_probs
    assert probs.sum().item() == pytest.approx(3.0, rel=1e-5)
    assert torch.all(probs[:-1] >= probs[1:]) and probs[0] / probs[-1] > 20, "frequencies must be heavy tailed"
    x, codes = src.sample(20000)
    torch.testing.assert_close(x, codes @ src.true_features)  # noise_std=0: exactly the planted mix
    fired = codes > 0
    assert torch.all(codes[fired] >= 0.5) and torch.all(codes[fired] <= 1.5)
    torch.testing.assert_close(fired.float().mean(0), probs, atol=0.02, rtol=0.1)


def test_stream_resumes_exactly_and_streams_differ():
    a = SyntheticActivations(8, 20, 32, seed=1)
    first = [next(a) for _ in range(3)]
    state = a.state_dict()
    rest = [next(a) for _ in range(2)]
    b = SyntheticActivations(8, 20, 32, seed=1)
    b.load_state_dict(state)
    for want, got in zip(rest, [next(b) for _ in range(2)]):
        assert torch.equal(want, got)
    other = SyntheticActivations(8, 20, 32, seed=1, stream=1)
    assert torch.equal(other.true_features, a.true_features), "streams share the dictionary"
    assert not torch.equal(next(other), first[0])
    bounded = SyntheticActivations(8, 20, 4, n_batches=2)
    assert len(list(bounded)) == 2


@pytest.mark.parametrize("kwargs,match", [({"d_in": 0}, "d_in"), ({"mean_active": 50.0}, "mean_active"),
                                          ({"noise_std": -1.0}, "noise_std"), ({"zipf_exponent": -0.5}, "zipf")])
def test_bad_arguments(kwargs, match):
    args = {"d_in": 8, "n_features": 20, "batch_size": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        SyntheticActivations(**args)
