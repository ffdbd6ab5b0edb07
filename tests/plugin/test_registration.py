"""The plugin registers RTPURBO with the real vLLM 0.26.0, in fresh processes as vLLM starts them."""

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run_fresh(code: str) -> dict:
    """Runs ``code`` in a fresh interpreter outside the repo; its last stdout line is JSON."""
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"}
    env.pop("VLLM_PLUGINS", None)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd="/", env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_entry_point_is_installed():
    from importlib.metadata import entry_points

    eps = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert eps.get("rtpurbo") == "rtpurbo_vllm.plugin:register"


def test_load_general_plugins_resolves_rtpurbo_without_cuda():
    out = run_fresh("""
        import json, sys
        from vllm.plugins import load_general_plugins
        load_general_plugins()
        backend_loaded_early = "rtpurbo_vllm.attention.backend" in sys.modules
        from vllm.v1.attention.backends.registry import AttentionBackendEnum as E
        cls = E["RTPURBO"].get_class()
        import torch
        print(json.dumps({
            "same_member": E["RTPURBO"] is E.CUSTOM,
            "cls": f"{cls.__module__}.{cls.__qualname__}",
            "backend_loaded_early": backend_loaded_early,
            "cuda_initialized": torch.cuda.is_initialized(),
            "listed_names": [m.name for m in E],
        }))
    """)
    assert out["same_member"]
    assert out["cls"] == "rtpurbo_vllm.attention.backend.RTPurboAttentionBackend"
    assert not out["backend_loaded_early"], "register() must not import the backend module"
    assert not out["cuda_initialized"]
    assert "RTPURBO" not in out["listed_names"], "the alias must not add an enum member"


def test_package_logs_print_where_vllms_do():
    """vLLM configures only its own logger; after the plugin loads, the package's INFO lines (the
    start-up warm-up's, say) go to vLLM's handler, once, even if the plugin loads twice."""
    out = run_fresh("""
        import json, logging
        from vllm.plugins import load_general_plugins
        from rtpurbo_vllm.plugin import register
        load_general_plugins()
        register()
        package, vllm_logger = logging.getLogger("rtpurbo_vllm"), logging.getLogger("vllm")
        child = logging.getLogger("rtpurbo_vllm.attention.warmup")
        print(json.dumps({"same_handlers": package.handlers == vllm_logger.handlers,
                          "level": package.level, "vllm_level": vllm_logger.level,
                          "child_handlers": len(child.handlers), "propagate": package.propagate}))
    """)
    assert out == {"same_handlers": True, "level": out["vllm_level"], "vllm_level": logging.WARNING,
                   "child_handlers": 0, "propagate": False}


def test_register_twice_is_harmless():
    from vllm.v1.attention.backends import registry
    from vllm.v1.attention.backends.registry import AttentionBackendEnum as E

    from rtpurbo_vllm.plugin import BACKEND_CLASS_PATH, register

    register()
    before = (dict(registry._ATTN_OVERRIDES), dict(E._member_map_), list(E._member_names_))
    register()
    after = (dict(registry._ATTN_OVERRIDES), dict(E._member_map_), list(E._member_names_))
    assert before == after
    assert registry._ATTN_OVERRIDES[E.CUSTOM] == BACKEND_CLASS_PATH


SPAWN_SCRIPT = """
import json, multiprocessing

def child(member, queue):
    # A spawned vLLM engine core / worker unpickles its config before loading plugins.
    from vllm.plugins import load_general_plugins
    load_general_plugins()
    cls = member.get_class()
    queue.put((member.name, f"{cls.__module__}.{cls.__qualname__}"))

if __name__ == "__main__":
    from rtpurbo_vllm.plugin import register
    from vllm.v1.attention.backends.registry import AttentionBackendEnum as E
    register()
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=child, args=(E["RTPURBO"], queue))
    proc.start()
    proc.join(timeout=300)
    name, cls = queue.get(timeout=5)
    print(json.dumps({"exitcode": proc.exitcode, "member": name, "cls": cls}))
"""


