"""SCAN (Lake & Baroni, ICML 2018) generated from its grammar, its standard splits, and tensor encoding.

The grammar (the paper's Table/Figure of phrase-structure rules, docs/method.md section 8.3)::

    C -> S and S | S after S | S
    S -> V twice | V thrice | V
    V -> D[1] opposite D[2] | D[1] around D[2] | D | U
    D -> U left | U right | turn left | turn right
    U -> walk | look | run | jump

``D[1] opposite D[2]`` is "walk opposite left", "turn opposite right" ... It yields 4 + 10 + 10 + 10 = 34 V phrases,
102 S phrases and 102 + 2·102² = 20,910 commands. Meaning: ``x left`` = LTURN x; ``x opposite left`` = LTURN LTURN x;
``x around left`` = (LTURN x) four times (``turn`` contributes no action of its own); ``x twice`` / ``thrice`` repeat;
``a and b`` = a then b; ``a after b`` = b then a.

Splits (checked against the original files by ``tests/test_experiments_scan.py``):

- ``simple``: a random 80/20 split of all commands (16,728 / 4,182); the original draw is not reproducible, so
  modscope draws its own with a fixed seed.
- ``length``: train = commands whose action sequence has at most 22 actions, test = the longer ones (24-48).
- ``addprim_jump`` / ``addprim_turn_left``: test = every command containing the primitive ("jump", "turn left")
  except the primitive alone; train = all other commands plus the primitive alone, repeated so that it makes up
  a tenth of the training set (n_other / 9 copies: 1,467 and 2,189).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import InvalidParameterError

Example = tuple[str, str]  # (command, actions), space-separated words

PRIMITIVES = ("walk", "look", "run", "jump")
ACTIONS = ("I_WALK", "I_LOOK", "I_RUN", "I_JUMP", "I_TURN_LEFT", "I_TURN_RIGHT")
COMMAND_WORDS = ("walk", "look", "run", "jump", "turn", "left", "right", "opposite", "around", "twice", "thrice", "and", "after")
SPLITS = ("simple", "length", "addprim_jump", "addprim_turn_left")
LENGTH_THRESHOLD = 22
"""Longest action sequence in the length split's training set."""
_TURN = {"left": "I_TURN_LEFT", "right": "I_TURN_RIGHT"}


def _v_phrases() -> Iterator[tuple[str, list[str]]]:
    """Every V phrase with its action sequence."""
    for u in PRIMITIVES:
        yield u, [f"I_{u.upper()}"]
    for first in (*PRIMITIVES, "turn"):
        action = [] if first == "turn" else [f"I_{first.upper()}"]
        for side, turn in _TURN.items():
            yield f"{first} {side}", [turn, *action]
            yield f"{first} opposite {side}", [turn, turn, *action]
            yield f"{first} around {side}", [turn, *action] * 4


def _s_phrases() -> list[tuple[str, list[str]]]:
    out = []
    for text, acts in _v_phrases():
        out += [(text, acts), (f"{text} twice", acts * 2), (f"{text} thrice", acts * 3)]
    return out


def generate() -> list[Example]:
    """All 20,910 SCAN commands with their action sequences, in a fixed order.

    Returns:
        ``[(command, actions), ...]``, both space-separated.

    Example:
        >>> data = generate()
        >>> len(data), dict(data)["jump around left twice"].count("I_JUMP")
        (20910, 8)
    """
    s = _s_phrases()
    out = [(text, " ".join(acts)) for text, acts in s]
    for t1, a1 in s:
        for t2, a2 in s:
            out.append((f"{t1} and {t2}", " ".join(a1 + a2)))
            out.append((f"{t1} after {t2}", " ".join(a2 + a1)))
    return out


def _contains(command: str, phrase: str) -> bool:
    return f" {phrase} " in f" {command} "


