"""Declarations of the ComfyUI core nodes the edit-a-layer workflow uses (Qwen-Image-Edit), as in ComfyUI 0.3.64.

The workflow keeps these nodes in a bypassed group (mode 4), so they never run in our tests; the builder and the
UI -> API converter only need their inputs and outputs, in ComfyUI's order, to lay out widget values and links.
`tests/nodes/test_comfyui_integration.py` compares these declarations with the real server's /object_info.
"""

from __future__ import annotations

from typing import Any

EDIT_MODEL = {
    "unet": "qwen_image_edit_2509_fp8_e4m3fn.safetensors",
    "clip": "qwen_2.5_vl_7b_fp8_scaled.safetensors",
    "vae": "qwen_image_vae.safetensors",
}


def _node(name: str, inputs: dict[str, Any], returns: tuple[str, ...]) -> type:
    def run(self: object, **_: Any) -> tuple:
        raise RuntimeError(f"{name} is a declaration only (ComfyUI core node); it is bypassed in our workflows")

    inputs = {group: {k: (d if len(d) > 1 else (*d, {})) for k, d in decls.items()} for group, decls in inputs.items()}
    return type(
        name,
        (),
        {
            "INPUT_TYPES": classmethod(lambda cls: inputs),
            "RETURN_TYPES": returns,
            "FUNCTION": "run",
            "run": run,
            "CATEGORY": "core",
        },
    )


_SEED = ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True})
QWEN_EDIT_NODES: dict[str, type] = {
    "UNETLoader": _node(
        "UNETLoader",
        {
            "required": {
                "unet_name": ([EDIT_MODEL["unet"]],),
                "weight_dtype": (["default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"],),
            }
        },
        ("MODEL",),
    ),
    "CLIPLoader": _node(
        "CLIPLoader",
        {
            "required": {"clip_name": ([EDIT_MODEL["clip"]],), "type": (["stable_diffusion", "qwen_image"],)},
            "optional": {"device": (["default", "cpu"], {"advanced": True})},
        },
        ("CLIP",),
    ),
    "VAELoader": _node("VAELoader", {"required": {"vae_name": ([EDIT_MODEL["vae"]],)}}, ("VAE",)),
    "TextEncodeQwenImageEdit": _node(
        "TextEncodeQwenImageEdit",
        {
            "required": {"clip": ("CLIP",), "prompt": ("STRING", {"multiline": True, "dynamicPrompts": True})},
            "optional": {"vae": ("VAE",), "image": ("IMAGE",)},
        },
        ("CONDITIONING",),
    ),
    "ImageScaleToTotalPixels": _node(
        "ImageScaleToTotalPixels",
        {
            "required": {
                "image": ("IMAGE",),
                "upscale_method": (["nearest-exact", "bilinear", "area", "bicubic", "lanczos"],),
                "megapixels": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 16.0, "step": 0.01}),
            }
        },
        ("IMAGE",),
    ),
    "VAEEncode": _node("VAEEncode", {"required": {"pixels": ("IMAGE",), "vae": ("VAE",)}}, ("LATENT",)),
    "KSampler": _node(
        "KSampler",
        {
            "required": {
                "model": ("MODEL",),
                "seed": _SEED,
                "steps": ("INT", {"default": 20, "min": 1, "max": 10000}),
                "cfg": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}),
                "sampler_name": (["euler", "euler_ancestral", "dpmpp_2m"],),
                "scheduler": (["simple", "normal", "karras"],),
                "positive": ("CONDITIONING",),
                "negative": ("CONDITIONING",),
                "latent_image": ("LATENT",),
                "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}),
            }
        },
        ("LATENT",),
    ),
    "VAEDecode": _node("VAEDecode", {"required": {"samples": ("LATENT",), "vae": ("VAE",)}}, ("IMAGE",)),
    "ImageCompositeMasked": _node(
        "ImageCompositeMasked",
        {
            "required": {
                "destination": ("IMAGE",),
                "source": ("IMAGE",),
                "x": ("INT", {"default": 0, "min": 0, "max": 16384}),
                "y": ("INT", {"default": 0, "min": 0, "max": 16384}),
                "resize_source": ("BOOLEAN", {"default": False}),
            },
            "optional": {"mask": ("MASK",)},
        },
        ("IMAGE",),
    ),
}


def bypass_source(nodes: dict[int, dict], links: dict[int, list], node_id: int, slot: int) -> tuple[int, int] | None:
    """Where a link from output `slot` of `node_id` really comes from once bypassed nodes (mode 4) are removed.

    The frontend's rule: a bypassed node passes each output through from its first input of the same type
    (the input at the same slot first); with no such input the link is dropped (None).
    """
    node = nodes[node_id]
    while node.get("mode", 0) == 4:
        out_type = node["outputs"][slot]["type"]
        ins = node["inputs"]
        order = ([slot] if slot < len(ins) else []) + list(range(len(ins)))
        pick = next((k for k in order if ins[k]["type"] == out_type and ins[k]["link"] is not None), None)
        if pick is None:
            return None
        _, node_id, slot, *_ = links[ins[pick]["link"]]
        node = nodes[node_id]
    return node_id, slot
