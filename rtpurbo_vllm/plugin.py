"""The ``vllm.general_plugins`` entry point.

vLLM loads general plugins in every process it starts (the API server while it builds its argument
parser, the engine core, each worker), so :func:`register` is idempotent, imports nothing heavy and
never initialises CUDA. It

1. registers :class:`~rtpurbo_vllm.attention.backend.RTPurboAttentionBackend` in vLLM's ``CUSTOM``
   backend slot, by class path (the backend module is imported only when vLLM resolves it);
2. makes ``RTPURBO`` (any case) a name of that slot, so ``--attention-backend RTPURBO`` parses. The
   alias *is* the ``CUSTOM`` member, so a ``VllmConfig`` holding it unpickles in spawned processes
   before their plugins load;
3. registers the KV-cache specs and managers of the memory-saving layout
   (:func:`rtpurbo_vllm.kv_cache.register_kv_cache_specs`; CPU-only imports of vLLM's KV-cache
   manager modules) in every process that builds KV-cache configs or managers;
4. sends the package's log lines where vLLM's go: vLLM configures only its ``vllm`` logger, so the
   ``rtpurbo_vllm`` logger takes its handlers and level (``VLLM_LOGGING_LEVEL`` applies to both).
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

BACKEND_NAME = "RTPURBO"
BACKEND_CLASS_PATH = "rtpurbo_vllm.attention.backend.RTPurboAttentionBackend"


def register() -> None:
    """Registers the backend, the ``RTPURBO`` alias and the KV-cache specs; calling it again changes
    nothing."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    _log_like_vllm()
    _register_kv_cache_specs()
    custom = AttentionBackendEnum.CUSTOM
    already = (AttentionBackendEnum._member_map_.get(BACKEND_NAME) is custom
               and _registered_path(custom) == BACKEND_CLASS_PATH)
    if already:
        return
    owner = AttentionBackendEnum._member_map_.get(BACKEND_NAME)
    if owner is not None and owner is not custom:
        raise RuntimeError(f"vLLM already defines an attention backend named {BACKEND_NAME} "
                           f"({owner!r}); rtpurbo-vllm cannot alias it to CUSTOM")
    previous = _registered_path(custom)
    if previous not in (None, BACKEND_CLASS_PATH):
        logger.warning("rtpurbo-vllm replaces the CUSTOM attention backend %s", previous)
    register_backend(custom, BACKEND_CLASS_PATH)
    AttentionBackendEnum._member_map_[BACKEND_NAME] = custom
    logger.info("rtpurbo-vllm: attention backend %s registered as CUSTOM (%s)",
                BACKEND_NAME, BACKEND_CLASS_PATH)


def _log_like_vllm() -> None:
    package, vllm_logger = logging.getLogger("rtpurbo_vllm"), logging.getLogger("vllm")
    if package.handlers or not vllm_logger.handlers:    # done already, or vLLM's logging is off
        return
    for handler in vllm_logger.handlers:
        package.addHandler(handler)
    package.setLevel(vllm_logger.level)
    package.propagate = False


def _register_kv_cache_specs() -> None:
    # Importing the package registers the specs (and does it again wherever a pickled spec is
    # loaded), so a failure here is logged rather than aborting vLLM's start-up.
    try:
        from rtpurbo_vllm.kv_cache import register_kv_cache_specs

        register_kv_cache_specs()
    except Exception:  # noqa: BLE001
        logger.exception("rtpurbo-vllm: registering the KV-cache specs failed")


def _registered_path(member) -> str | None:
    from vllm.v1.attention.backends import registry

    return registry._ATTN_OVERRIDES.get(member)
