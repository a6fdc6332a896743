"""Turning prompt strings (and images) into padded token batches, keeping each token's
label and kind.

Batches are padded on the right. In a causal model a token never attends to later
positions, so right padding leaves every real token's hidden states exactly as they are
in an unpadded run, and absolute positions (GPT-2) stay right. The attention mask marks
padding, and probes use it to keep padding out of every result.

A vision-language model's processor turns a prompt and its image into tokens: the image
becomes a run of image tokens in the prompt (they count against the model's position
limit), and the pixels travel beside the tokens as the processor's other tensors
(``pixel_values``, ``image_grid_thw``, ...), which go with each batch into the trace.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from probescope.errors import InputError
from probescope.tokens import clean_token
from probescope.lazy_imports import lazy_import

np = lazy_import("numpy")
torch = lazy_import("torch")


#: Longest side of the thumbnail a token dataset keeps of each prompt's image, in pixels.
THUMBNAIL_SIDE = 128

#: What each token is, as ``token_kind`` labels it: ordinary text, one of the tokens an
#: image becomes, or another added or special token (BOS, Idefics3's
#: ``<fake_token_around_image>``, Qwen's ``<|vision_start|>``).
TOKEN_KINDS = ("text", "image", "special")


@dataclass(frozen=True)
class Image:
    """An image file named in ``[inputs] images``, read and checked before any model loads."""

    name: str  # as written in the config
    path: Path
    pixels: Any = field(compare=False, repr=False)  # a PIL image in RGB

    def thumbnail(self, side: int = THUMBNAIL_SIDE) -> np.ndarray:
        """The image shrunk to at most ``side`` pixels a side (aspect kept), as
        ``(height, width, 3)`` uint8: small enough to keep in every token dataset."""
        small = self.pixels.copy()
        small.thumbnail((side, side))
        return np.asarray(small.convert("RGB"), dtype=np.uint8)


def read_images(names: Sequence[str], base_dir: Path) -> tuple[list[Image | None], list[tuple[int, str]]]:
    """Open every named image (relative to ``base_dir``); ``""`` stands for no image.

    :returns: one :class:`Image` or None per name, and ``(index, message)`` for every
        file that is missing, unreadable or not an image, all of them at once.
    """
    from PIL import Image as PILImage
    from PIL import UnidentifiedImageError

    images: list[Image | None] = []
    problems: list[tuple[int, str]] = []
    for i, name in enumerate(names):
        if not name.strip():
            images.append(None)
            continue
        path = (base_dir / Path(name).expanduser()).resolve()
        try:
            with PILImage.open(path) as handle:
                handle.load()
                pixels = handle.convert("RGB")
        except FileNotFoundError:
            problems.append((i, f"no image file at {str(path)!r}"))
        except IsADirectoryError:
            problems.append((i, f"{str(path)!r} is a folder; expected an image file"))
        except UnidentifiedImageError:
            problems.append((i, f"{str(path)!r} is not an image file Pillow can read (PNG, JPEG, ...)"))
        except (OSError, ValueError) as exc:
            problems.append((i, f"cannot read the image {str(path)!r}: {exc}"))
        else:
            images.append(Image(name, path, pixels))
            continue
        images.append(None)
    return images, problems


@dataclass(frozen=True)
class Prompt:
    """One input text as one model's tokenizer splits it."""

    index: int
    text: str
    token_ids: tuple[int, ...]
    tokens: tuple[str, ...]  # human-readable label of each token
    kinds: tuple[str, ...] = ()  # each token's kind, one of TOKEN_KINDS
    image: Image | None = None
    model_text: str = ""  # what the processor was given: chat template and image placeholder applied
    prefix: int = 0  # leading tokens that attend to each other both ways (PaliGemma's image + prefix)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def n_image_tokens(self) -> int:
        return self.kinds.count("image")


