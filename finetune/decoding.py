"""Text generation for a decoder, independent of the model: greedy decoding, beam search, nucleus sampling.

The model is reached through one callable, ``step(tokens, rows) -> logits``:

- ``tokens``: LongTensor[N, t], partial sequences, each starting with the start token (``sot``), t >= 1;
- ``rows``: LongTensor[N], ``rows[i]`` is the batch element (0..batch_size-1) that sequence i belongs to, so the
  caller can pick its image features with ``features[rows]``; the same row appears once per live beam, and
  finished batch elements stop appearing;
- returns FloatTensor[N, V], next-token logits after each sequence's last token.

Every function returns one list of token ids per batch element, without the start and end tokens. A sequence
has at most ``max_len`` tokens; one that reaches it without an end token is cut there (so ``step`` sees at most
``max_len`` tokens: the start token and ``max_len - 1`` generated ones). Before ``min_len`` tokens have been
generated the end token is forbidden.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

Step = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def greedy(step: Step, batch_size: int, sot: int, eot: int, max_len: int, min_len: int = 0,
           device: torch.device | str = "cpu") -> list[list[int]]:
    """The most likely next token at each step."""
    return _decode(step, batch_size, sot, eot, max_len, min_len, device, lambda logits: logits.argmax(-1))


@torch.no_grad()
def sample(step: Step, batch_size: int, sot: int, eot: int, max_len: int, top_p: float = 0.9,
           temperature: float = 1.0, generator: torch.Generator | None = None, min_len: int = 0,
           device: torch.device | str = "cpu") -> list[list[int]]:
    """Nucleus sampling: the next token is drawn from the smallest set of most likely tokens whose probability
    (after dividing the logits by ``temperature``) reaches ``top_p``, renormalised. ``generator`` (on ``device``)
    makes it reproducible; with a tiny ``top_p`` it is greedy decoding."""
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")

    def pick(logits: torch.Tensor) -> torch.Tensor:
        probs = nucleus(logits / temperature, top_p)
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)

    return _decode(step, batch_size, sot, eot, max_len, min_len, device, pick)


def nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Probabilities [N, V] restricted to each row's top-p set: the most likely tokens, in order, while the mass
    before them is below ``top_p`` (so the most likely token is always in), renormalised."""
    probs = logits.softmax(-1)
    # Stable sort: among equally likely tokens the lower id comes first, as in argmax.
    sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
    keep_sorted = (sorted_probs.cumsum(-1) - sorted_probs) < top_p
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    probs = probs * keep
    return probs / probs.sum(-1, keepdim=True)


@torch.no_grad()
def beam_search(step: Step, batch_size: int, sot: int, eot: int, max_len: int, beam_size: int = 3,
                length_penalty: float = 1.0, min_len: int = 0, device: torch.device | str = "cpu") -> list[list[int]]:
    """The best hypothesis of a beam search with ``beam_size`` live beams per batch element.

    A hypothesis is scored ``sum(log p) / L ** length_penalty`` with L the number of tokens it generated, its end
    token included (fairseq's formula; 0 ranks by total log-probability, which favours short texts, 1 by the mean
    per token). Each step keeps the ``beam_size`` best continuations that do not end; an end token among the
    ``beam_size`` best candidates finishes that hypothesis, which then stays finished. Beams cut at ``max_len``
    count as finished too. A batch element stops early only when no live beam can still beat its best finished
    hypothesis, so the result is the one running to ``max_len`` would give. With ``beam_size=1`` this is greedy
    decoding (``length_penalty`` has no effect, as in Hugging Face's generate)."""
    if beam_size < 1:
        raise ValueError(f"beam_size must be at least 1, got {beam_size}")
    if beam_size == 1:
        return greedy(step, batch_size, sot, eot, max_len, min_len, device)
    return _beam_search(step, batch_size, sot, eot, max_len, beam_size, length_penalty, min_len, device)


def _check(batch_size: int, max_len: int, min_len: int) -> None:
    if batch_size < 1 or max_len < 1:
        raise ValueError(f"batch_size and max_len must be at least 1, got {batch_size} and {max_len}")
    if not 0 <= min_len <= max_len:
        raise ValueError(f"min_len must be in [0, max_len={max_len}], got {min_len}")


def _logits(step: Step, tokens: torch.Tensor, rows: torch.Tensor, eot: int, forbid_end: bool) -> torch.Tensor:
    logits = step(tokens, rows)
    if logits.dim() != 2 or logits.shape[0] != tokens.shape[0]:
        raise ValueError(f"step must return logits of shape [N={tokens.shape[0]}, V], got {tuple(logits.shape)}")
    # Scores in at least float32 (a half-precision model would round the running sums); float64 stays float64.
    logits = logits.float() if logits.element_size() < 4 else logits.clone()
    if forbid_end:
        logits[:, eot] = -math.inf
    return logits


