import numpy as np

from exo_core.node.sampling import SamplingParams, sample


def test_greedy_is_argmax():
    logits = np.array([0.1, 3.0, 2.0, -1.0], dtype=np.float32)
    assert sample(logits, SamplingParams()).token == 1


def test_seed_and_step_fix_the_draw():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=1000).astype(np.float32)
    p = SamplingParams(temperature=1.0, seed=42)
    draws = [sample(logits, p, step=s).token for s in range(20)]
    assert draws == [sample(logits, p, step=s).token for s in range(20)]
    assert len(set(draws)) > 1  # different steps draw differently


def test_top_k_and_top_p_limit_the_choices():
    logits = np.array([5.0, 4.9, 0.0, -1.0, -2.0], dtype=np.float32)
    for step in range(50):
        assert sample(logits, SamplingParams(temperature=1.0, top_k=2, seed=1), step=step).token in (0, 1)
        assert sample(logits, SamplingParams(temperature=1.0, top_p=0.5, seed=1), step=step).token == 0


def test_penalties_push_away_from_generated_tokens():
    logits = np.array([2.0, 1.9, 0.0], dtype=np.float32)
    p = SamplingParams(presence_penalty=0.5)
    assert sample(logits, p, generated=[0]).token == 1
    assert sample(logits, SamplingParams(frequency_penalty=0.05), generated=[0, 0, 0]).token == 1


def test_logprobs_and_top_alternatives():
    logits = np.log(np.array([0.5, 0.3, 0.2], dtype=np.float32))
    s = sample(logits, SamplingParams(top_logprobs=2))
    assert s.token == 0
    assert abs(s.logprob - np.log(0.5)) < 1e-5
    assert [t for t, _ in s.top] == [0, 1]
    assert sample(logits, SamplingParams(top_logprobs=0)).top == ()