@dataclass
class Batch:
    """Prompts padded to one length, ready for a forward pass."""

    prompts: list[Prompt]
    input_ids: torch.Tensor  # (batch, token), long
    attention_mask: torch.Tensor  # (batch, token), long, 1 for real tokens
    #: the processor's other tensors (pixel_values, image_grid_thw, token_type_ids, ...),
    #: passed to the model's forward by keyword
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def mask(self) -> torch.Tensor:
        """``(batch, token)`` bool, True for real tokens (made once per batch: every
        reduction of the pass asks for it)."""
        return self._once("_mask", self.attention_mask, self.attention_mask.bool)

    @property
    def prefix_mask(self) -> torch.Tensor:
        """``(batch, token)`` bool, True for tokens of a bidirectional prefix (they also
        attend to later tokens of the prefix); all False in a causal model. Made once per
        batch (on a GPU, each row written is a kernel launch)."""

        def make() -> torch.Tensor:
            out = torch.zeros(self.input_ids.shape, dtype=torch.bool, device=self.input_ids.device)
            for row, prompt in enumerate(self.prompts):
                if prompt.prefix:
                    out[row, : prompt.prefix] = True
            return out

        return self._once("_prefix", self.input_ids, make)

    def _once(self, name: str, source: torch.Tensor, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``make()``, kept for this batch under ``name``; made again if ``source`` (the
        tensor it is made from) was replaced."""
        of, value = self.__dict__.get(name, (None, None))
        if of is not source:
            value = make()
            self.__dict__[name] = (source, value)
        return value

    @property
    def has_prefix(self) -> bool:
        """Whether any prompt of the batch has a bidirectional prefix (else no token
        attends to a later one)."""
        return any(prompt.prefix for prompt in self.prompts)

    @property
    def lengths(self) -> torch.Tensor:
        """Number of real tokens in each prompt, ``(batch,)``."""
        return self.attention_mask.sum(dim=1)


def token_label(tokenizer: Any, token_id: int) -> str:
    """How a token reads to a person: its decoded text, else its vocabulary entry with
    the tokenizer's markers cleaned (a byte token or part of a UTF-8 character as
    ``\\xe2`` escapes, see :func:`probescope.tokens.clean_token`)."""
    text = tokenizer.decode([token_id])
    if text == "" or "\ufffd" in text:
        text = clean_token(str(tokenizer.convert_ids_to_tokens(token_id)), vocabulary_entry=True)
    return str(text)


def tokenize(tokenizer: Any, texts: Sequence[str], *, model_name: str = "model") -> list[Prompt]:
    """Tokenize each text on its own (special tokens as the tokenizer adds them).

    Lengths are not checked here: the runner checks every prompt against each model's
    longest input and reports all that are too long at once.

    :raises InputError: a text has no tokens at all.
    """
    prompts = []
    labels: dict[int, str] = {}  # a token's label does not depend on its prompt: decode each id once
    for index, text in enumerate(texts):
        ids = tuple(int(i) for i in tokenizer(text)["input_ids"])
        if not ids:
            raise InputError(f"model {model_name!r}: prompt {index} ({text!r}) has no tokens")
        for i in ids:
            if i not in labels:
                labels[i] = token_label(tokenizer, i)
        prompts.append(Prompt(index, text, ids, tuple(labels[i] for i in ids), token_kinds(tokenizer, ids)))
    return prompts


def token_kinds(tokenizer: Any, ids: Sequence[int], image_token_id: int | None = None) -> tuple[str, ...]:
    """Each token's kind: ``image`` for the model's image token, ``special`` for the
    tokenizer's special and added tokens, ``text`` for the rest."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    special |= set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    return tuple("image" if i == image_token_id else "special" if i in special else "text" for i in ids)


#: How a prompt marks where its image goes, when the model's placeholder is more than
#: the processor's image token (which the processor then expands into the image's tokens).
_IMAGE_PLACEHOLDERS = {
    "qwen2_vl": "<|vision_start|>{}<|vision_end|>",
    "qwen2_5_vl": "<|vision_start|>{}<|vision_end|>",
}


