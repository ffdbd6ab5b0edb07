"""The RTPURBO attention backend for vLLM (backend description, metadata, impl)."""
