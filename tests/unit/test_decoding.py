"""Decoding on toy "models": fixed tables of next-token probabilities given the last token."""
import itertools
import math

import pytest
import torch

from finetune.decoding import _beam_search, beam_search, greedy, nucleus, sample

SOT, EOT, V = 0, 1, 6
WORDS = [2, 3, 4, 5]  # the tokens a text can contain

# Next-token probabilities given the last token (columns: sot, eot, 2, 3, 4, 5). Greedy takes 2 (0.5), then 4 (0.35),
# then ends (0.6): p = 0.105. Starting with 3 (0.4) and ending at once (0.9) is far better: p = 0.36.
TABLE = torch.tensor([
    [0.00, 0.05, 0.50, 0.40, 0.03, 0.02],   # after sot
    [0.00, 0.20, 0.20, 0.20, 0.20, 0.20],   # after eot (never asked)
    [0.00, 0.25, 0.10, 0.05, 0.35, 0.25],   # after 2
    [0.00, 0.90, 0.03, 0.03, 0.02, 0.02],   # after 3
    [0.00, 0.60, 0.10, 0.10, 0.10, 0.10],   # after 4
    [0.00, 0.60, 0.10, 0.10, 0.10, 0.10],   # after 5
], dtype=torch.float64).log()


class Toy:
    """step(tokens, rows): log-probs from ``tables[rows, last token]``; records every call."""

    def __init__(self, tables: torch.Tensor):
        self.tables = tables if tables.dim() == 3 else tables.unsqueeze(0)
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, tokens: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        assert tokens.dtype == torch.long and tokens.dim() == 2 and (tokens[:, 0] == SOT).all()
        self.calls.append((tokens.clone(), rows.clone()))
        return self.tables[rows % len(self.tables), tokens[:, -1]]