def model_text(processor: Any, text: str, image: Image | None, *, chat_template: bool, model_type: str) -> str:
    """The text a vision-language processor is given for one prompt.

    With ``chat_template``, one user turn holding the image (if any) and the prompt, in
    the processor's chat template, ending where the assistant's answer would begin.
    Without it, the prompt as written, with the model's image placeholder in front when
    the prompt has an image and does not place it itself.

    :raises InputError: the chat template is asked for but the processor has none.
    """
    if chat_template:
        if not getattr(processor, "chat_template", None):
            raise InputError("the processor has no chat template; set chat_template = false to use "
                             "the prompt as written")
        content = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": text}]
        return processor.apply_chat_template([{"role": "user", "content": content}],
                                             add_generation_prompt=True, tokenize=False)
    token = processor.image_token
    if image is not None and token not in text:
        return _IMAGE_PLACEHOLDERS.get(model_type, "{}").format(token) + text
    return text


def _encode(processor: Any, texts: Sequence[str], images: Sequence[Image | None], **kwargs: Any) -> Any:
    """The processor's tensors for prompts and their images (a list per prompt, empty
    for a text-only prompt; no images at all when none has one)."""
    pixels = [[image.pixels] if image is not None else [] for image in images]
    return processor(text=list(texts), images=pixels if any(pixels) else None, return_tensors="pt", **kwargs)


def process(
    processor: Any, texts: Sequence[str], images: Sequence[Image | None], *, chat_template: bool,
    model_type: str, image_token_id: int | None, bidirectional_prefix: bool = False,
) -> tuple[list[Prompt], list[tuple[int, str]]]:
    """Prompts (and their images) through a vision-language model's processor, each on
    its own: the tokens the model will see, image tokens included.

    :param bidirectional_prefix: the model lets the leading tokens with
        ``token_type_ids == 0`` (image and prompt) attend both ways (PaliGemma).
    :returns: the prompts, and ``(index, message)`` for every prompt that cannot be
        processed, all at once.
    """
    prompts: list[Prompt] = []
    problems: list[tuple[int, str]] = []
    token = getattr(processor, "image_token", None)
    for index, text in enumerate(texts):
        image = images[index] if index < len(images) else None
        if image is None and token and token in text:
            problems.append((index, f"the prompt holds the image token {token!r} but has no image; "
                                    "give its file in images at the same position"))
            continue
        try:
            given = model_text(processor, text, image, chat_template=chat_template, model_type=model_type)
            encoded = _encode(processor, [given], [image])
        except Exception as exc:
            problems.append((index, f"the processor cannot take this prompt: {type(exc).__name__}: {exc}"))
            continue
        ids = tuple(int(i) for i in encoded["input_ids"][0])
        if not ids:
            problems.append((index, "the prompt has no tokens"))
            continue
        prefix = 0
        if bidirectional_prefix and "token_type_ids" in encoded:
            types = encoded["token_type_ids"][0].tolist() + [1]
            prefix = types.index(next(t for t in types if t != 0))
        tokenizer = processor.tokenizer
        prompts.append(Prompt(
            index, text, ids, tuple(token_label(tokenizer, i) for i in ids),
            token_kinds(tokenizer, ids, image_token_id), image, given, prefix,
        ))
    return prompts, problems


