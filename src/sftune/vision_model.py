"""Image-text-to-text models: is a directory one, its processor (image-only where video cannot load).

``AutoProcessor`` of some models (Qwen2-VL in transformers 5.x) insists on a video processor that
needs torchvision; a CPU-only install without torchvision (or with a torchvision that does not
import beside the installed torch) cannot build it. sftune trains images, not videos, so
:func:`load_processor` falls back to the image-only processor: the model's image processor (its
PIL backend where the torchvision one is unavailable), the tokenizer and the chat template, put
together in the model's processor class with no video processor.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

log = logging.getLogger("sftune")

IMAGE_TEXT_TO_TEXT = "image-text-to-text"


def is_vision_config(config) -> bool:
    """True when ``config`` is a model ``AutoModelForImageTextToText`` loads (it has a vision part)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return (getattr(config, "vision_config", None) is not None
            and getattr(config, "model_type", None) in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)


@contextlib.contextmanager
def _video_optional():
    """While building a processor: a missing (``None``) video processor is accepted."""
    from transformers.processing_utils import ProcessorMixin

    original = ProcessorMixin.check_argument_for_proper_class

    def check(self, name, arg):
        if arg is None and "video" in name:
            return None
        return original(self, name, arg)

    ProcessorMixin.check_argument_for_proper_class = check
    try:
        yield
    finally:
        ProcessorMixin.check_argument_for_proper_class = original


def _processor_class(path: Path, config):
    import transformers
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    settings = {}
    if (path / "processor_config.json").is_file():
        settings = json.loads((path / "processor_config.json").read_text())
    name = settings.pop("processor_class", None) or PROCESSOR_MAPPING_NAMES.get(config.model_type)
    if not name or not hasattr(transformers, name):
        raise ValueError(f"no processor class known for model type {config.model_type!r}")
    return getattr(transformers, name), settings


def _image_only(path: str, **image_kwargs):
    """The model's processor class over its image processor and tokenizer, no video processor."""
    import inspect

    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

    root = Path(path)
    config = AutoConfig.from_pretrained(path)
    cls, settings = _processor_class(root, config)
    image_processor = AutoImageProcessor.from_pretrained(path, **image_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path)
    template = root / "chat_template.jinja"
    chat_template = template.read_text() if template.is_file() else getattr(tokenizer, "chat_template", None)
    accepted = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in settings.items() if k in accepted and k not in ("image_processor", "tokenizer")}
    if "video_processor" in accepted:
        kwargs["video_processor"] = None
    with _video_optional():
        return cls(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template, **kwargs)


def load_processor(path: str, **image_kwargs):
    """The processor of the image-text-to-text model at ``path``; ``image_kwargs`` go to its image processor.

    ``AutoProcessor`` first; when it fails for want of a video processor (torchvision), the
    image-only processor (see the module docstring)."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(path, **image_kwargs)
    except (ImportError, ValueError, TypeError, AttributeError, OSError) as e:
        if "torchvision" not in str(e).lower() and "video" not in str(e).lower():
            raise
        log.info("processor of %s: image-only (%s)", path, str(e).strip().splitlines()[0] if str(e).strip() else e)
    return _image_only(path, **image_kwargs)


def model_class(config):
    """The auto class that loads ``config``'s model: image-text-to-text, or a causal LM."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForImageTextToText if is_vision_config(config) else AutoModelForCausalLM


def attach_processor(path: str, tokenizer, *, revision=None, trust_remote_code: bool = False) -> bool:
    """For an image-text-to-text model at ``path``: load its processor around ``tokenizer`` (the
    one sftune trains with) and hang it on the tokenizer as ``sftune_processor``, where the data
    formats find it (with the format class, ``sftune_vision_format``). Returns whether the model is one."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    except Exception:  # noqa: BLE001 - the model loader reports a config it cannot read
        return False
    if not is_vision_config(config):
        return False
    processor = load_processor(path)
    _check_positions(config, processor)
    if getattr(processor, "chat_template", None) and not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = processor.chat_template
    from sftune.data.vision import VisionMessagesFormat

    processor.tokenizer = tokenizer
    tokenizer.sftune_processor = processor
    tokenizer.sftune_vision_format = VisionMessagesFormat  # what sftune.data.formats builds for messages
    return True


BIDIRECTIONAL_IMAGES = ("gemma3", "gemma3n", "paligemma")
"""Model types whose image tokens attend to each other both ways (a mask built from token_type_ids)."""


def _check_positions(config, processor) -> None:
    """Refused, rather than trained differently from inference: a model with multimodal rotary
    positions (M-RoPE) that sftune does not compute, and one whose image tokens attend both ways."""
    from sftune.data.vision import MROPE_PROCESSORS
    from sftune.errors import ConfigError

    if config.model_type in BIDIRECTIONAL_IMAGES:
        raise ConfigError(f"{config.model_type} attends bidirectionally within each image (token_type_ids), which "
                          "sftune does not lay out yet; this model cannot be trained on images by sftune yet")
    text = getattr(config, "text_config", None) or config
    rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}
    if isinstance(rope, dict) and rope.get("mrope_section") and type(processor).__name__ not in MROPE_PROCESSORS:
        raise ConfigError(f"{config.model_type} places image tokens with multimodal rotary positions (M-RoPE) that "
                          f"sftune computes only for {', '.join(MROPE_PROCESSORS)}; this model cannot be trained on "
                          "images by sftune yet")
