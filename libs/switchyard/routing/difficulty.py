"""How hard a prompt looks, from the prompt alone, for routing between a small and a large model.

Pure functions, no model: the router calls :func:`estimate_difficulty` per request and sends
scores below its threshold to the small model. A cascade instead answers with the small model
first and escalates when :func:`confidence` of its first tokens is low.

Features (``DifficultyEstimate.features``; all floats, the text ones on the user's own text
— chat markup such as ``<|im_start|>`` is stripped and only the last user turn is read):

    tokens          prompt tokens as the model sees them (``len(prompt_token_ids)``)
    words           words in the user text
    length          log-scaled length in [0, 1]: log(1 + words) / log(1 + 200), capped at 1
    math            math cues in [0, 1]: math words (solve, calculate, equation, percent, prime,
                    probability, ...) and arithmetic between numbers ("12 * 7", "2x + 4 = 10")
    numbers         count of numbers in the text (capped at 5 in the score)
    code            code cues in [0, 1]: languages, "function", "bug", "regex", code symbols
                    (``def``, ``{}``, ``;``, backticks)
    reasoning       reasoning cues in [0, 1]: why, explain, compare, prove, step by step,
                    trade-offs, what would happen, plan, analyze
    instructions    imperative sentences and list items (each asks for one more thing)
    questions       question marks
    chitchat        1 when the text is a greeting, thanks or small talk of ≤ 8 words
    simple_fact     1 for a short ("What is the capital of ...", "Who wrote ...") lookup

The score is a logistic function of a weighted sum of these (weights in ``WEIGHTS``, set by
hand from what a small model is known to get wrong — arithmetic, code, multi-step reasoning,
long multi-part instructions — not fitted to the benchmark's labels), so it lies in (0, 1),
higher = harder. bench/model_routing.py measures how well it orders prompts and what routing
by it saves; see docs/benchmarks.md ("Model routing by difficulty").
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Sequence

# weight per feature in the logit; the bias puts a bare one-line question near 0.3
WEIGHTS: dict[str, float] = {
    "length": 2.0,
    "math": 2.2,
    "numbers": 0.25,  # per number, at most 5
    "code": 2.2,
    "reasoning": 1.8,
    "instructions": 0.35,  # per instruction beyond the first, at most 5
    "questions": 0.2,  # per question mark beyond the first, at most 3
    "chitchat": -2.5,
    "simple_fact": -1.5,
}
BIAS = -1.6

_MATH_WORDS = re.compile(
    r"\b(solve|calculate|compute|equation|integral|derivative|prime|factor(?:ial|ize)?|percent(?:age)?|"
    r"probability|average|mean|median|sum of|product of|divided|multipl(?:y|ied)|remainder|"
    r"square root|how many|how much|ratio|fraction|interest|speed|distance|minutes?|hours?|"
    r"digits?|sequence|geometry|triangle|area|volume|algebra)\b", re.I)
_ARITH = re.compile(r"\d\s*[-+*/^×÷=<>]\s*[\d(a-z]|[a-z]\s*[\^=]\s*\d|\d+\s*%|\bx\s*[+\-=]", re.I)
_CODE_WORDS = re.compile(
    r"\b(python|javascript|typescript|java|rust|golang|c\+\+|sql|bash|shell|regex|regular expression|"
    r"function|class|method|algorithm|recursion|recursive|compile[rd]?|bug|debug|stack trace|exception|"
    r"api|json|yaml|html|css|git|docker|kubernetes|unit test|big-o|complexity|linked list|"
    r"binary search|hash ?map|array|implement|refactor|code|script|query)\b", re.I)
_CODE_SYMBOLS = re.compile(r"```|`[^`]+`|\bdef |\breturn\b|[{};]|=>|->|\w+\(\)|\w+\.\w+\(")
_REASONING = re.compile(
    r"\b(why|explain|compare|contrast|prove|proof|reason(?:ing)?|step[- ]by[- ]step|analy[sz]e|"
    r"evaluate|trade-?offs?|pros and cons|advantages|disadvantages|difference between|what would happen|"
    r"what if|derive|justify|plan|design|strategy|implications?|argue|critique|predict|estimate|"
    r"optimi[sz]e|puzzle|riddle|logic(?:al)?|deduce|infer|if .+ then)\b", re.I)
_CHITCHAT = re.compile(
    r"^\W*(hi|hello|hey|good (morning|afternoon|evening|night)|thanks?( you)?|thank you|bye|goodbye|"
    r"how are you|what'?s up|nice to meet you|who are you|what is your name|ok(ay)?|cool|great)\b", re.I)
_SIMPLE_FACT = re.compile(
    r"^\W*(what|who|which|where|when) (is|was|are|were|did|wrote|painted|invented|discovered)\b"
    r"|^\W*(name|list|give me) (a|one|two|three|five|\d+)\b|^\W*(translate|spell|define)\b", re.I)
_IMPERATIVE = re.compile(
    r"(?:^|[.!?;:\n]\s*|\band )(?:then |also |please |finally )?(write|list|give|explain|describe|compare|summari[sz]e|"
    r"translate|calculate|solve|show|make|create|find|suggest|include|add|use|keep|format|return|"
    r"implement|prove|name|rewrite|convert|sort|count|tell|plan|design|estimate)\b", re.I)
_LIST_ITEM = re.compile(r"(?m)^\s*(?:[-*•]|\d+[.)])\s+")
_NUMBER = re.compile(r"(?<![\w.])\d+(?:[.,]\d+)?(?![\w])")
_CHAT_TURN = re.compile(r"<\|im_start\|>(\w+)\n(.*?)(?:<\|im_end\|>|$)", re.S)


@dataclass(frozen=True)
class DifficultyEstimate:
    """``score`` in [0, 1], higher = harder; ``features`` as documented in the module."""

    score: float
    features: dict[str, float] = field(default_factory=dict)


def user_text(prompt_text: str) -> str:
    """The last user turn of a ChatML-rendered prompt, or the text itself when it has no markup
    (the system prompt is the same for every request and says nothing about difficulty)."""
    turns = [(role, body) for role, body in _CHAT_TURN.findall(prompt_text) if role == "user"]
    return turns[-1][1].strip() if turns else prompt_text.strip()


def _cue(count: int) -> float:
    """0 for no cue, 0.6 for one, saturating towards 1: the first cue says the most."""
    return 0.0 if count <= 0 else min(1.0, 0.6 + 0.2 * (count - 1))


def features(prompt_text: str, prompt_token_ids: Sequence[int]) -> dict[str, float]:
    """The features of the module docstring."""
    text = user_text(prompt_text)
    words = len(text.split())
    math_hits = len(_MATH_WORDS.findall(text)) + 2 * len(_ARITH.findall(text))
    code_hits = len(_CODE_WORDS.findall(text)) + len(_CODE_SYMBOLS.findall(text))
    imperatives = len(_IMPERATIVE.findall(text)) + len(_LIST_ITEM.findall(text))
    sentences = [s for s in re.split(r"[.!?\n]+", text) if s.strip()]
    return {
        "tokens": float(len(prompt_token_ids)),
        "words": float(words),
        "length": min(1.0, math.log1p(words) / math.log1p(200)),
        "math": _cue(math_hits),
        "numbers": float(len(_NUMBER.findall(text))),
        "code": _cue(code_hits),
        "reasoning": _cue(len(_REASONING.findall(text))),
        "instructions": float(max(imperatives, 1 if sentences else 0)),
        "questions": float(text.count("?")),
        "chitchat": 1.0 if words <= 8 and _CHITCHAT.search(text) else 0.0,
        "simple_fact": 1.0 if words <= 14 and _SIMPLE_FACT.search(text) and not _ARITH.search(text) else 0.0,
    }


def estimate_difficulty(prompt_text: str, prompt_token_ids: list[int]) -> DifficultyEstimate:
    """Score a request: ``prompt_text`` is the user text or the rendered chat prompt (the last
    user turn is read), ``prompt_token_ids`` the tokens the model would be fed."""
    f = features(prompt_text, prompt_token_ids)
    z = BIAS
    z += WEIGHTS["length"] * f["length"]
    z += WEIGHTS["math"] * f["math"] + WEIGHTS["numbers"] * min(f["numbers"], 5.0)
    z += WEIGHTS["code"] * f["code"] + WEIGHTS["reasoning"] * f["reasoning"]
    z += WEIGHTS["instructions"] * min(max(f["instructions"] - 1.0, 0.0), 5.0)
    z += WEIGHTS["questions"] * min(max(f["questions"] - 1.0, 0.0), 3.0)
    z += WEIGHTS["chitchat"] * f["chitchat"] + WEIGHTS["simple_fact"] * f["simple_fact"]
    return DifficultyEstimate(score=1.0 / (1.0 + math.exp(-z)), features=f)


def confidence(top_token_probs: Sequence[float], k: int = 8) -> float:
    """Cascade confidence of a small model's answer: the mean probability of its chosen (top)
    token over its first ``k`` generated tokens, in [0, 1]; 0 when nothing was generated.
    A small model that is unsure early tends to diverge from the large one later."""
    probs = list(top_token_probs)[:k]
    if not probs:
        return 0.0
    return float(min(1.0, max(0.0, sum(probs) / len(probs))))
