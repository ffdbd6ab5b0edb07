"""Long-context accuracy suite (``rtpurbo-eval``): seeded RULER-style tasks sized with the served
model's tokenizer (:mod:`.tasks`), an OpenAI-compatible client (:mod:`.client`), scoring
(:mod:`.scoring`), reports (:mod:`.report`) and one run (:mod:`.runner`). See docs/EVAL.md.
"""