def processed_batches(
    processor: Any, prompts: Sequence[Prompt], batch_size: int, *, device: Any = "cpu", dtype: Any = None,
    sort: bool = False,
) -> list[Batch]:
    """Group prompts into right-padded batches through the processor (in order or, with
    ``sort``, by length: :func:`groups`), so that each batch carries the processor's other
    tensors; floating ones (pixels) are cast to the model's ``dtype``.

    :raises InputError: the processor tokenized a prompt differently in a batch than alone.
    """
    tokenizer = processor.tokenizer
    own_pad = tokenizer.pad_token
    if own_pad is None:  # padding is masked out: any token will do
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    try:
        out = []
        for group in groups(prompts, batch_size, sort=sort):
            encoded = dict(_encode(processor, [p.model_text for p in group], [p.image for p in group],
                                   padding=True, padding_side="right"))
            ids, mask = encoded.pop("input_ids"), encoded.pop("attention_mask")
            encoded.pop("labels", None)
            for row, prompt in enumerate(group):
                n = len(prompt)
                if ids[row, :n].tolist() != list(prompt.token_ids) or int(mask[row].sum()) != n:
                    raise InputError(f"prompt {prompt.index}: the processor gave other tokens in a batch "
                                     "than alone; set batch_size = 1")
            extras = {key: value.to(device=device, dtype=dtype if value.is_floating_point() and dtype else None)
                      for key, value in encoded.items() if isinstance(value, torch.Tensor)}
            out.append(Batch(group, ids.to(device), mask.to(device), extras))
        return out
    finally:
        tokenizer.pad_token = own_pad


def by_length(prompts: Sequence[Prompt]) -> list[Prompt]:
    """``prompts`` longest first (prompts of one length in their own order), so that each
    batch holds prompts of about one length and pads little. Longest first also puts the
    largest batch first: later, smaller batches fit in the memory it freed."""
    return sorted(prompts, key=lambda p: -len(p))


def groups(prompts: Sequence[Prompt], batch_size: int, *, sort: bool = False) -> list[list[Prompt]]:
    """The prompts of each batch: in the given order, or with ``sort`` by length
    (:func:`by_length`); each :class:`Prompt` keeps its ``index`` in the user's order."""
    ordered = by_length(prompts) if sort else list(prompts)
    return [ordered[start : start + batch_size] for start in range(0, len(ordered), batch_size)]


def batches(
    prompts: Sequence[Prompt], batch_size: int, *, pad_id: int = 0, device: Any = "cpu", sort: bool = False,
) -> list[Batch]:
    """Group prompts into right-padded batches of at most ``batch_size``, in order or,
    with ``sort``, by length (:func:`groups`)."""
    out = []
    for group in groups(prompts, batch_size, sort=sort):
        width = max(len(p) for p in group)
        ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for row, prompt in enumerate(group):
            ids[row, : len(prompt)] = torch.tensor(prompt.token_ids)
            mask[row, : len(prompt)] = 1
        out.append(Batch(group, ids.to(device), mask.to(device)))
    return out


def pad_id_of(tokenizer: Any) -> int:
    """An id to fill padding with. Its value never matters: padding is masked out."""
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return 0


def token_kind_codes(prompts: Sequence[Prompt], width: int) -> np.ndarray:
    """``(prompt, token)`` int8 codes of each token's kind (index in :data:`TOKEN_KINDS`),
    -1 on padding: the values of a CF flag variable."""
    codes = np.full((len(prompts), width), -1, dtype=np.int8)
    for row, prompt in enumerate(prompts):
        codes[row, : len(prompt.kinds)] = [TOKEN_KINDS.index(kind) for kind in prompt.kinds]
    return codes


def thumbnails(prompts: Sequence[Prompt]) -> tuple[np.ndarray, np.ndarray] | None:
    """Every prompt's image thumbnail, padded to one size: ``(prompt, row, column, 3)``
    uint8 and each thumbnail's ``(height, width)`` (0, 0 without an image); None when no
    prompt has an image."""
    small = [p.image.thumbnail() if p.image is not None else None for p in prompts]
    if all(t is None for t in small):
        return None
    rows = max(t.shape[0] for t in small if t is not None)
    cols = max(t.shape[1] for t in small if t is not None)
    pixels = np.zeros((len(prompts), rows, cols, 3), dtype=np.uint8)
    sizes = np.zeros((len(prompts), 2), dtype=np.int64)
    for i, t in enumerate(small):
        if t is not None:
            pixels[i, : t.shape[0], : t.shape[1]] = t
            sizes[i] = t.shape[:2]
    return pixels, sizes
