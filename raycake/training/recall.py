"""A synthetic long-context recall task in the code domain (Titans' S-NIAH, "single needle in a
haystack", in the flavour of the stdlib corpus).

A sequence holds a needle line ``passkey = "48213"``, then ``distance`` tokens of stdlib code,
then the prompt ``\\nassert passkey == "`` whose continuation is the digits and the closing
quote. With the needle further back than the attention can reach (a window of W tokens over L
stacked layers reaches L x (W - 1) tokens back), only a memory can answer.

Training sequences are cut from the train files' token stream with random keys; evaluation
sequences from the held-out files with fresh keys from their own seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

NEEDLE_NAME = "passkey"
KEY_DIGITS = 5


@dataclass(frozen=True)
class RecallSample:
    """One evaluation trial: the prompt's token ids and the answer (digits, then the quote)."""

    prompt: list[int]
    key: str
    answer: list[int]


class RecallTask:
    """Builds passkey sequences from a token stream with one tokenizer."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        # Each piece is encoded on its own: the digits are a pre-token of their own in byte-level
        # BPE, so the ids of the concatenated pieces equal those of the concatenated text.
        self.query = self._encode(f'\nassert {NEEDLE_NAME} == "')

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def needle(self, key: str) -> list[int]:
        return self._encode(f'{NEEDLE_NAME} = "{key}"\n')

    def answer(self, key: str) -> list[int]:
        return self._encode(f'{key}"')

    @staticmethod
    def random_key(rng: np.random.Generator) -> str:
        return "".join(str(d) for d in rng.integers(0, 10, size=KEY_DIGITS))

    def max_overhead(self) -> int:
        """An upper bound on the non-filler tokens of a sequence: a digit string never takes
        more tokens than it has digits, and the closing ``"\\n`` of the needle at most two."""
        needle = len(self._encode(f'{NEEDLE_NAME} = "')) + KEY_DIGITS + 2
        return needle + len(self.query) + KEY_DIGITS + 1

    def training_sequence(
        self, tokens: np.ndarray, length: int, rng: np.random.Generator
    ) -> np.ndarray:
        """``length`` tokens: a contiguous window of ``tokens`` with the needle inserted at a
        random point and the query + answer a random distance later (0 up to what fits)."""
        key = self.random_key(rng)
        needle, answer = self.needle(key), self.answer(key)
        free = length - len(needle) - len(self.query) - len(answer)
        if free < 0:
            raise ValueError(f"train.seq_len: a recall sequence needs > {length} tokens")
        start = int(rng.integers(0, len(tokens) - free))
        filler = tokens[start : start + free]
        distance = int(rng.integers(0, free + 1))
        before = int(rng.integers(0, free - distance + 1))
        pieces = (
            filler[:before],
            needle,
            filler[before : before + distance],
            self.query,
            answer,
            filler[before + distance :],
        )
        return np.concatenate([np.asarray(p, dtype=np.int64) for p in pieces])

    def eval_samples(
        self, tokens: np.ndarray, num: int, distance: int, seed: int
    ) -> list[RecallSample]:
        """``num`` trials: the needle first, then ``distance`` tokens of ``tokens``, then the
        query. Keys and filler offsets come from ``seed`` alone."""
        rng = np.random.default_rng(seed)
        if len(tokens) <= distance:
            raise ValueError(f"recall: {len(tokens)} filler tokens, need > {distance}")
        samples = []
        for _ in range(num):
            key = self.random_key(rng)
            start = int(rng.integers(0, len(tokens) - distance))
            filler = [int(t) for t in tokens[start : start + distance]]
            prompt = self.needle(key) + filler + self.query
            samples.append(RecallSample(prompt=prompt, key=key, answer=self.answer(key)))
        return samples


def right_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, max_len] ids padded on the right, and each row's length. Right padding is invisible
    to a causal model (attention, and the memory, read only earlier positions)."""
    lengths = torch.tensor([len(r) for r in rows])
    ids = torch.full((len(rows), int(lengths.max())), pad, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
    return ids, lengths


@torch.no_grad()
def teacher_forced_accuracy(model, samples: list[RecallSample], batch_size: int = 16) -> float:
    """Share of trials whose every answer token (digits and quote) is the argmax given the
    prompt and the answer so far: exactly the trials greedy decoding answers token for token."""
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(samples), batch_size):
        batch = samples[i : i + batch_size]
        ids, _ = right_padded([s.prompt + s.answer for s in batch], pad=0)
        positions = torch.arange(ids.shape[1]).expand_as(ids)
        predicted = model.compute_logits(model(ids, positions)).argmax(dim=-1)
        for row, s in enumerate(batch):
            start = len(s.prompt)
            guess = predicted[row, start - 1 : start - 1 + len(s.answer)]
            correct += int(guess.tolist() == s.answer)
    model.train(was_training)
    return correct / len(samples)