def test_alias_survives_spawn(tmp_path):
    script = tmp_path / "spawn_probe.py"
    script.write_text(SPAWN_SCRIPT)
    out = run_fresh(f"import runpy; runpy.run_path({str(script)!r}, run_name='__main__')")
    assert out == {"exitcode": 0, "member": "CUSTOM",
                   "cls": "rtpurbo_vllm.attention.backend.RTPurboAttentionBackend"}


@pytest.mark.parametrize("spelling", ["RTPURBO", "rtpurbo"])
def test_vllm_serve_cli_accepts_attention_backend(spelling):
    """Drives the real ``vllm serve`` CLI main; only the server start is replaced by a probe."""
    out = run_fresh(f"""
        import json, sys
        import vllm.entrypoints.cli.serve as serve

        def probe(args):
            # What EngineArgs.create_engine_config does with the parsed flag.
            from vllm.config.attention import AttentionConfig
            backend = AttentionConfig.validate_backend_before(args.attention_backend)
            cls = backend.get_class()
            print(json.dumps({{"member": backend.name, "cls": cls.__qualname__}}))

        serve.ServeSubcommand.cmd = staticmethod(probe)
        # Without a GPU vLLM cannot infer a device while building the serve parser; use its CPU
        # platform, as `vllm bench` does on such machines.
        from vllm import platforms
        if platforms.current_platform.is_unspecified():
            from vllm.platforms.cpu import CpuPlatform
            platforms.current_platform = CpuPlatform()
        sys.argv = ["vllm", "serve", "some/model", "--attention-backend", "{spelling}"]
        from vllm.entrypoints.cli.main import main
        main()
    """)
    assert out == {"member": "CUSTOM", "cls": "RTPurboAttentionBackend"}


def test_unknown_backend_name_still_rejected():
    from vllm.config.attention import AttentionConfig

    from rtpurbo_vllm.plugin import register

    register()
    with pytest.raises(ValueError, match="Unknown attention backend"):
        AttentionConfig.validate_backend_before("RTPURBOX")


def _validate(**overrides):
    import torch

    from rtpurbo_vllm.attention.backend import RTPurboAttentionBackend

    config = dict(head_size=128, dtype=torch.bfloat16, kv_cache_dtype="auto", block_size=16, use_mla=False,
                  has_sink=False, use_sparse=False, use_mm_prefix=False, use_per_head_quant_scales=False,
                  device_capability=None, attn_type="decoder")
    return RTPurboAttentionBackend.validate_configuration(**{**config, **overrides})


@pytest.mark.parametrize("overrides, reason", [
    pytest.param({}, None, id="supported"),
    pytest.param({"head_size": 96}, "head_size not supported", id="head-size"),
    pytest.param({"dtype": __import__("torch").float32}, "dtype not supported", id="fp32"),
    pytest.param({"kv_cache_dtype": "fp8"}, None, id="fp8-kv"),
    pytest.param({"kv_cache_dtype": "fp8_e5m2"}, "kv_cache_dtype not supported", id="fp8-e5m2-kv"),
    pytest.param({"has_sliding_window": True}, "sliding window not supported", id="model-swa"),
    pytest.param({"use_mla": True}, "MLA not supported", id="mla"),
    pytest.param({"attn_type": "encoder_only"}, "attention type encoder_only not supported", id="encoder"),
])
def test_backend_validates_configuration(overrides, reason):
    """vLLM refuses an explicitly chosen backend with these reasons (no silent fallback)."""
    reasons = _validate(**overrides)
    assert reasons == ([] if reason is None else [reason])


def test_no_top_level_triton_kernels_from_this_repo():
    """vLLM probes ``import triton_kernels`` (an unrelated PyPI package); ours must not answer."""
    out = run_fresh("""
        import importlib.util, json
        spec = importlib.util.find_spec("triton_kernels")
        import rtpurbo_vllm.triton_kernels as ours
        print(json.dumps({"origin": spec.origin if spec else None, "ours": ours.__file__}))
    """)
    assert out["origin"] is None or not out["origin"].startswith(str(REPO))
    assert out["ours"].startswith(str(REPO / "triton_kernels"))
