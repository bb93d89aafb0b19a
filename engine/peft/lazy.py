"""Importing peft without bitsandbytes when the run has no quantized base.

peft 0.21 imports bitsandbytes whenever it is installed (`peft/helpers.py`: `import bitsandbytes`), and
LoRA's layer dispatch imports it again when peft's `is_bnb_available()` says it is there. Importing
bitsandbytes runs torch.compile machinery at import (measured 1.3 s of every plain-LoRA start on this
machine) although a LoRA on a full-precision base never touches it.

`import_peft(bitsandbytes=False)` imports peft with bitsandbytes hidden (`sys.modules["bitsandbytes"] = None`
makes `import bitsandbytes` raise ImportError and `importlib.util.find_spec` return None, which peft handles as
"not installed") and leaves peft's `is_bnb_available` / `is_bnb_4bit_available` caches at False, so the
injection path does not import it either. Nothing else is hidden, and only while peft imports: trellis' own
8-bit optimizer (engine/optim.py) still imports bitsandbytes directly. `import_peft(bitsandbytes=True)` (a
quantized base: peft must wrap bnb's Linear4bit) afterwards, in the same process, clears those caches and hands
peft the module again, so a QLoRA run after a LoRA run in one Python session works.
"""

from __future__ import annotations

import contextlib
import sys

from trellis.errors import ConfigError

_state = {"hidden": False}  # True while peft's view of bitsandbytes is "not installed"


@contextlib.contextmanager
def _bitsandbytes_hidden():
    sys.modules["bitsandbytes"] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        if sys.modules.get("bitsandbytes", 0) is None:
            del sys.modules["bitsandbytes"]


def import_peft(*, bitsandbytes: bool):
    """The peft module; with bitsandbytes=False and neither peft nor bitsandbytes imported yet, peft sees
    bitsandbytes as absent (see the module docstring)."""
    try:
        if "peft" in sys.modules or bitsandbytes or "bitsandbytes" in sys.modules:
            import peft
        else:
            import transformers  # noqa: F401  (outside the window: its own availability checks stay true)

            with _bitsandbytes_hidden():
                import peft
                from peft import import_utils

                import_utils.is_bnb_available()  # cached False: LoRA's dispatch will not import it either
                import_utils.is_bnb_4bit_available()
            _state["hidden"] = True
    except ImportError:
        raise ConfigError("peft.method needs the peft package: pip install 'trellis-train[peft]'") from None
    if bitsandbytes and _state["hidden"]:
        _show_bitsandbytes(peft)
    return peft


def _show_bitsandbytes(peft) -> None:
    """Undo the hiding: peft imported without bitsandbytes now needs it (a quantized base)."""
    import bitsandbytes as bnb
    import peft.helpers
    from peft import import_utils

    import_utils.is_bnb_available.cache_clear()
    import_utils.is_bnb_4bit_available.cache_clear()
    peft.helpers.bnb = bnb
    _state["hidden"] = False