def random_tables(rows: int, seed: int, end_bias: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    tables = torch.randn(rows, V, V, generator=g, dtype=torch.float64) * 1.5
    tables[:, :, SOT] = -math.inf
    tables[:, :, EOT] += end_bias
    return tables.log_softmax(-1)


def score(tables: torch.Tensor, sequence: list[int], ended: bool, length_penalty: float) -> float:
    logprobs = tables.log_softmax(-1)  # what the decoder computes from the logits
    total, last = 0.0, SOT
    for token in sequence + ([EOT] if ended else []):
        total += logprobs[last, token].item()
        last = token
    return total / (len(sequence) + ended) ** length_penalty


def brute_force(tables: torch.Tensor, max_len: int, length_penalty: float) -> float:
    """Best score over every text of at most max_len tokens (ended, or cut at max_len)."""
    best = -math.inf
    for n in range(max_len + 1):
        for words in itertools.product(WORDS, repeat=n):
            if n < max_len:
                best = max(best, score(tables, list(words), True, length_penalty))
            else:
                best = max(best, score(tables, list(words), False, length_penalty))
    return best


# --- beam search ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_beam_search_finds_the_best_text_that_greedy_misses(length_penalty):
    assert greedy(Toy(TABLE), 1, SOT, EOT, max_len=5) == [[2, 4]]
    assert beam_search(Toy(TABLE), 1, SOT, EOT, max_len=5, beam_size=2, length_penalty=length_penalty) == [[3]]


@pytest.mark.parametrize("length_penalty", [0.0, 0.6, 1.0, 2.0, -0.5])
def test_a_beam_wide_enough_to_keep_everything_finds_the_exhaustive_best(length_penalty):
    # max_len 4: at most 4**3 live prefixes and 4**3 * 5 candidates per step, so 320 beams lose nothing.
    tables = random_tables(3, seed=1, end_bias=0.5)
    found = beam_search(Toy(tables), 3, SOT, EOT, max_len=4, beam_size=320, length_penalty=length_penalty)
    for row, sequence in enumerate(found):
        best = brute_force(tables[row], 4, length_penalty)
        ended = len(sequence) < 4  # a text of max_len tokens was cut, a shorter one ended
        assert score(tables[row], sequence, ended, length_penalty) == pytest.approx(best, abs=1e-9)


def test_length_penalty_can_prefer_a_longer_text_and_the_early_stop_waits_for_it():
    # Ending at once has p = 0.6 (score log 0.6 = -0.51 under any penalty). 2 3 4 5 then the end has
    # p = 0.3 * 0.97 ** 4: total -1.33, but -0.27 per token. After the first step the ended text is ahead of the
    # live beam's -1.20 / 2 at the next length; only at max_len (5) does the live beam's bound pass it.
    table = torch.full((V, V), 0.0075, dtype=torch.float64)
    table[:, SOT] = 0.0
    table[SOT] = torch.tensor([0.0, 0.6, 0.3, 0.05, 0.03, 0.02])
    for last, following in [(2, 3), (3, 4), (4, 5), (5, EOT)]:
        table[last, following] = 0.97
    table = table.log()
    assert beam_search(Toy(table), 1, SOT, EOT, max_len=5, beam_size=2, length_penalty=0.0) == [[]]
    assert beam_search(Toy(table), 1, SOT, EOT, max_len=5, beam_size=2, length_penalty=1.0) == [[2, 3, 4, 5]]


def test_beam_of_one_is_greedy():
    tables = random_tables(8, seed=2)
    expected = greedy(Toy(tables), 8, SOT, EOT, max_len=6)
    assert beam_search(Toy(tables), 8, SOT, EOT, max_len=6, beam_size=1, length_penalty=1.0) == expected
    # The beam machinery itself with one beam and no length penalty is greedy too.
    assert _beam_search(Toy(tables), 8, SOT, EOT, 6, 1, 0.0, 0, "cpu") == expected


def test_ended_hypotheses_stay_ended_and_rows_name_the_batch_element():
    toy = Toy(random_tables(4, seed=3, end_bias=1.0))
    beam_search(toy, 4, SOT, EOT, max_len=6, beam_size=3)
    assert len(toy.calls) > 1
    for tokens, rows in toy.calls:
        assert not (tokens[:, 1:] == EOT).any()          # nothing that ended goes back to the model
        assert ((0 <= rows) & (rows < 4)).all()
        assert all(n <= 3 for n in torch.bincount(rows).tolist())  # at most beam_size sequences per element
    assert toy.calls[0][0].shape == (4, 1)                # the start: one real beam per element, not 3 copies


@pytest.mark.parametrize("decode", [
    lambda step, n: greedy(step, n, SOT, EOT, max_len=7),
    lambda step, n: beam_search(step, n, SOT, EOT, max_len=7, beam_size=4, length_penalty=0.7),
])
def test_batch_rows_are_independent(decode):
    tables = random_tables(5, seed=4)
    together = decode(Toy(tables), 5)
    alone = [decode(Toy(tables[i:i + 1]), 1)[0] for i in range(5)]
    assert together == alone
    assert len(set(map(tuple, together))) > 1  # the rows really differ


def test_max_len_and_min_len_are_respected():
    never_ends = random_tables(3, seed=5, end_bias=-1e3)
    always_ends = random_tables(3, seed=5, end_bias=1e3)
    g = torch.Generator().manual_seed(0)
    for decode in (lambda s, **kw: greedy(s, 3, SOT, EOT, **kw),
                   lambda s, **kw: beam_search(s, 3, SOT, EOT, beam_size=3, **kw),
                   lambda s, **kw: sample(s, 3, SOT, EOT, top_p=0.9, generator=g, **kw)):
        toy = Toy(never_ends)
        assert [len(x) for x in decode(toy, max_len=5)] == [5, 5, 5]
        assert max(tokens.shape[1] for tokens, _ in toy.calls) == 5  # sot + 4 generated
        assert [len(x) for x in decode(Toy(always_ends), max_len=5)] == [0, 0, 0]
        assert [len(x) for x in decode(Toy(always_ends), max_len=5, min_len=2)] == [2, 2, 2]
    with pytest.raises(ValueError):
        greedy(Toy(TABLE), 1, SOT, EOT, max_len=3, min_len=4)


# --- nucleus sampling -----------------------------------------------------------------------------------------

def test_sampling_with_a_tiny_top_p_or_temperature_is_greedy():
    tables = random_tables(16, seed=6)
    expected = greedy(Toy(tables), 16, SOT, EOT, max_len=6)
    g = torch.Generator().manual_seed(0)
    assert sample(Toy(tables), 16, SOT, EOT, max_len=6, top_p=1e-6, generator=g) == expected
    assert sample(Toy(tables), 16, SOT, EOT, max_len=6, top_p=1.0, temperature=1e-4, generator=g) == expected


def test_sampling_is_reproducible_with_a_fixed_generator():
    tables = random_tables(32, seed=7)

    def run(seed):
        return sample(Toy(tables), 32, SOT, EOT, max_len=6, top_p=0.95,
                      generator=torch.Generator().manual_seed(seed))

    assert run(0) == run(0)
    assert run(0) != run(1)


def test_sampling_never_leaves_the_top_p_set():
    # First-token probabilities: 2: 0.45, 3: 0.30, eot: 0.10, 4: 0.10, 5: 0.05. With top_p 0.7 the set is {2, 3}
    # (0.45 before 3 is below 0.7; 0.75 before the next is not), renormalised to 0.6 / 0.4.
    probs = torch.tensor([0.0, 0.10, 0.45, 0.30, 0.10, 0.05], dtype=torch.float64)
    table = probs.log().expand(V, V)
    drawn = sample(Toy(table), 4000, SOT, EOT, max_len=1, top_p=0.7, generator=torch.Generator().manual_seed(0))
    first = [x[0] if x else EOT for x in drawn]
    assert set(first) == {2, 3}
    assert 0.55 < first.count(2) / len(first) < 0.65
    assert nucleus(probs.log().unsqueeze(0), 0.7).tolist() == [[0.0, 0.0, pytest.approx(0.6), pytest.approx(0.4),
                                                                  0.0, 0.0]]
    assert nucleus(probs.log().unsqueeze(0), 1.0).squeeze(0).tolist() == pytest.approx(probs.tolist())


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        sample(Toy(TABLE), 1, SOT, EOT, max_len=3, top_p=0.0)
    with pytest.raises(ValueError):
        sample(Toy(TABLE), 1, SOT, EOT, max_len=3, temperature=0.0)
    with pytest.raises(ValueError):
        beam_search(Toy(TABLE), 1, SOT, EOT, max_len=3, beam_size=0)
    with pytest.raises(ValueError, match="shape"):
        greedy(lambda tokens, rows: torch.zeros(V), 2, SOT, EOT, max_len=3)


def test_generated_text_is_decoded_whole_and_stray_bytes_are_dropped():
    import open_clip

    from finetune.tasks.caption import decoded_text

    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    ids = tokenizer.encode("a café with a red circle")
    assert decoded_text(tokenizer, ids) == "a café with a red circle"  # multi-byte characters survive whole
    # A lone byte token of a multi-byte character (what a weak model emits) decodes to U+FFFD; it is dropped.
    stray = [i for i in range(256, 512) if "\ufffd" in tokenizer.decode([i])][:1]
    assert stray, "the tokenizer has no lone byte token"
    text = decoded_text(tokenizer, ids[:2] + stray + ids[2:])
    assert "\ufffd" not in text and text.endswith("with a red circle")
