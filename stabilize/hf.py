"""Hugging Face ``transformers.Trainer`` integration: ``stabilize.hf.StabilityCallback``.

Needs the ``hf`` extra (``pip install 'stabilize-nn[hf]'``); ``import stabilize`` never imports
transformers, this module does. See :mod:`stabilize.integrations.hf_callback`.
"""

try:
    from .integrations.hf_callback import StabilityCallback
except ImportError as exc:  # pragma: no cover - depends on the install
    if getattr(exc, "name", "") and exc.name.split(".")[0] in ("transformers", "accelerate"):
        raise ImportError("stabilize.hf needs transformers and accelerate: pip install 'stabilize-nn[hf]'",
                          name=exc.name) from exc
    raise

__all__ = ["StabilityCallback"]
