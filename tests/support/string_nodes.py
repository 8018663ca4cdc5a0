"""Stand-ins of ComfyUI's core text nodes (comfy_extras/nodes_string.py, "utils/string") that the caption -> edit
-> decompose workflow uses: the same node ids, inputs and outputs as in ComfyUI 0.3.64, and the same results.

They run in the CI harness (CORE_NODES); `tests/nodes/test_comfyui_integration.py` compares their declarations
with the real server's /object_info and runs the workflow there on the real nodes.
"""

from __future__ import annotations

from typing import Any

_TEXT = ("STRING", {"multiline": True})


class StringReplace:
    """Core "Replace": every occurrence of `find` in `string` becomes `replace` (an empty `find` changes nothing)."""

    CATEGORY = "utils/string"
    RETURN_TYPES = ("STRING",)
    FUNCTION = "execute"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"string": _TEXT, "find": _TEXT, "replace": _TEXT}}

    def execute(self, string: str, find: str, replace: str) -> tuple[str]:
        return (string.replace(find, replace),)


class StringConcatenate:
    """Core "Concatenate": `string_a`, the delimiter, then `string_b`."""

    CATEGORY = "utils/string"
    RETURN_TYPES = ("STRING",)
    FUNCTION = "execute"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "string_a": _TEXT,
                "string_b": _TEXT,
                "delimiter": ("STRING", {"multiline": False, "default": ""}),
            }
        }

    def execute(self, string_a: str, string_b: str, delimiter: str) -> tuple[str]:
        return (delimiter.join((string_a, string_b)),)


STRING_NODES: dict[str, type] = {"StringReplace": StringReplace, "StringConcatenate": StringConcatenate}
