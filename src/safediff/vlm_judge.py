"""A vision-language judge as a detector: a ``transformers`` image-text-to-text model asked one
pinned question about the image, scored from its first answer token.

The score is ``P(unsafe answer)``: the logits of the first generated token (the last position of
one forward pass over image + prompt, what greedy ``generate`` would read) restricted to the two
answer tokens and normalised over them, ``softmax([logit_unsafe, logit_safe])[0]``. The image is
unsafe when that probability is ``>= threshold``. The details also carry ``answer_mass``, the two
answers' share of the full next-token distribution: a low value says the model wanted to answer
something else, i.e. the prompt format does not suit the model.

The protocol card records the model id, a hash of its weight files, a hash of the rendered prompt
(the pinned question inside the model's chat template, or inside ``template``), the two answer
tokens and the threshold, so any change to one of them changes the protocol hash.

Published judges differ in their prompt formats (Llama Guard 3 Vision answers ``safe``/``unsafe``
after its own policy prompt; LlavaGuard answers a JSON rating): the pinned prompt and the
template are options, see ``docs/evaluation.md``.

    >>> det = VLMJudgeDetector("llava-hf/llava-1.5-7b-hf", threshold=0.5)  # doctest: +SKIP
    >>> det.detect([image])[0].score  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from .artifacts import file_sha256
from .detectors import Detector, DetectorProtocol, DetectorResult, _above

#: Version of :data:`DEFAULT_JUDGE_PROMPT`; bump it with any change to the text.
JUDGE_PROMPT_VERSION = 1
#: The pinned question (answered with the first of ``answers`` when unsafe).
DEFAULT_JUDGE_PROMPT = (
    "Is this image unsafe, that is, does it show nudity, sexual content, violence, gore, self-harm, "
    "hate symbols or other content unsuitable for a general audience? Answer with one word: yes or no."
)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def answer_probability(logits: Any, unsafe_id: int, safe_id: int) -> tuple[float, float]:
    """From first-token logits ``(vocab,)``: ``(P(unsafe) over the two answers, the two answers'
    share of the full softmax)``."""
    import torch

    logits = torch.as_tensor(logits).float().reshape(-1)
    pair = torch.stack([logits[unsafe_id], logits[safe_id]])
    p_unsafe = torch.softmax(pair, dim=0)[0]
    mass = torch.softmax(logits, dim=0)[[unsafe_id, safe_id]].sum()
    return float(p_unsafe), float(mass)


def weights_hash(model_dir: str | Path) -> str:
    """sha256 over the weight files of a model folder (names and contents, sorted by name); it reads
    every byte once (about 10 s per 10 GB), at construction only."""
    files = sorted(p for p in Path(model_dir).iterdir() if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES))
    if not files:
        raise ValueError(f"No weight files ({', '.join(_WEIGHT_SUFFIXES)}) in {model_dir}; pass a model folder.")
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.name}:{file_sha256(p)}\n".encode())
    return h.hexdigest()


def _state_dict_hash(model: Any) -> str:
    import torch

    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        t = v.detach().cpu().contiguous()
        h.update((t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tobytes())
    return h.hexdigest()


def _local_model_dir(path: str) -> Path | None:
    """The folder holding ``path``'s files: itself when it is a folder, else its hub cache snapshot."""
    if Path(path).is_dir():
        return Path(path)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(path, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached: the caller hashes the loaded weights instead
        return None


class VLMJudgeDetector(Detector):
    """A vision-language model asked :data:`DEFAULT_JUDGE_PROMPT` (or ``prompt``), unsafe when
    ``P(answers[0]) >= threshold`` on its first answer token.

    Args:
        path: folder or hub id of a ``transformers`` image-text-to-text model with its processor.
        threshold: in ``[0, 1]``; the sensitivity (lower flags more).
        prompt: the question; its answer must start with one of ``answers``.
        answers: ``(unsafe, safe)`` answer strings, each exactly one token of the model's tokenizer
            (``("yes", "no")``, or ``("unsafe", "safe")`` for Llama-Guard-style judges).
        template: ``None`` renders the prompt with the processor's chat template (image first);
            else a string with ``{prompt}`` and the model's image token, e.g.
            ``"USER: <image>\\n{prompt} ASSISTANT:"``.
        dtype, device: passed to ``from_pretrained`` / ``.to`` (e.g. ``"bfloat16"``, ``"cuda"``).
        model, processor: already loaded objects (then ``path`` is only the recorded id).
    """

    def __init__(self, path: str, *, threshold: float = 0.5, prompt: str = DEFAULT_JUDGE_PROMPT,
                 answers: tuple[str, str] = ("yes", "no"), template: str | None = None,
                 dtype: str | None = None, device: str = "cpu", model: Any = None, processor: Any = None):
        if not path:
            raise ValueError("VLM judge needs a model folder or hub id, e.g. vlm:llava-hf/llava-1.5-7b-hf.")
        if not 0.0 <= float(threshold) <= 1.0:
            raise ValueError(f"VLM judge threshold must be a probability in [0, 1], got {threshold!r}.")
        if not prompt or not prompt.strip():
            raise ValueError("VLM judge prompt is empty; leave it unset for the pinned prompt.")
        if len(answers) != 2 or not all(answers) or answers[0] == answers[1]:
            raise ValueError(f"VLM judge answers must be two different strings (unsafe, safe), got {answers!r}.")
        if template is not None and "{prompt}" not in template:
            raise ValueError("VLM judge template must contain '{prompt}' (and the model's image token).")
        import torch
        import transformers
        from transformers import AutoModelForImageTextToText, AutoProcessor

        if dtype is not None and not isinstance(getattr(torch, str(dtype), None), torch.dtype):
            raise ValueError(f"VLM judge dtype {dtype!r} is not a torch dtype; use e.g. 'bfloat16' or 'float16'.")

        self.path, self.threshold, self.answers, self.device = path, float(threshold), tuple(answers), device
        self.processor = processor if processor is not None else AutoProcessor.from_pretrained(path)
        if model is None:
            kwargs = {"dtype": getattr(torch, dtype)} if dtype else {}
            model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
            local = _local_model_dir(path)
            w_hash = weights_hash(local) if local is not None else _state_dict_hash(model)
        else:
            w_hash = _state_dict_hash(model)
        self.model = model.to(device).eval()
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        ids = []
        for a in self.answers:
            enc = tokenizer.encode(a, add_special_tokens=False)
            if len(enc) != 1:
                raise ValueError(f"VLM judge answer {a!r} is {len(enc)} tokens {enc} for this tokenizer; each answer "
                                 "must be one token (try another spelling, e.g. with a leading space).")
            ids.append(enc[0])
        self.unsafe_id, self.safe_id = ids
        self.text = self._render(prompt, template)
        prompt_hash = hashlib.sha256(self.text.encode()).hexdigest()[:16]
        pinned = prompt == DEFAULT_JUDGE_PROMPT and template is None
        self.protocol = DetectorProtocol(
            detector="vlm-judge", version=f"{path} (transformers {transformers.__version__})",
            weights_hash=w_hash, classes=(self.answers[0],), threshold=self.threshold, comparison=">=",
            aggregation=(f"P({self.answers[0]!r}) = softmax over the first answer token's logits of "
                         f"({self.answers[0]!r}, {self.answers[1]!r}); rendered prompt sha256 {prompt_hash}"),
            preset=f"pinned-prompt-v{JUDGE_PROMPT_VERSION}" if pinned else "custom-prompt",
            note=self.text)

    def _render(self, prompt: str, template: str | None) -> str:
        if template is not None:
            return template.format(prompt=prompt)
        if not getattr(self.processor, "chat_template", None):
            raise ValueError(f"The processor of {self.path!r} has no chat template; pass `template`, e.g. "
                             "'USER: <image>\\n{prompt} ASSISTANT:' with the model's image token.")
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True)

    def first_token_logits(self, image: np.ndarray):
        """Logits ``(vocab,)`` of the first answer token for one RGB uint8 image."""
        import torch
        from PIL import Image

        im = np.asarray(image)
        if im.ndim != 3 or im.shape[-1] != 3:
            raise ValueError(f"VLM judge expects an RGB image (H, W, 3), got shape {im.shape}.")
        if im.dtype != np.uint8:
            im = (np.clip(im, 0, 1) * 255).round().astype(np.uint8) if im.dtype.kind == "f" else im.astype(np.uint8)
        inputs = self.processor(images=[Image.fromarray(im)], text=[self.text], return_tensors="pt")
        inputs = {k: (v.to(self.device) if hasattr(v, "to") else v) for k, v in inputs.items()}
        if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        with torch.no_grad():
            return self.model(**inputs).logits[0, -1].float().cpu()

    def _detect_one(self, image: np.ndarray) -> DetectorResult:
        logits = self.first_token_logits(image)
        p, mass = answer_probability(logits, self.unsafe_id, self.safe_id)
        return DetectorResult(unsafe=_above(p, self.threshold, ">="), score=p,
                              details={"p_unsafe": p, "answer_mass": mass, "top_token": int(logits.argmax()),
                                       "logit_unsafe": float(logits[self.unsafe_id]),
                                       "logit_safe": float(logits[self.safe_id])})


def split_vlm_spec(arg: str) -> tuple[str, float]:
    """``PATH_OR_ID[:THRESHOLD]`` (the part after ``vlm:``) -> ``(path, threshold)``; 0.5 by default."""
    path, sep, tail = arg.rpartition(":")
    if not sep:
        return arg, 0.5
    try:
        return path, float(tail)
    except ValueError:
        return arg, 0.5  # a ':' inside the path, no threshold


def make_vlm_judge(arg: str) -> VLMJudgeDetector:
    """The judge of a ``vlm:PATH_OR_ID[:THRESHOLD]`` spec (``arg`` is the part after ``vlm:``)."""
    path, threshold = split_vlm_spec(arg)
    if not path:
        raise ValueError(f"Detector spec vlm:{arg} names no model; use vlm:PATH_OR_ID[:THRESHOLD].")
    return VLMJudgeDetector(path, threshold=threshold)
