"""rtpurbo-vllm: RTPurbo sparse attention for vLLM.

Importing this package is cheap and never touches CUDA; vLLM calls :func:`register` through the
``vllm.general_plugins`` entry point in every process it starts.
"""

__version__ = "0.1.0"


def register() -> None:
    """Registers the RTPURBO attention backend with vLLM (see :mod:`rtpurbo_vllm.plugin`)."""
    from rtpurbo_vllm.plugin import register as _register

    _register()
