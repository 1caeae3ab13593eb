"""A fitted affine "bridge" that lets a truncated SmolLM2 reach the lm_head's basis.

Cutting the model to its first N decoder layers leaves a residual stream h_N that the final
norm and lm_head cannot read (only the last layers rotate it into their basis): the plain
truncation is worse than a uniform guess. The bridge is a "tuned lens": one affine map
W·h_N + b, hidden × hidden, inserted before the unchanged final norm, fitted by closed-form ridge
regression so that it predicts the *full* model's last hidden state h_L (normalized, as the final
RMSNorm only sees its direction) at the same position.

No hub data: the fit uses only text the full int4 model processes itself — the chat-rendered
prompts of :data:`FIT_PROMPTS` (written here, disjoint from the evaluation sets under
bench/data and bench/int4_agreement.py) plus the full model's own greedy answers to them, and
continuations it samples (seeded) after a few plain-text openings. A probe graph of the full
model with extra ``hidden.{i}`` outputs (onnx_builder's ``hidden_outputs``) yields h_N and h_L
at every position of that text. Everything is deterministic for a given GGUF and
:data:`FIT_VERSION`; fitted bridges are cached as .npz files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from switchyard.model.config import LlamaConfig
from switchyard.model.quantize import BlockQuantized

log = logging.getLogger(__name__)

# Bump whenever the fit data or method changes (part of the cache key and the manifest).
FIT_VERSION = 1
RIDGE = 1e-5          # ridge strength, relative to the mean eigenvalue of the inputs' covariance
# (1e-3 and above cost top-1 agreement at N = 12..20 on a held-out split of the fit data: the
# residual stream has a few ~1000× larger dimensions that dominate the mean eigenvalue)
CHAT_MAX_NEW = 40     # greedy answer tokens per chat prompt
TEXT_MAX_NEW = 48     # sampled tokens per plain-text opening
TEXT_TEMPERATURE = 0.8
SEED = 0
BATCH = 32

_TOPICS = [
    "volcanoes", "the Roman Empire", "honey bees", "black holes", "the water cycle", "jazz music",
    "the printing press", "coral reefs", "electric cars", "the human heart", "chess",
    "the Great Wall of China", "penguins", "solar panels", "the Renaissance", "earthquakes",
    "bread baking", "the stock market", "vaccines", "the Amazon rainforest", "glaciers",
    "the Internet", "dinosaurs", "tea", "the Olympic Games", "rainbows", "octopuses",
    "the Moon landing", "recycling", "windmills", "the piano", "deserts", "sleep",
    "photography", "the French Revolution", "bicycles", "mushrooms", "lighthouses",
    "the immune system", "airplanes",
]
_TASKS = [
    "Tell me one interesting fact about {t}.",
    "Explain {t} to a ten-year-old in two sentences.",
    "Write a short poem about {t}.",
    "Why do people find {t} fascinating?",
    "Give me three keywords related to {t}.",
    "Summarize what you know about {t} in one sentence.",
    "What is a common misconception about {t}?",
]
_STANDALONE = [
    "Hey, what's up?", "Good evening!", "Can you help me with something?", "I'm bored.",
    "Tell me a riddle about clocks.", "What can you do?", "Thank you for your help.", "See you tomorrow!",
    "What is the capital of Spain?", "What is the capital of Norway?", "What is the capital of Egypt?",
    "What is the capital of Australia?", "What is the capital of Kenya?", "What is the capital of Peru?",
    "Who wrote Pride and Prejudice?", "Who discovered penicillin?", "Who invented the telephone?",
    "How many days are in a leap year?", "How many sides does a hexagon have?",
    "What is the tallest mountain in the world?", "What gas do plants absorb?",
    "What is the longest river in Africa?", "Which animal is the largest mammal?",
    "What is the currency of Japan?", "What language is spoken in Portugal?",
    "Translate 'good night' into German.", "Translate 'apple' into Italian.",
    "Translate 'friend' into Spanish.", "Give me an antonym for 'narrow'.",
    "Give me a synonym for 'fast'.", "Spell the word 'necessary' backwards.",
    "Put these words in alphabetical order: pear, apple, mango.", "Repeat after me: the sky is blue.",
    "Write the word 'garden' in capital letters.", "Convert 'Good Morning' to lowercase.",
    "What is 12 plus 30?", "What is 9 times 6?", "What is 144 divided by 12?", "What is 45 minus 17?",
    "Is 91 a prime number?", "What is half of 250?", "Solve for x: 2x + 6 = 14.",
    "A train travels 60 km in 45 minutes. What is its speed in km/h?",
    "If a shirt costs $20 and is 25% off, what is the price?",
    "Write a Python function that returns the maximum of a list.",
    "Write a Python function to check if a string is a palindrome.",
    "How do I reverse a list in JavaScript?", "What does the SQL keyword JOIN do?",
    "Explain what a hash map is.", "What is the difference between a set and a dict in Python?",
    "Write a bash command that counts the lines in a file.", "What is recursion?",
    "Explain the difference between weather and climate.", "Why is the ocean salty?",
    "How does a refrigerator keep food cold?", "What causes the seasons on Earth?",
    "Plan a three-day trip to Rome.", "Give me a recipe for pancakes.",
    "How can I improve my handwriting?", "What are some tips for a job interview?",
    "Write a haiku about autumn.", "Write a two-line story about a lost key.",
    "Describe a thunderstorm in one sentence.", "Suggest a name for a black cat.",
    "List four fruits that are yellow.", "Name three European rivers.",
    "What are the three states of matter?", "Compare cats and dogs as pets.",
    "If all bloops are razzies and all razzies are lazzies, are all bloops lazzies?",
    "Sarah is older than Tom, and Tom is older than Ann. Who is the youngest?",
    "What would happen if the Moon disappeared?", "Should I learn Python or Java first? Why?",
]
_OPENINGS = [
    "Once upon a time, in a small village by the sea,", "The history of mathematics begins",
    "In the morning, the market square was", "Scientists have long wondered why",
    "The recipe calls for two cups of flour and", "Dear hiring manager, I am writing to",
    "The most important rule of cooking is", "When the storm finally passed, the villagers",
    "def fibonacci(n):\n", "Chapter 1\n\nThe train was late again, and", "Photosynthesis is the process by which",
    "The city council met on Tuesday to discuss", "Our company was founded in 1998 with the goal of",
    "The old lighthouse keeper climbed the stairs", "To install the package, first open a terminal and",
    "The match ended in a draw after", "Many people believe that exercise", "# Introduction\n\nThis guide explains",
    "She opened the letter slowly and read", "The planets of the solar system are",
    "In economics, inflation refers to", "The first thing you notice about the forest is",
    "import numpy as np\n\n", "Ladies and gentlemen, thank you for coming tonight.",
]


def fit_prompts() -> list[str]:
    """The chat prompts the bridge is fitted on (topics × tasks, then standalone prompts)."""
    return [task.format(t=t) for t in _TOPICS for task in _TASKS][::2] + list(_STANDALONE)


def text_openings() -> list[str]:
    """Plain-text openings the full model continues (sampled) for the fit."""
    return list(_OPENINGS)


@dataclasses.dataclass
class FitData:
    """Hidden states of the full model on the fit text: ``inputs[n]`` [T, hidden] after n
    layers, ``target`` [T, hidden] after the last layer, same positions."""

    inputs: dict[int, np.ndarray]
    target: np.ndarray
    seconds: float


def cache_key(gguf_path: Path, layers: int) -> str:
    """Identifies a bridge: the GGUF (name, size, head bytes), N and FIT_VERSION."""
    p = Path(gguf_path)
    h = hashlib.sha256()
    with p.open("rb") as f:
        h.update(f.read(1 << 20))
    h.update(f"{p.name}:{p.stat().st_size}:{layers}:{FIT_VERSION}:{RIDGE}".encode())
    return h.hexdigest()[:16]


def fit_ridge(x: np.ndarray, y: np.ndarray, ridge: float = RIDGE) -> tuple[np.ndarray, np.ndarray]:
    """(W [d_in, d_out], b [d_out]) minimizing |x W + b − y|² + λ|W|², λ = ridge × mean eigenvalue
    of x's covariance; float64, closed form (a Cholesky solve), deterministic."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    mx, my = x.mean(axis=0), y.mean(axis=0)
    xc = x - mx
    gram = xc.T @ xc
    lam = ridge * np.trace(gram) / gram.shape[0]
    w = np.linalg.solve(gram + lam * np.eye(gram.shape[0]), xc.T @ (y - my))
    b = my - mx @ w
    return w.astype(np.float32), b.astype(np.float32)


