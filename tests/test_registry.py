import pytest

from bdvax_lab.core.registry import (
    ALL_KINDS,
    UnsupportedArchitectureError,
    get_spec,
    layout_of,
    registry_frame,
    supported_architectures,
)


def test_supported_families():
    assert {"llama", "mistral", "qwen2"} <= set(supported_architectures())


def test_unknown_architecture_lists_supported():
    with pytest.raises(UnsupportedArchitectureError, match="gpt2.*supported: .*llama"):
        get_spec("gpt2")


def test_layout_paths_resolve_on_tiny(tiny_pair):
    model, _ = tiny_pair
    lay = layout_of(model)
    assert (lay.n_blocks, lay.hidden, lay.d_ff, lay.n_heads, lay.n_kv_heads, lay.head_dim) == (
        4,
        64,
        128,
        4,
        2,
        16,
    )
    for block, kind, name in lay.iter_modules():
        w = model.get_submodule(name).weight
        assert lay.parse(name) == (block, kind)
        assert lay.parse("base_model.model." + name) == (block, kind)
        assert w.ndim == 2
    df = lay.to_frame()
    assert len(df) == 4 * len(ALL_KINDS)
    row = df[(df.block == 0) & (df.kind == "down")].iloc[0]
    assert (row.out_features, row.in_features) == (64, 128)


def test_layout_shapes_match_model(tiny_pair):
    model, _ = tiny_pair
    lay = layout_of(model)
    for r in lay.to_frame().itertuples():
        assert tuple(model.get_submodule(r.module).weight.shape) == (r.out_features, r.in_features)


def test_module_name_errors(tiny_pair):
    lay = layout_of(tiny_pair[0])
    with pytest.raises(IndexError, match="block 9"):
        lay.module_name(9, "q")
    with pytest.raises(KeyError, match="unknown module kind"):
        lay.module_name(0, "mlp")


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_other_families_build_and_resolve(family):
    from bdvax_lab.core.models import make_tiny_model

    model, _ = make_tiny_model(model_type=family, n_blocks=2)
    lay = layout_of(model)
    assert lay.family == family
    for _, _, name in lay.iter_modules():
        model.get_submodule(name)


def test_registry_frame():
    df = registry_frame()
    assert set(df.family) >= {"llama", "mistral", "qwen2"}
    assert "model.layers.{i}.mlp.gate_proj" in set(df.path)