def split(examples: Sequence[Example], name: str, *, seed: int = 0) -> tuple[list[Example], list[Example]]:
    """The (train, test) examples of one of the standard splits.

    Args:
        examples: the full set, as from `generate`.
        name: "simple", "length", "addprim_jump" or "addprim_turn_left".
        seed: the random draw of the simple split.

    Returns:
        (train, test) lists; the add-primitive training sets repeat the primitive alone.

    Raises:
        InvalidParameterError: an unknown split name.

    Example:
        >>> train, test = split(generate(), "addprim_jump")
        >>> len(train), len(test), train.count(("jump", "I_JUMP"))
        (14670, 7706, 1467)
    """
    if name == "simple":
        order = np.random.RandomState(seed).permutation(len(examples))
        n_test = round(0.2 * len(examples))
        return [examples[i] for i in sorted(order[n_test:])], [examples[i] for i in sorted(order[:n_test])]
    if name == "length":
        short = [len(a.split()) <= LENGTH_THRESHOLD for _, a in examples]
        return [e for e, s in zip(examples, short) if s], [e for e, s in zip(examples, short) if not s]
    if name in ("addprim_jump", "addprim_turn_left"):
        phrase = name.removeprefix("addprim_").replace("_", " ")
        alone = [e for e in examples if e[0] == phrase]
        test = [e for e in examples if _contains(e[0], phrase) and e[0] != phrase]
        other = [e for e in examples if not _contains(e[0], phrase)]
        return other + alone * (len(other) // 9), test
    raise InvalidParameterError(f"unknown SCAN split {name!r}; choose one of {', '.join(SPLITS)}")


@dataclass(frozen=True)
class Vocab:
    """Word ids of commands and actions.

    Command id ``len(commands)`` ends every command (the paper's encoder reads an EOS after the last word); action id
    ``len(actions)`` is both end-of-sequence and start-of-sequence for the decoder.
    """

    commands: tuple[str, ...] = COMMAND_WORDS
    actions: tuple[str, ...] = ACTIONS

    @property
    def eos(self) -> int:
        return len(self.actions)

    @property
    def src_eos(self) -> int:
        """The command-side end-of-sequence id."""
        return len(self.commands)

    @property
    def n_in(self) -> int:
        """Input classes: the command words and EOS."""
        return len(self.commands) + 1

    @property
    def n_out(self) -> int:
        """Output classes: the actions and EOS."""
        return len(self.actions) + 1

    def token_names(self) -> list[str]:
        return [*self.actions, "EOS"]


@dataclass(frozen=True)
class Encoded:
    """A padded batch of examples.

    Attributes:
        src: (N, T_in) command word ids, padded with 0 (ignored beyond ``src_len``).
        src_len: (N,) command lengths.
        tgt: (N, T_out) action ids followed by EOS, padded with -1 (the loss ignores -1).
    """

    src: torch.Tensor
    src_len: torch.Tensor
    tgt: torch.Tensor


def encode(examples: Sequence[Example], vocab: Vocab = Vocab(), *, max_in: int = 10, max_out: int = 49) -> Encoded:
    """Word ids of ``examples``, padded to ``max_in`` command words and ``max_out`` actions (both incl. EOS).

    The defaults fit every SCAN command (at most 9 words + EOS, 48 actions + EOS), so all splits share one shape.

    Raises:
        InvalidParameterError: an example is longer than the padding.
    """
    cmd_ids = {w: i for i, w in enumerate(vocab.commands)}
    act_ids = {w: i for i, w in enumerate(vocab.actions)}
    n = len(examples)
    src = np.zeros((n, max_in), dtype=np.int64)
    src_len = np.zeros(n, dtype=np.int64)
    tgt = np.full((n, max_out), -1, dtype=np.int64)
    for i, (command, actions) in enumerate(examples):
        words, acts = command.split(), actions.split()
        if len(words) + 1 > max_in or len(acts) + 1 > max_out:
            raise InvalidParameterError(
                f"example {command!r} is longer than the padding ({max_in - 1} words, {max_out - 1} actions)")
        src[i, : len(words) + 1] = [cmd_ids[w] for w in words] + [vocab.src_eos]
        src_len[i] = len(words) + 1
        tgt[i, : len(acts)] = [act_ids[a] for a in acts]
        tgt[i, len(acts)] = vocab.eos
    return Encoded(torch.from_numpy(src), torch.from_numpy(src_len), torch.from_numpy(tgt))
