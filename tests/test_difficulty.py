"""The difficulty estimator on hand-written prompts: clear cases order easy < hard, every
documented feature is present, scores stay in [0, 1]; the cascade confidence helper."""

from __future__ import annotations

import pytest

from switchyard.routing.difficulty import (
    DifficultyEstimate,
    confidence,
    estimate_difficulty,
    features,
    user_text,
)

FEATURES = {"tokens", "words", "length", "math", "numbers", "code", "reasoning", "instructions",
            "questions", "chitchat", "simple_fact"}
EASY = ["Hi!", "Thanks!", "What is the capital of Spain?", "Who wrote Macbeth?",
        "Translate 'dog' into French."]
HARD = ["Solve for x: 5x - 3 = 2x + 9, and show each step.",
        "Write a Python function that merges two sorted lists, and explain its time complexity.",
        "Explain why the seasons change, and compare the effect of axial tilt with the distance to the Sun.",
        "A tank holds 240 liters and leaks 3 liters per minute while a tap adds 5 liters per minute. "
        "How long until it is full if it starts half empty?"]


def score(text: str) -> DifficultyEstimate:
    return estimate_difficulty(text, list(range(len(text.split()) + 30)))


def test_every_easy_prompt_scores_below_every_hard_one() -> None:
    easy, hard = [score(p).score for p in EASY], [score(p).score for p in HARD]
    assert max(easy) < min(hard)
    assert max(easy) < 0.3 and min(hard) > 0.6


@pytest.mark.parametrize("text", EASY + HARD + ["", "   ", "x" * 5000, "1 + 1 = ?" * 300])
def test_score_in_unit_interval_and_features_present(text: str) -> None:
    est = score(text)
    assert 0.0 <= est.score <= 1.0
    assert set(est.features) == FEATURES
    assert all(isinstance(v, float) for v in est.features.values())


def test_features_pick_up_their_cues() -> None:
    f = features("Write a Python function to compute 12 * 7. Then explain why it works.", [1] * 40)
    assert f["code"] > 0 and f["math"] > 0 and f["reasoning"] > 0
    assert f["numbers"] == 2.0 and f["instructions"] >= 2.0 and f["tokens"] == 40.0
    g = features("Hello!", [1, 2])
    assert g["chitchat"] == 1.0 and g["code"] == 0 and g["math"] == 0 and g["words"] == 1.0
    assert features("What is the capital of Peru?", [1])["simple_fact"] == 1.0
    assert features("What is 17 * 23?", [1])["simple_fact"] == 0.0  # arithmetic is no lookup


def test_more_parts_and_length_make_a_prompt_harder() -> None:
    one = score("Write a poem about the sea.").score
    many = score("Write a poem about the sea. Then list five rhymes in it, summarize it in one "
                 "sentence, translate that sentence into German and explain the hardest word.").score
    assert many > one


def test_rendered_chat_is_scored_on_the_last_user_turn() -> None:
    chat = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM<|im_end|>\n"
            "<|im_start|>user\nSolve 3x + 1 = 10<|im_end|>\n<|im_start|>assistant\nx = 3<|im_end|>\n"
            "<|im_start|>user\nThanks!<|im_end|>\n<|im_start|>assistant\n")
    assert user_text(chat) == "Thanks!"
    assert score(chat).features["chitchat"] == 1.0
    assert abs(score(chat).score - score("Thanks!").score) < 1e-12 or \
        score(chat).features["tokens"] != score("Thanks!").features["tokens"]


def test_confidence_is_the_mean_top_probability_of_the_first_k_tokens() -> None:
    assert confidence([0.9, 0.7, 0.5, 0.1], k=2) == pytest.approx(0.8)
    assert confidence([0.9, 0.7, 0.5], k=8) == pytest.approx(0.7)
    assert confidence([]) == 0.0
    assert 0.0 <= confidence([1.0, 1.0]) <= 1.0
