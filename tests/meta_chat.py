"""Meta's reference tokenizer and chat format (llama-models, from PyPI), and a Llama 4 tokenizer.json
built from the tokenizer.model it ships, as the published HF tokenizer.json was.

    path = llama4_tokenizer_json(tmp_dir)     # 202,048 tokens: Meta's BPE ranks + 2,048 specials
    ids = meta_dialog_ids(messages)           # ChatFormat.encode_dialog_prompt(...).tokens
"""
from __future__ import annotations

import functools
import importlib.util
import sys
import types
from pathlib import Path

from llama_models.datatypes import RawMessage, StopReason
from llama_models.llama4.tokenizer import Tokenizer as MetaTokenizer

STUBS = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")


def _import_chat_format():
    """chat_format.py imports torchvision for its image transforms, which text dialogues never
    reach (they are built only with vision args). torchvision is no dependency of this project
    (its wheels pin a CUDA torch build), so where it is absent, empty modules stand in for it
    during this import only (any use of them would fail loudly) and are removed after it, so
    that nothing else (transformers) mistakes them for torchvision."""
    if importlib.util.find_spec("torchvision") is not None:
        from llama_models.llama4 import chat_format
        return chat_format
    for name in STUBS:
        sys.modules[name] = types.ModuleType(name)
    sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
    sys.modules["torchvision.transforms"].functional = sys.modules[STUBS[2]]
    try:
        from llama_models.llama4 import chat_format
        return chat_format
    finally:
        for name in STUBS:
            del sys.modules[name]


ChatFormat = _import_chat_format().ChatFormat


@functools.cache
def meta_tokenizer() -> MetaTokenizer:
    return MetaTokenizer.get_instance()


def llama4_tokenizer_json(directory: Path) -> Path:
    """transformers' TikToken converter over Meta's tokenizer.model, with the BOS-prepending
    post-processor of the published tokenizer.json."""
    from tokenizers import processors
    from transformers.convert_slow_tokenizer import TikTokenConverter
    import llama_models.llama4.tokenizer as meta_module
    meta = meta_tokenizer()
    tk = TikTokenConverter(vocab_file=str(Path(meta_module.__file__).parent / "tokenizer.model"),
                           pattern=MetaTokenizer.O200K_PATTERN,
                           extra_special_tokens=list(meta.special_tokens)).converted()
    bos = "<|begin_of_text|>"
    tk.post_processor = processors.TemplateProcessing(single=f"{bos} $A",
                                                      special_tokens=[(bos, meta.bos_id)])
    path = Path(directory) / "tokenizer.json"
    tk.save(str(path))
    return path


def meta_dialog_ids(messages: list[dict]) -> list[int]:
    """Meta's ids for our message dicts (our role "ipython" is Meta's "tool")."""
    fmt = ChatFormat(meta_tokenizer())
    raw = [RawMessage(role="tool" if m["role"] == "ipython" else m["role"], content=m["content"],
                      stop_reason=StopReason(m["stop_reason"]) if "stop_reason" in m else None)
           for m in messages]
    return list(fmt.encode_dialog_prompt(raw).tokens)
