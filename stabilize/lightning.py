"""PyTorch Lightning integration: ``stabilize.lightning.StabilityCallback``.

Needs the ``lightning`` extra (``pip install 'stabilize-nn[lightning]'``); ``import stabilize`` never
imports Lightning, this module does. See :mod:`stabilize.integrations.lightning_callback`.
"""

try:
    from .integrations.lightning_callback import StabilityCallback
except ImportError as exc:  # pragma: no cover - depends on the install
    if getattr(exc, "name", "") and exc.name.split(".")[0] == "lightning":
        raise ImportError("stabilize.lightning needs Lightning: pip install 'stabilize-nn[lightning]'",
                          name="lightning") from exc
    raise

__all__ = ["StabilityCallback"]