def normalized(h: np.ndarray) -> np.ndarray:
    """h / rms(h): all that the final RMSNorm reads of its input (its eps aside)."""
    h = np.asarray(h, np.float64)
    return h / np.sqrt(np.mean(h * h, axis=-1, keepdims=True))


def collect_hidden(
    config: LlamaConfig,
    weights: Mapping[str, np.ndarray],
    tokenizer: object,
    chat_template: str | None,
    layers: Sequence[int],
    eos_ids: Sequence[int],
    *,
    prequantized: Mapping[str, BlockQuantized] | None = None,
    threads: int = 2,
    limit: int | None = None,
) -> FitData:
    """Run the full int4 model over the fit text and return h_n (n in ``layers``) and h_L.

    The full model greedily answers every chat prompt (≤ CHAT_MAX_NEW tokens, stopping at EOS)
    and samples TEXT_MAX_NEW tokens after every opening (seeded); the hidden states of every
    real (non-padding) position it reads, prompt and its own tokens, are kept. Positions of the
    chat template's shared system preamble are kept once.
    """
    import jinja2.sandbox
    import onnxruntime as ort

    from switchyard.model.onnx_builder import build_llama_onnx

    start = time.perf_counter()
    n_layers = config.num_hidden_layers
    wanted = sorted(set(layers))
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    chats = fit_prompts()[:limit]
    if chat_template:
        tmpl = env.from_string(chat_template)
        chat_texts = [tmpl.render(messages=[{"role": "user", "content": p}], add_generation_prompt=True,
                                  bos_token="", eos_token="") for p in chats]
    else:
        chat_texts = chats
    texts = text_openings()[:limit]
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False).ids  # noqa: E731
    chat_ids = [enc(t) for t in chat_texts]
    text_ids = [enc(t) for t in texts]
    shared = _common_prefix_len(chat_ids) if len(chat_ids) > 1 else 0

    with tempfile.TemporaryDirectory(prefix="switchyard-bridge-") as tmp:
        path = build_llama_onnx(config, weights, Path(tmp), variant="int4", prequantized=prequantized,
                                lm_head_bits=32, hidden_outputs=[*wanted, n_layers])
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        del path
    rng = np.random.default_rng(SEED)
    xs: dict[int, list[np.ndarray]] = {n: [] for n in wanted}
    ys: list[np.ndarray] = []
    jobs = [(ids, CHAT_MAX_NEW, 0.0, shared) for ids in chat_ids] + \
           [(ids, TEXT_MAX_NEW, TEXT_TEMPERATURE, 0) for ids in text_ids]
    first_chat = True
    for lo in range(0, len(jobs), BATCH):
        batch = jobs[lo:lo + BATCH]
        skips = []
        for ids, _, _, skip in batch:
            skips.append(0 if (skip and first_chat) else skip)
            if skip:
                first_chat = False
        hid = _run_batch(sess, config, [b[0] for b in batch], [b[1] for b in batch],
                         [b[2] for b in batch], skips, [*wanted, n_layers], set(eos_ids), rng)
        for n in wanted:
            xs[n].append(hid[n])
        ys.append(hid[n_layers])
    data = FitData({n: np.concatenate(xs[n]) for n in wanted}, np.concatenate(ys),
                   time.perf_counter() - start)
    log.info("bridge fit data: %d positions from %d chat prompts + %d openings in %.1f s",
             len(data.target), len(chat_ids), len(text_ids), data.seconds)
    return data


