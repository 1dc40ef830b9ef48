"""Deterministic, readable text for simulated answers.

The text is simple English sentences built from a tiny grammar (subject, verb, object, an
optional place) over a built-in vocabulary. The same seed, model, messages and kind always give
the same tokens; anything else gives different ones. One token is one word piece with its leading
space, 4-5 characters on average as with real tokenizers (long words come in two pieces). A few
words are non-ASCII ("café", "naïve", "→", "🙂") so that clients meet two-, three- and four-byte
UTF-8 sequences, and an occasional paragraph break puts newlines into the JSON strings.

An answer that ends because it is complete (``finish_reason`` ``stop``) ends with a whole
sentence, as a real model's does: :meth:`TextSource.answer` shortens the last sentence to fit.
"""

from __future__ import annotations

import hashlib
import json
import random

__all__ = ["TextSource"]

# fmt: off
_ADJECTIVES = (
    "quiet", "small", "old", "new", "warm", "cool", "brief", "steady", "careful", "honest",
    "bright", "gentle", "naïve", "curious", "patient", "local", "early", "late", "simple", "clear",
)
_NOUNS = (
    "river", "garden", "window", "table", "letter", "morning", "market", "bridge", "kettle",
    "lantern", "harbor", "meadow", "notebook", "kernel", "server", "stream", "café", "façade",
    "crème", "piñata", "model", "token", "reader", "teacher", "pilot", "baker", "cat", "friend",
)
_NAMES = ("Ada", "Zürich", "Mira", "Jonas", "Noor", "Kenji", "Lotte", "Ravi")
_VERBS = (
    "finds", "keeps", "sends", "reads", "writes", "watches", "follows", "carries", "opens",
    "paints", "greets", "remembers", "visits", "builds", "answers", "counts", "holds", "moves",
)
_RESTING = ("waits", "rests", "listens", "smiles", "sleeps", "hums", "agrees", "wanders")
_PLACES = ("near", "under", "beside", "behind", "across", "inside", "past", "→")
_OPENERS = ("Then", "Later", "Still", "Today", "Meanwhile", "Perhaps", "Again", "Luckily")
_THOUGHTS = ("Hmm,", "Okay,", "Wait,", "So", "Maybe", "Well,", "Right,", "First,")
_ENDINGS = (".", ".", ".", ".", ".", "!", ". 🙂")
# Words that stay one piece (with their leading space) for a last sentence cut to fit.
_SHORT_RESTING = ("waits", "rests", "smiles", "sleeps", "hums", "agrees")
_SHORT_PLACES = ("near", "under", "beside", "behind", "across", "inside", "past")
# fmt: on

_SENTENCES_PER_PARAGRAPH = (3, 6)


class TextSource:
    """An endless, deterministic sequence of tokens for one request.

    ``kind`` separates independent streams of the same request (``"answer"``, ``"reasoning"``);
    reasoning sentences start with a thinking word ("Hmm,", "Wait,").
    """

    def __init__(self, *, seed: int, model: str, messages: object, kind: str = "answer") -> None:
        material = json.dumps(
            [seed, model, messages, kind], sort_keys=True, ensure_ascii=False, default=repr
        )
        digest = hashlib.sha256(material.encode("utf-8")).digest()
        self._rng = random.Random(int.from_bytes(digest[:16], "big"))
        self._thinking = kind == "reasoning"
        self._queue: list[str] = []
        self._first = True
        self._left_in_paragraph = self._rng.randint(*_SENTENCES_PER_PARAGRAPH)
        self._pending = ""
        self._last_piece = ""

    def _noun_phrase(self) -> list[str]:
        rng = self._rng
        if rng.random() < 0.15:
            return [rng.choice(_NAMES)]
        words = [rng.choice(("the", "a", "every", "one", "the"))]
        if rng.random() < 0.6:
            words.append(rng.choice(_ADJECTIVES))
        words.append(rng.choice(_NOUNS))
        if words[0] == "a" and words[1][0] in "aeiou":
            words[0] = "an"
        return words

    def _sentence(self) -> list[str]:
        rng = self._rng
        words: list[str] = []
        if self._thinking:
            words.append(rng.choice(_THOUGHTS))
        elif rng.random() < 0.25:
            words.append(rng.choice(_OPENERS) + ",")
        words += [*self._noun_phrase(), rng.choice(_VERBS), *self._noun_phrase()]
        if rng.random() < 0.5:
            words += [rng.choice(_PLACES), *self._noun_phrase()]
        if rng.random() < 0.3:
            words[-1] += ","
            words += [rng.choice(("and", "but", "while", "so")), *self._noun_phrase()]
            words.append(rng.choice(_RESTING))
        words[0] = words[0][:1].upper() + words[0][1:]
        words[-1] += rng.choice(_ENDINGS)
        return words

    def next_token(self) -> str:
        """The next word piece, with its leading space or paragraph break."""
        if not self._queue:
            words = self._sentence()
            if not self._first:
                self._left_in_paragraph -= 1
                if self._left_in_paragraph == 0:
                    self._left_in_paragraph = self._rng.randint(*_SENTENCES_PER_PARAGRAPH)
                    words[0] = "\n\n" + words[0]
                else:
                    words[0] = " " + words[0]
            self._first = False
            pieces = [words[0], *(" " + w for w in words[1:])]
            for piece in pieces:  # long words become two pieces, as a tokenizer would split them
                cut = len(piece) // 2 if len(piece) > 7 else len(piece)
                self._queue += [piece[:cut], piece[cut:]] if cut < len(piece) else [piece]
            self._queue.reverse()
        self._last_piece = self._queue.pop()
        return self._last_piece

    def tokens(self, count: int) -> list[str]:
        """The next ``count`` tokens."""
        return [self.next_token() for _ in range(count)]

    def answer(self, count: int) -> list[str]:
        """``count`` tokens that end with a whole sentence: the text of :meth:`tokens`, with
        the sentence that would not fit replaced by a short one of exactly the tokens left."""
        out: list[str] = []
        while len(out) < count:
            if not self._queue:
                self.next_token()  # builds the next sentence's pieces (and takes its first)
                self._queue.append(self._last_piece)
            left = count - len(out)
            if len(self._queue) <= left:
                out += reversed(self._queue)
                self._queue.clear()
            else:
                out += self._closing(left, self._queue[-1])
                self._queue.clear()
        return out

    def _closing(self, pieces: int, first: str) -> list[str]:
        """A sentence of exactly ``pieces`` one-piece tokens, starting where ``first`` did
        (its leading space or paragraph break)."""
        rng = self._rng
        lead = first[: len(first) - len(first.lstrip())]
        name, rest = rng.choice(_NAMES), rng.choice(_SHORT_RESTING)
        if pieces == 1:
            return [f"{lead}{name} {rest}."]
        words = [name, rest]
        extra = pieces - 2
        while extra >= 2:
            words += [rng.choice(_SHORT_PLACES), rng.choice(_NAMES)]
            extra -= 2
        if extra:
            words.append(rng.choice(("today", "again", "too", "now")))
        words[-1] += "."
        return [lead + words[0], *(" " + w for w in words[1:])]

    def chars(self, count: int) -> str:
        """The next ``count`` characters (code points) of the same text, cut at any point."""
        parts = [self._pending]
        have = len(self._pending)
        while have < count:
            token = self.next_token()
            parts.append(token)
            have += len(token)
        text = "".join(parts)
        self._pending = text[count:]
        return text[:count]
