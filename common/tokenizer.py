"""A CLIP-format BPE tokenizer built offline, for the built-in tiny base model.

CLIP's tokenizer is byte-level BPE with an end-of-word marker ``</w>``: its vocabulary is
the 256 byte symbols, the same 256 with ``</w>``, then one entry per merge, then
``<|startoftext|>`` and ``<|endoftext|>``. We learn the merges ourselves (a small, deterministic
BPE trainer; the ``tokenizers`` trainer breaks ties in hash order, which differs between
processes, and so would the base fingerprint) from a fixed word list (so every listed word, class words included, is ONE token) and hand vocabulary and
merges to ``transformers.CLIPTokenizer``. The result saves and loads like any CLIP
tokenizer, so a tiny model folder is an ordinary diffusers folder.
"""

from __future__ import annotations

import functools
import heapq
from collections import Counter, defaultdict

from transformers import CLIPTokenizer

# Words every prompt template, class list and test uses. Class words of the DreamBooth
# subjects, people, and the vocabulary of the DreamBooth prompt lists are all here.
CLASS_WORDS = [
    "backpack",
    "bowl",
    "can",
    "candle",
    "cat",
    "clock",
    "sneaker",
    "dog",
    "boot",
    "toy",
    "glasses",
    "teapot",
    "vase",
    "cartoon",
    "stuffed",
    "animal",
    "plushie",
    "bear",
    "sloth",
    "wolf",
    "duck",
    "robot",
    "car",
    "emoji",
    "sunglasses",
    "man",
    "woman",
    "girl",
    "boy",
    "person",
    "people",
    "child",
    "baby",
    "face",
]

PROMPT_WORDS = [
    "a",
    "an",
    "the",
    "of",
    "in",
    "on",
    "at",
    "with",
    "and",
    "or",
    "to",
    "for",
    "from",
    "by",
    "wearing",
    "photo",
    "picture",
    "image",
    "painting",
    "drawing",
    "sketch",
    "portrait",
    "close",
    "up",
    "shot",
    "view",
    "style",
    "render",
    "of",
    "top",
    "front",
    "side",
    "back",
    "left",
    "right",
    "middle",
    "center",
    "background",
    "foreground",
    "jungle",
    "snow",
    "beach",
    "cobblestone",
    "street",
    "pink",
    "fabric",
    "wooden",
    "floor",
    "city",
    "mountain",
    "blue",
    "house",
    "purple",
    "rug",
    "forest",
    "wheat",
    "field",
    "tree",
    "autumn",
    "leaves",
    "eiffel",
    "tower",
    "floating",
    "water",
    "ocean",
    "milk",
    "green",
    "grass",
    "sunflowers",
    "around",
    "it",
    "mirror",
    "sidewalk",
    "crowded",
    "dirt",
    "road",
    "white",
    "red",
    "shiny",
    "wet",
    "cube",
    "shaped",
    "hat",
    "santa",
    "rainbow",
    "scarf",
    "black",
    "monocle",
    "chef",
    "outfit",
    "firefighter",
    "police",
    "yellow",
    "shirt",
    "wizard",
    "orange",
    "brown",
    "gray",
    "grey",
    "gold",
    "silver",
    "colorful",
    "dark",
    "light",
    "bright",
    "small",
    "big",
    "large",
    "tiny",
    "huge",
    "old",
    "young",
    "cute",
    "happy",
    "sitting",
    "standing",
    "lying",
    "running",
    "walking",
    "playing",
    "sleeping",
    "looking",
    "holding",
    "room",
    "table",
    "chair",
    "sofa",
    "bed",
    "kitchen",
    "garden",
    "park",
    "sky",
    "sun",
    "moon",
    "night",
    "day",
    "sunset",
    "sunrise",
    "river",
    "lake",
    "sea",
    "sand",
    "rock",
    "stone",
    "desert",
    "hill",
    "field",
    "flower",
    "flowers",
    "bush",
    "cloud",
    "clouds",
    "rain",
    "fog",
    "mist",
    "star",
    "stars",
    "space",
    "planet",
    "castle",
    "bridge",
    "building",
    "car",
    "window",
    "door",
    "wall",
    "high",
    "quality",
    "detailed",
    "realistic",
    "photorealistic",
    "best",
    "masterpiece",
    "lowres",
    "blurry",
    "ugly",
    "bad",
    "worst",
    "deformed",
    "cropped",
    "jpeg",
    "artifacts",
    "watermark",
    "text",
    "signature",
    "two",
    "three",
    "many",
    "together",
    "next",
    "is",
    "are",
    "very",
    "its",
    "their",
    "his",
    "her",
    "them",
    "this",
    "that",
]

SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")


@functools.lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible map of the 256 byte values to printable characters."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def default_words() -> list[str]:
    """The tiny tokenizer's whole-word vocabulary, deduplicated, in a fixed order."""
    return list(dict.fromkeys(CLASS_WORDS + PROMPT_WORDS))


def _merge_word(seq: list[str], pair: tuple[str, str]) -> list[str]:
    out, i = [], 0
    while i < len(seq):
        if i + 1 < len(seq) and (seq[i], seq[i + 1]) == pair:
            out.append(seq[i] + seq[i + 1])
            i += 2
        else:
            out.append(seq[i])
            i += 1
    return out


def _pairs(seq: list[str]) -> Counter:
    return Counter(zip(seq, seq[1:], strict=False))


def train_bpe(words: tuple[str, ...]) -> list[tuple[str, str]]:
    """Byte-pair merges, most frequent pair first, ties broken by the pair itself.

    Every word counts once; training runs until each word is a single symbol, so each
    word of ``words`` tokenizes to one token. Deterministic (no hash order is involved):
    the same words give the same merges in every process.
    """
    seqs = [list(w[:-1]) + [w[-1] + "</w>"] for w in words]
    counts: Counter = Counter()
    where: dict[tuple[str, str], set[int]] = defaultdict(set)
    for i, seq in enumerate(seqs):
        for pair, n in _pairs(seq).items():
            counts[pair] += n
            where[pair].add(i)
    heap = [(-n, pair) for pair, n in counts.items()]
    heapq.heapify(heap)
    merges = []
    while heap:
        neg, pair = heapq.heappop(heap)
        if counts.get(pair, 0) != -neg or neg == 0:
            continue  # a stale heap entry
        merges.append(pair)
        for i in sorted(where.pop(pair)):
            old = seqs[i]
            new = _merge_word(old, pair)
            for p, n in _pairs(old).items():
                counts[p] -= n
                if p != pair:
                    heapq.heappush(heap, (-counts[p], p))
            for p, n in _pairs(new).items():
                counts[p] += n
                where[p].add(i)
                heapq.heappush(heap, (-counts[p], p))
            seqs[i] = new
        counts.pop(pair, None)
    return merges


@functools.lru_cache(maxsize=4)
def learn_clip_bpe(words: tuple[str, ...]) -> tuple[dict[str, int], tuple[str, ...]]:
    """Learn BPE merges so that each word of ``words`` becomes one token.

    Returns CLIP's ``(vocab, merges)``. Deterministic: the same words give the same files.
    """
    byte_chars = list(_bytes_to_unicode().values())
    merges = tuple(f"{a} {b}" for a, b in train_bpe(tuple(w.lower() for w in words)))
    vocab_list = byte_chars + [c + "</w>" for c in byte_chars]
    seen = set(vocab_list)
    kept = []
    for merge in merges:
        token = merge.replace(" ", "")
        if token not in seen:  # a merge that rebuilds a byte symbol adds nothing
            seen.add(token)
            vocab_list.append(token)
            kept.append(merge)
    vocab_list += list(SPECIAL_TOKENS)
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    return vocab, tuple(kept)


def build_tiny_tokenizer(
    words: list[str] | None = None, model_max_length: int = 77
) -> CLIPTokenizer:
    """A CLIP tokenizer whose vocabulary has every word of ``words`` as a whole token."""
    vocab, merges = learn_clip_bpe(tuple(words or default_words()))
    return CLIPTokenizer(
        vocab=dict(vocab),
        merges=[tuple(m.split(" ")) for m in merges],
        model_max_length=model_max_length,
    )