def _common_prefix_len(seqs: Sequence[Sequence[int]]) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs):
            return i
    return n


def _run_batch(sess: object, c: LlamaConfig, prompts: list[list[int]], max_new: list[int],
               temps: list[float], skips: list[int], hidden: list[int], eos: set[int],
               rng: np.random.Generator) -> dict[int, np.ndarray]:
    """Generate for one left-padded batch; the hidden states of every position read, per layer."""
    b = len(prompts)
    s = max(len(p) for p in prompts)
    ids = np.zeros((b, s), np.int64)
    mask = np.zeros((b, s), np.int64)
    for r, p in enumerate(prompts):
        ids[r, s - len(p):] = p
        mask[r, s - len(p):] = 1
    # keep[r, j]: position j of row r is real and past the skipped shared prefix
    keep = mask.astype(bool).copy()
    for r, (p, k) in enumerate(zip(prompts, skips)):
        keep[r, s - len(p): s - len(p) + k] = False
    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    past = {f"past_key_values.{i}.{k}": np.zeros((b, c.num_key_value_heads, 0, c.head_dim), np.float32)
            for i in range(c.num_hidden_layers) for k in ("key", "value")}
    presents = [n.replace("past_key_values", "present") for n in past]
    out_names = ["logits", *presents, *(f"hidden.{n}" for n in hidden)]
    collected: dict[int, list[np.ndarray]] = {n: [] for n in hidden}
    done = np.zeros(b, bool)
    feeds_ids, feeds_pos, feeds_keep = ids, pos, keep
    for step in range(max(max_new) + 1):
        outs = sess.run(out_names, {"input_ids": feeds_ids, "attention_mask": mask,
                                    "position_ids": feeds_pos, **past})
        logits, present, hid = outs[0], outs[1:1 + len(presents)], outs[1 + len(presents):]
        for n, h in zip(hidden, hid):
            collected[n].append(h[feeds_keep])
        if step == max(max_new):
            break
        z = logits[:, -1, :].astype(np.float64)
        nxt = np.empty(b, np.int64)
        for r in range(b):
            if temps[r] > 0:
                p = np.exp((z[r] - z[r].max()) / temps[r])
                nxt[r] = rng.choice(len(p), p=p / p.sum())
            else:
                nxt[r] = int(np.argmax(z[r]))
        is_eos = np.isin(nxt, sorted(eos))
        # the token just produced is read (and kept) next step unless its row is finished
        read = ~done & ~is_eos & (step + 1 < np.array(max_new))
        done |= ~read
        if done.all():
            break
        past = dict(zip(past, present))
        mask = np.concatenate([mask, np.ones((b, 1), np.int64)], axis=1)
        feeds_ids = nxt[:, None]
        feeds_pos = feeds_pos[:, -1:] + 1
        feeds_keep = read[:, None]
    return {n: np.concatenate(v).astype(np.float32) for n, v in collected.items()}