def _decode(step: Step, batch_size: int, sot: int, eot: int, max_len: int, min_len: int,
            device: torch.device | str, pick: Callable[[torch.Tensor], torch.Tensor]) -> list[list[int]]:
    """One token per step for each unfinished sequence, chosen by ``pick(logits [N, V]) -> ids [N]``."""
    _check(batch_size, max_len, min_len)
    tokens = torch.full((batch_size, 1), sot, dtype=torch.long, device=device)
    rows = torch.arange(batch_size, device=device)
    out: list[list[int]] = [[] for _ in range(batch_size)]
    for t in range(max_len):
        chosen = pick(_logits(step, tokens, rows, eot, forbid_end=t < min_len))
        for row, token in zip(rows.tolist(), chosen.tolist()):
            if token != eot:
                out[row].append(token)
        # Ended sequences leave the batch: step never sees them again.
        going = chosen != eot
        tokens = torch.cat([tokens[going], chosen[going, None]], dim=1)
        rows = rows[going]
        if rows.numel() == 0:
            break
    return out


def _beam_search(step: Step, batch_size: int, sot: int, eot: int, max_len: int, beam_size: int,
                 length_penalty: float, min_len: int, device: torch.device | str) -> list[list[int]]:
    _check(batch_size, max_len, min_len)
    k = beam_size
    active = list(range(batch_size))               # batch elements still searching
    tokens = torch.full((batch_size * k, 1), sot, dtype=torch.long, device=device)  # k rows per active element
    # Only the first beam is real at the start; the others are placeholders (score -inf) until filled.
    scores = torch.full((batch_size, k), -math.inf, device=device)
    scores[:, 0] = 0.0
    best: list[tuple[float, list[int]] | None] = [None] * batch_size  # (normalised score, tokens) of the best ended

    def finish(element: int, raw: float, length: int, sequence: list[int]) -> None:
        normalised = raw / length ** length_penalty
        if best[element] is None or normalised > best[element][0]:
            best[element] = (normalised, sequence)

    for t in range(max_len):
        length = t + 1                             # tokens generated once this step's token is added
        rows = torch.tensor(active, device=device).repeat_interleave(k)
        # Only real beams go to the model; placeholder rows (score -inf) get -inf log-probs.
        real = scores.reshape(-1) > -math.inf
        real_logprobs = _logits(step, tokens[real], rows[real], eot, forbid_end=t < min_len).log_softmax(-1)
        vocab = real_logprobs.shape[1]
        logprobs = real_logprobs.new_full((len(rows), vocab), -math.inf)
        logprobs[real] = real_logprobs             # [A * k, V]
        candidates = (scores.to(logprobs.dtype).reshape(-1, 1) + logprobs).reshape(len(active), k * vocab)
        top_scores, top_index = candidates.topk(min(2 * k, k * vocab), dim=1)  # k continuations survive any k ends
        # One device-to-host copy per step; the choice of beams below is plain Python.
        top_scores, top_index, history = top_scores.tolist(), top_index.tolist(), tokens[:, 1:].tolist()
        keep_rows, keep_tokens, keep_scores, still_active = [], [], [], []
        for a, element in enumerate(active):
            beams = []                             # (raw score, row in tokens, next token), best first
            for rank, (raw, index) in enumerate(zip(top_scores[a], top_index[a])):
                if raw == -math.inf:
                    break
                beam, token = divmod(index, vocab)
                row = a * k + beam
                if token == eot:
                    if rank < k:                   # an end outside the k best would not have been in the beam
                        finish(element, raw, length, history[row])
                    continue
                beams.append((raw, row, token))
                if len(beams) == k:
                    break
            if length == max_len:
                for raw, row, token in beams:
                    finish(element, raw, length, history[row] + [token])
                continue
            beaten = best[element] is not None and beams and \
                best[element][0] >= _bound(beams[0][0], length, max_len, length_penalty)
            if not beams or beaten:        # nothing live can still win: this element is done
                continue
            beams += [(-math.inf, a * k, eot)] * (k - len(beams))  # placeholders, never shown to the model
            still_active.append(element)
            for raw, row, token in beams:
                keep_scores.append(raw)
                keep_rows.append(row)
                keep_tokens.append(token)
        if not still_active:
            break
        index = torch.tensor(keep_rows, device=device)
        tokens = torch.cat([tokens[index], torch.tensor(keep_tokens, device=device)[:, None]], dim=1)
        scores = torch.tensor(keep_scores, device=device, dtype=logprobs.dtype).reshape(len(still_active), k)
        active = still_active
    return [b[1] if b is not None else [] for b in best]


def _bound(raw: float, length: int, max_len: int, length_penalty: float) -> float:
    """Highest normalised score a live beam with total ``raw`` after ``length`` tokens can still reach: log-probs
    are <= 0, so its total only falls, and it ends with length + 1 .. max_len tokens."""
    final_length = max_len if length_penalty >= 0 else length + 1
    return raw / final_length ** length_penalty
