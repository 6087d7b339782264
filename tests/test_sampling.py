"""The sampler: argument checks, per-image determinism, batch independence, prefix completion, filtering."""

import pytest
import torch

import aim_rt
from aim_rt import SamplingError, SamplingSettings
from aim_rt.decoding import sample_tokens
from aim_rt.sampling import categorical, filter_logits, image_seed, uniforms
from conftest import GOLDEN


@pytest.fixture(scope="module")
def model():
    return aim_rt.load_model(GOLDEN / "stage2_group.safetensors")  # 10 classes, 16 tokens, vocab 512


SETTINGS = SamplingSettings(cfg_scale=3.0, top_k=100, top_p=0.9)


@pytest.mark.parametrize("kwargs, match", [
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_k": -1}, "top_k"), ({"top_k": 2.5}, "top_k"),
    ({"temperature": 0.0}, "temperature"), ({"temperature": -1.0}, "temperature"),
    ({"cfg_scale": -0.5}, "cfg_scale"), ({"cfg_scale": float("nan")}, "cfg_scale"),
    ({"position_convention": "k+2"}, "position_convention"),
])
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(SamplingError, match=match):
        SamplingSettings(**kwargs)


def test_out_of_range_class_is_refused(model):
    with pytest.raises(SamplingError, match="class 10 is out of range"):
        sample_tokens(model, [1, 10], [0, 1], SETTINGS)
    with pytest.raises(SamplingError, match="one seed per image"):
        sample_tokens(model, [1, 2], [0], SETTINGS)


def test_same_seed_same_tokens_other_seed_other_tokens(model):
    a = sample_tokens(model, [3, 3], [11, 12], SETTINGS)
    b = sample_tokens(model, [3, 3], [11, 12], SETTINGS)
    assert torch.equal(a, b)
    assert not torch.equal(a[0], a[1])
    assert a.shape == (2, 16) and a.min() >= 0 and a.max() < 512


def test_tokens_do_not_depend_on_batch_or_neighbours(model):
    classes, seeds = [0, 4, 9, 2, 7], [5, 6, 7, 8, 9]
    together = sample_tokens(model, classes, seeds, SETTINGS)
    for i in range(5):
        alone = sample_tokens(model, [classes[i]], [seeds[i]], SETTINGS)
        assert torch.equal(alone[0], together[i])
    shuffled = sample_tokens(model, classes[::-1], seeds[::-1], SETTINGS)
    assert torch.equal(shuffled.flip(0), together)


def test_prefix_completion_reproduces_the_rest(model):
    full = sample_tokens(model, [1, 8], [3, 4], SETTINGS)
    completed = sample_tokens(model, [1, 8], [3, 4], SETTINGS, prefix=full[:, :6])
    assert torch.equal(completed, full)
    other = full[:, :6].clone()
    other[:, 0] = (other[:, 0] + 1) % 512
    changed = sample_tokens(model, [1, 8], [3, 4], SETTINGS, prefix=other)
    assert torch.equal(changed[:, :6], other) and not torch.equal(changed[:, 6:], full[:, 6:])
    with pytest.raises(SamplingError, match="prefix"):
        sample_tokens(model, [1], [3], SETTINGS, prefix=torch.zeros(1, 16, dtype=torch.long))


def test_greedy_limit_follows_the_argmax_of_the_mixed_logits(model):
    """top_k = 1 makes sampling deterministic: tokens must be the argmax of the sampler's CFG logits."""
    settings = SamplingSettings(cfg_scale=3.0, top_k=1, top_p=1.0)
    tokens = sample_tokens(model, [2, 5], [0, 1], settings)
    logits = aim_rt.sampler_logits(model, torch.tensor([2, 5]), tokens, 3.0)
    assert torch.equal(logits.argmax(-1), tokens)


def test_training_position_convention_changes_samples(model):
    a = sample_tokens(model, [2], [0], SamplingSettings(top_k=1))
    b = sample_tokens(model, [2], [0], SamplingSettings(top_k=1, position_convention="training"))
    assert not torch.equal(a, b)


def test_filter_logits_matches_the_official_rules():
    logits = torch.tensor([[2.0, 1.0, 3.0, 0.0, 3.0, -1.0]])
    kept = torch.isfinite(filter_logits(logits, top_k=2, top_p=1.0))
    assert kept.tolist() == [[False, False, True, False, True, False]]  # ties at the k-th value are kept
    probs = torch.softmax(logits, -1)[0]
    kept = torch.isfinite(filter_logits(logits, top_k=0, top_p=0.5))[0]
    order = probs.argsort(descending=True)
    # the nucleus: smallest set of top tokens whose mass reaches top_p (the official <= 1 - p rule)
    mass = probs[order].cumsum(0)
    n = int((mass < 0.5).sum()) + 1
    assert set(order[:n].tolist()) == set(kept.nonzero().flatten().tolist())
    assert torch.isfinite(filter_logits(logits, 0, 1e-6)).sum() == 1  # the top token always survives


def test_categorical_draw_follows_the_distribution():
    logits = torch.log(torch.tensor([0.1, 0.0, 0.6, 0.3]))
    seeds = torch.arange(20000)
    u = uniforms(seeds, step=7)
    assert 0 <= u.min() and u.max() < 1
    draws = categorical(logits.expand(20000, 4), u)
    freq = torch.bincount(draws, minlength=4).float() / 20000
    assert freq[1] == 0
    assert torch.allclose(freq, torch.tensor([0.1, 0.0, 0.6, 0.3]), atol=0.015)


def test_uniforms_differ_across_steps_and_seeds():
    seeds = torch.tensor([0, 1, 2**40, 2**62 + 5])
    a, b = uniforms(seeds, 0), uniforms(seeds, 1)
    assert len(set(a.tolist())) == 4 and not torch.equal(a, b)
    assert image_seed(0, 3, 0) != image_seed(0, 3, 1) != image_seed(1, 3, 1)
    with pytest.raises(SamplingError):
        image_seed(-1, 0, 0)


def test_temperature_is_applied(model):
    hot = sample_tokens(model, [4] * 4, [0, 1, 2, 3], SamplingSettings(cfg_scale=3.0, top_k=0, top_p=1.0, temperature=5.0))
    cold = sample_tokens(model, [4] * 4, [0, 1, 2, 3], SamplingSettings(cfg_scale=3.0, top_k=0, top_p=1.0, temperature=0.05))
    greedy = sample_tokens(model, [4] * 4, [0, 1, 2, 3], SamplingSettings(cfg_scale=3.0, top_k=1, top_p=1.0))
    assert torch.equal(cold, greedy) and not torch.equal(hot, greedy)
