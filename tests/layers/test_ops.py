"""Stack edits: select / delete / move / reorder / merge down / duplicate / drop empty / props; T4 addressing."""

from __future__ import annotations

import numpy as np
import pytest

from qil_core.errors import InputError, LayerIndexError
from qil_core.layers import (
    Layer,
    LayerStack,
    composite,
    delete_layers,
    drop_empty_layers,
    duplicate_layer,
    merge_down,
    move_layer,
    parse_layer_keys,
    reorder_layers,
    select_layers,
    set_layer_props,
)


def solid(rgba: tuple[float, float, float, float], h: int = 2, w: int = 2, **kw: object) -> Layer:
    return Layer(np.broadcast_to(np.float32(rgba), (h, w, 4)).copy(), **kw)


@pytest.fixture()
def stack() -> LayerStack:
    return LayerStack(
        6,
        6,
        [
            solid((1, 1, 1, 1), 6, 6, name="paper"),
            solid((1, 0, 0, 1), name="sky", x=1, y=1),
            solid((0, 0, 1, 0.5), 3, 3, name="logo", x=2, y=2, opacity=0.5),
            solid((0, 1, 0, 1), name="grass", x=4, y=4),
        ],
    )


def names(stack: LayerStack) -> list[str]:
    return [layer.name for layer in stack]


def test_parse_layer_keys() -> None:
    assert parse_layer_keys("0,2,-1") == [0, 2, -1]
    assert parse_layer_keys(" 1-3 , sky ") == [1, 2, 3, "sky"]
    assert parse_layer_keys("2..4") == [2, 3, 4]
    assert parse_layer_keys("sky-blue,logo") == ["sky-blue", "logo"]
    for bad, msg in (("", "empty"), ("1,,2", "empty entry"), ("3-1", "backwards")):
        with pytest.raises(InputError, match=msg):
            parse_layer_keys(bad)


def test_select_keeps_key_order_and_drops_duplicates(stack: LayerStack) -> None:
    out = select_layers(stack, [3, "sky", -1])
    assert names(out) == ["grass", "sky"]
    assert out.size == stack.size and names(stack) == ["paper", "sky", "logo", "grass"]
    assert out[0] is stack[3]  # layers are shared, not copied


@pytest.mark.parametrize(
    "key,msg",
    [
        (5, "layer 5 requested, 4 available"),
        (-5, "layer -5 requested"),
        (999, "999 requested"),
        ("moon", "layer named 'moon' not found"),
    ],
)
def test_bad_keys_t4(stack: LayerStack, key: int | str, msg: str) -> None:
    for fn in (
        lambda: select_layers(stack, [key]),
        lambda: delete_layers(stack, key),
        lambda: move_layer(stack, key, 0),
        lambda: merge_down(stack, key),
        lambda: duplicate_layer(stack, key),
        lambda: set_layer_props(stack, key, opacity=0.5),
    ):
        with pytest.raises(LayerIndexError, match=msg):
            fn()
    with pytest.raises(IndexError):  # also an IndexError and a ValueError for generic callers
        select_layers(stack, [key])


def test_empty_stack_addressing_t4() -> None:
    with pytest.raises(LayerIndexError, match="no layers"):
        select_layers(LayerStack(4, 4), [0])


def test_delete(stack: LayerStack) -> None:
    assert names(delete_layers(stack, ["logo", 0])) == ["sky", "grass"]
    assert len(delete_layers(stack, parse_layer_keys("0-3"))) == 0


def test_move_and_reorder(stack: LayerStack) -> None:
    assert names(move_layer(stack, "paper", -1)) == ["sky", "logo", "grass", "paper"]
    assert names(move_layer(stack, -1, 0)) == ["grass", "paper", "sky", "logo"]
    with pytest.raises(InputError, match="to_index"):
        move_layer(stack, 0, 4)
    assert names(reorder_layers(stack, [3, 2, 1, 0])) == ["grass", "logo", "sky", "paper"]
    for bad in ([0, 1, 2], [0, 1, 2, 2], [0, 1, 2, 4]):
        with pytest.raises(InputError, match="permutation|exactly once"):
            reorder_layers(stack, bad)


def test_merge_down_preserves_the_picture(stack: LayerStack) -> None:
    before = composite(stack)
    merged = merge_down(stack, "logo")
    assert names(merged) == ["paper", "sky", "grass"]
    assert merged[1].bbox() == (1, 1, 5, 5)  # union of sky (1..3) and logo (2..5), cropped
    np.testing.assert_allclose(composite(merged), before, atol=1e-6)
    # The upper layer's blend mode is applied against the lower layer's pixels.
    mult = set_layer_props(stack, "logo", blend_mode="multiply", opacity=1.0)
    out = merge_down(mult, "logo")
    np.testing.assert_allclose(composite(out), composite(mult), atol=1e-6)
    with pytest.raises(InputError, match="bottom layer"):
        merge_down(stack, 0)


def test_merge_down_keeps_lower_props_and_drops_hidden_upper(stack: LayerStack) -> None:
    lowered = set_layer_props(stack, "sky", opacity=0.4, blend_mode="screen", name="sky!")
    out = merge_down(lowered, 2)
    assert (out[1].name, out[1].opacity, out[1].blend_mode) == ("sky!", 0.4, "screen")
    hidden = set_layer_props(stack, "logo", visible=False)
    out = merge_down(hidden, "logo")
    assert out[1] is stack[1] and len(out) == 3


def test_duplicate(stack: LayerStack) -> None:
    out = duplicate_layer(stack, "sky")
    assert names(out) == ["paper", "sky", "sky copy", "logo", "grass"]
    assert np.array_equal(out[2].pixels, out[1].pixels) and out[2].pixels is not out[1].pixels
    assert names(duplicate_layer(stack, 0, name="paper 2"))[1] == "paper 2"


def test_drop_empty(stack: LayerStack) -> None:
    empty = Layer(np.zeros((0, 0, 4), np.float32), name="empty")
    clear = solid((1, 0, 0, 0), name="clear")
    out = drop_empty_layers(stack.replace(layers=[empty, *stack.layers, clear]))
    assert names(out) == names(stack)


def test_set_layer_props(stack: LayerStack) -> None:
    out = set_layer_props(stack, "grass", x=-3, y=2, opacity=0.25, visible=False, name="lawn")
    g = out[3]
    assert (g.x, g.y, g.opacity, g.visible, g.name) == (-3, 2, 0.25, False, "lawn")
    assert stack[3].name == "grass"  # the input stack is unchanged
    for bad, msg in (
        ({"opacity": 2}, "opacity must be in 0..1"),
        ({"blend_mode": "glow"}, "unknown blend mode"),
        ({"x": 1.5}, "x must be an int"),
        ({"visible": "no"}, "visible must be True or False"),
        ({"pixels": None}, "unknown property pixels"),
        ({"name": 3}, "name must be a string"),
    ):
        with pytest.raises(InputError, match=msg):
            set_layer_props(stack, 0, **bad)
