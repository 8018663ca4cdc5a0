"""INT8 ConvRot end to end: ComfyUI-style files made by comfy-kitchen, decomposed and run from the CLI and node.

A full decomposition from an INT8 ConvRot transformer file must match the decomposition from a file holding
comfy-kitchen's dequantisation of the same weights within 1/255 (fp32); the text encoder reads the same formats
(int8 Linear layers and an int8 embedding table, as ComfyUI's quantised text-encoder files hold them).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from comfy_kitchen.tensor import QuantizedTensor
from PIL import Image
from qwen_tiny import TINY
from safetensors.torch import load_file, save_file
from tiny_runs import fast_cli_args, fast_node_settings

from qil_core.cli import main
from qil_core.layers.composite import paste_layer
from qil_core.layers.psd import read_psd
from qil_core.model.arch.text_encoder import Qwen25TextEncoder
from qil_core.model.loader import load_model
from qil_core.model.pipeline.decompose import decompose
from qil_core.model.weights.quant import QuantLinear
from qil_core.model.weights.text_loading import load_text_encoder
from qil_core.model.weights.tiny import write_tiny_model

G = 64
CONVROT = ("TensorWiseINT8Layout", {"per_channel": True, "convrot": True, "convrot_groupsize": G})
MARKER = {"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": G}


def ck_dequantize(qt: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
    return QuantizedTensor(qt._qdata, qt._layout_cls, dataclasses.replace(qt._params, orig_dtype=dtype)).dequantize()


def _blob(conf: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(conf).encode("utf-8")), dtype=torch.uint8)


def quantise_file(src: Path, quantised: Path, dequantised: Path, select, layout=CONVROT, marker=MARKER) -> int:
    """Write `quantised` (selected 2-D weights by comfy-kitchen, from bf16) and `dequantised` (its dequantisation)."""
    sd = load_file(str(src))
    q_sd, d_sd, count = dict(sd), dict(sd), 0
    for key, value in sd.items():
        if key.endswith(".weight") and value.ndim == 2 and select(key, value):
            layer = key[: -len(".weight")]
            qt = QuantizedTensor.from_float(value.to(torch.bfloat16), layout[0], **layout[1])
            q_sd.update({k: v.contiguous() for k, v in qt.state_dict(key).items()})
            q_sd[layer + ".comfy_quant"] = _blob(marker)
            d_sd[key] = ck_dequantize(qt, torch.float32)
            count += 1
    save_file(q_sd, str(quantised), metadata={"qil_random_weights": "true"})
    save_file(d_sd, str(dequantised), metadata={"qil_random_weights": "true"})
    return count


def _in_blocks(key: str, value: torch.Tensor) -> bool:
    return key.startswith("transformer_blocks.") and value.shape[1] % G == 0


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("int8")
    paths = write_tiny_model(root, layout="comfyui", seed=2)
    paths["int8"], paths["dense"] = root / "int8_convrot.safetensors", root / "dequantised.safetensors"
    assert quantise_file(paths["transformer"], paths["int8"], paths["dense"], _in_blocks) >= 16
    return paths


def _image() -> np.ndarray:
    yy, xx = np.mgrid[0:64, 0:96]
    return np.stack([xx * 2.5, yy * 3.5, (xx + yy) % 255, np.full_like(xx, 255)], axis=-1).astype(np.uint8)


def _canvases(stack) -> list[np.ndarray]:
    return [paste_layer(np.zeros((stack.height, stack.width, 4), np.float32), layer) for layer in stack]


def test_int8_convrot_decomposition_matches_comfy_kitchen_dequantised(files) -> None:
    runs = []
    for name in ("int8", "dense"):
        model = load_model(transformer=files[name], vae=files["vae"], text_encoder=files["text_encoder"],
                           dtype=torch.float32, device="cpu")  # fmt: skip
        if name == "int8":
            layers = [m for m in model.transformer.modules() if isinstance(m, QuantLinear)]
            assert len(layers) >= 16 and all(m.weight.dtype == torch.int8 and m.fmt.convrot for m in layers)
        runs.append(decompose(model, _image(), prompt="a test scene", layers=2, steps=4, seed=7,
                              resolution="custom", max_side=96)[0])  # fmt: skip
    ours, reference = (_canvases(s) for s in runs)
    assert len(ours) == 2 and all(a.shape == b.shape for a, b in zip(ours, reference, strict=True))
    worst = max(float(np.abs(a - b).max()) for a, b in zip(ours, reference, strict=True))
    assert worst <= 1 / 255, f"layers differ by up to {worst * 255:.2f}/255"
    assert any(float(np.abs(c[..., :3]).max()) > 0.05 for c in ours)  # not vacuous: the layers hold pixels


def test_cli_reads_int8_convrot_and_quantises_on_load(files, tmp_path: Path, capsys) -> None:
    img = tmp_path / "in.png"
    Image.fromarray(_image()[..., :3], "RGB").save(img)
    common = ["--vae", files["vae"], "--text-encoder", files["text_encoder"], *fast_cli_args(max_side=96)]

    def run(out: str, transformer: Path, *flags: str) -> int:
        args = ["decompose", img, "--out", tmp_path / out, "--transformer", transformer, *flags, *common]
        return main([str(a) for a in args])

    code = run("a.psd", files["int8"], "--quant-kernels", "portable")
    assert code == 0, capsys.readouterr().err
    code = run("b.psd", files["transformer"], "--quant", "int8-convrot")
    err = capsys.readouterr().err
    assert code == 0, err
    assert "quantised" in err and "int8_tensorwise" in err
    assert len(read_psd(tmp_path / "a.psd")) == 2 and len(read_psd(tmp_path / "b.psd")) == 2


def test_text_encoder_reads_int8_convrot_and_int8_embeddings(tmp_path: Path) -> None:
    cfg = dataclasses.replace(TINY, vocab_size=512)
    torch.manual_seed(4)
    model = Qwen25TextEncoder(cfg)
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    path, dense_path, q_path = (
        tmp_path / "te.safetensors",
        tmp_path / "te_dense.safetensors",
        tmp_path / "q.safetensors",
    )
    save_file({"model." + k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    n = quantise_file(path, q_path, dense_path, lambda k, v: "layers." in k and v.shape[1] % G == 0)
    assert n == cfg.num_hidden_layers * 7
    # the embedding table as ComfyUI quantises it: int8 with one scale per row, no rotation
    sd, dense = load_file(str(q_path)), load_file(str(dense_path))
    qt = QuantizedTensor.from_float(sd["model.embed_tokens.weight"].to(torch.bfloat16), "TensorWiseINT8Layout",
                                    per_channel=True)  # fmt: skip
    sd.update(qt.state_dict("model.embed_tokens.weight"))
    sd["model.embed_tokens.comfy_quant"] = _blob({"format": "int8_tensorwise"})
    dense["model.embed_tokens.weight"] = ck_dequantize(qt, torch.float32)
    save_file(sd, str(q_path))
    save_file(dense, str(dense_path))
    ours = load_text_encoder(q_path, dtype=torch.float32, config=cfg)
    ref = load_text_encoder(dense_path, dtype=torch.float32, config=cfg)
    q = ours.layers[1].mlp.down_proj
    assert isinstance(q, QuantLinear) and q.weight.dtype == torch.int8 and q.fmt.convrot
    assert torch.equal(q.dequantized_weight(torch.float32), ref.layers[1].mlp.down_proj.weight)
    assert torch.equal(ours.embed_tokens.weight, ref.embed_tokens.weight)
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 9, dtype=torch.long)
    with torch.no_grad():  # 18 tokens: ConvRot rotates the activations, the same product up to fp32 rounding
        torch.testing.assert_close(ours(ids, mask), ref(ids, mask), rtol=1e-5, atol=1e-5)


def test_loader_node_weight_dtype_int8_convrot(tmp_path: Path) -> None:
    from comfy_harness import pack_module
    from qil_graphs import MODEL_NAMES, harness, sample_picture

    model_nodes, sample_nodes = pack_module("nodes.model_nodes"), pack_module("nodes.sample_nodes")
    quant = pack_module("qil_core.model.weights.quant")
    assert "int8_convrot" in model_nodes.QILLoadModel.INPUT_TYPES()["required"]["weight_dtype"][0]
    h = harness(tmp_path)
    with h.host():
        (handle,) = model_nodes.QILLoadModel().load(*MODEL_NAMES, weight_dtype="int8_convrot")
        dit = handle.model.transformer
        mlp = dit.transformer_blocks[0].img_mlp.net[2]  # 256 inputs: a whole ConvRot group
        assert isinstance(mlp, quant.QuantLinear) and mlp.weight.dtype == torch.int8 and mlp.fmt.convrot
        assert mlp.kernel == "portable"  # CPU: no comfy-kitchen kernels
        image = torch.from_numpy(sample_picture()).float()[None] / 255.0
        _, images, _ = sample_nodes.QILDecompose().decompose(handle, image, **fast_node_settings())["result"][:3]
    assert torch.isfinite(images).all() and images.shape[0] == 2
