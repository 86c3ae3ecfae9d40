"""Hard negative captions for the contrastive loss, made by swapping words between the phrases of a caption.

A CLIP-style model tends to read a caption as a bag of words (Yuksekgonul et al., "When and why vision-language
models behave like bags-of-words", ICLR 2023): "a large red circle and a small blue star" and "a small red circle
and a large blue star" embed alike, so the image tower is never asked which object is large or which colour goes
with which shape. NegCLIP's remedy is a negative caption per sample that differs from it only in such a binding.
Here it is made from the caption's own tokens, without a parser: the caption is split into its coordinated
phrases (at "and" and commas), two phrases are lined up from their last word (the noun) backwards, and one lined-up
pair of differing words is swapped: "circle" with "star", "red" with "blue" or "large" with "small". A caption with a
single phrase has no such negative (``valid`` is False for it).
"""

from __future__ import annotations

import torch


def phrase_swaps(tokens: torch.Tensor, separators: set[int], end: int, draws: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(negatives, valid)`` for ``tokens`` ``[N, L]`` (start token, words, ``end``, padding): each row with two of
    its phrases' lined-up words swapped, the phrases and the pair picked by ``draws`` ``[N, 2]`` (uniform in
    [0, 1): the caller's generator, so a resumed run draws the same). Rows with no two phrases, or no differing
    lined-up words, come back unchanged with ``valid`` False."""
    negatives = tokens.clone()
    valid = torch.zeros(tokens.shape[0], dtype=torch.bool)
    for row, (ids, (u, v)) in enumerate(zip(tokens.tolist(), draws.tolist())):
        stop = ids.index(end) if end in ids else len(ids)
        phrases, current = [], []
        for position in range(1, stop):
            if ids[position] in separators:
                if current:
                    phrases.append(current)
                current = []
            else:
                current.append(position)
        if current:
            phrases.append(current)
        pairs = [(a, b) for a in range(len(phrases)) for b in range(a + 1, len(phrases))]
        if not pairs:
            continue
        a, b = pairs[int(u * len(pairs))]
        lined_up = [(i, j) for i, j in zip(reversed(phrases[a]), reversed(phrases[b])) if ids[i] != ids[j]]
        if not lined_up:
            continue
        i, j = lined_up[int(v * len(lined_up))]
        negatives[row, i], negatives[row, j] = tokens[row, j], tokens[row, i]
        valid[row] = True
    return negatives, valid
