"""extractors.essentia_meta: model-JSON provenance, per-output schema, and the OnnxPredict contract checker.

The contract checker is run here on small hand-built graphs that break one rule each;
tests/test_essentia_onnxpredict.py runs it (and an OnnxPredict emulation) on a real export.
"""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from extractors import essentia_meta as em
from mert_plugin.errors import CheckpointError

CITATION = "@article{li2023mert}"


def test_layer_output_names_round_trip():
    assert em.layer_output_name(6) == "hidden_state_6"
    assert em.parse_layer_output("hidden_state_12") == 12
    for name in ("hidden_states", "hidden_state_", "hidden_state_-1", "layer_6", "hidden_state_6x"):
        assert em.parse_layer_output(name) is None


def test_recommended_layer_is_a_middle_layer():
    assert em.recommended_layer(12) == 6    # MERT-v1-95M, MERT-v0
    assert em.recommended_layer(24) == 6    # MERT-v1-330M: MARBLE's most frequent layer
    assert em.recommended_layer(4) == 2     # mert-tiny
    assert em.recommended_layer(1) == 1


@pytest.mark.parametrize("source, hub_id, hours", [
    ("/models/MERT-v1-95M", "m-a-p/MERT-v1-95M", "20K hours"),
    ("m-a-p/MERT-v1-330M", "m-a-p/MERT-v1-330M", "160K hours"),
    ("/ckpt/MERT-v1-330M_fairseq.pt", "m-a-p/MERT-v1-330M", "160K hours"),
    ("m-a-p/MERT-v0-public", "m-a-p/MERT-v0-public", "900 hours"),
    ("m-a-p/MERT-v0", "m-a-p/MERT-v0", "1000 hours"),
])
def test_released_weights_get_map_provenance(source, hub_id, hours):
    fields = em.provenance_fields(source, CITATION)
    assert fields["link"] == f"https://huggingface.co/{hub_id}"
    assert "m-a-p" in fields["author"] and "Yizhi Li" in fields["author"]
    assert fields["email"] and "github.com/yizhilll/MERT" in fields["email"]
    assert fields["classes"] == []
    assert set(fields["dataset"]) == {"name", "citation", "size", "metrics"}
    assert fields["dataset"]["size"] == hours and fields["dataset"]["citation"] == CITATION
    assert hub_id in fields["dataset"]["name"]


def test_random_and_unknown_weights_say_so_and_arguments_win():
    preset = em.provenance_fields("preset mert-tiny (random weights, seed 0)", CITATION)
    assert preset["dataset"]["size"] == "0 hours" and "random" in preset["dataset"]["name"]
    assert preset["link"] == em.MERT_PAPER and "random" in preset["author"]
    other = em.provenance_fields("results/tiny/save/CKPT+1", CITATION)
    assert "unknown" in other["author"] and "unknown" in other["dataset"]["name"]
    assert other["dataset"]["size"] == "unknown"
    given = em.provenance_fields("results/tiny/save/CKPT+1", CITATION, author="A. Person", email="a@b.c",
                                 link="https://example.org/m.onnx", dataset="my 40-piece corpus")
    assert (given["author"], given["email"], given["link"]) == ("A. Person", "a@b.c", "https://example.org/m.onnx")
    assert given["dataset"]["name"] == "my 40-piece corpus"


@pytest.mark.parametrize("pre_ln", [False, True])
def test_output_schema_marks_exactly_the_recommended_layer(pre_ln):
    outs = em.output_schema(12, 374, 768, pre_ln, embedding_layer=6, ops={"hidden_states": "Concat"})
    names = [o["name"] for o in outs]
    assert names == ["last_hidden_state", "hidden_states"] + [f"hidden_state_{i}" for i in range(13)]
    for o in outs:
        assert set(o) >= {"name", "type", "shape", "description", "output_purpose"}
        assert o["type"] == "float" and o["description"]
    assert [o["name"] for o in outs if o["output_purpose"] == "embeddings"] == ["hidden_state_6"]
    by_name = {o["name"]: o for o in outs}
    assert by_name["hidden_states"]["shape"] == ["batch_size", 13, 374, 768]
    assert by_name["hidden_state_6"]["shape"] == ["batch_size", 374, 768]
    assert by_name["hidden_states"]["op"] == "Concat"
    assert ("not layer-normed" in by_name["hidden_state_6"]["description"]) == pre_ln


# ------------------------------------------------------------------ contract checker on hand-built graphs
def _graph(path, in_type=TensorProto.FLOAT, in_shape=("batch", 800), outputs=None):
    """audio -> Identity/Unsqueeze outputs with the declared shapes given."""
    outputs = outputs or {"emb": ("batch", 800)}
    nodes, outs = [], []
    inits = []
    for name, shape in outputs.items():
        if len(shape) == len(in_shape):
            nodes.append(helper.make_node("Identity", ["audio"], [name]))
        else:  # Reshape with 0 = "keep the batch"
            inits.append(helper.make_tensor(f"{name}_shape", TensorProto.INT64, [len(shape)],
                                            [0] + [d if isinstance(d, int) else -1 for d in shape[1:]]))
            nodes.append(helper.make_node("Reshape", ["audio", f"{name}_shape"], [name]))
        outs.append(helper.make_tensor_value_info(name, in_type, list(shape)))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("audio", in_type, list(in_shape))], outs,
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return str(path)


def test_contract_accepts_a_conforming_graph_and_gives_pool_shapes(tmp_path):
    path = _graph(tmp_path / "ok.onnx", outputs={"emb": ("batch", 800)})
    io = em.check_onnxpredict_contract(path, {"inputs": [{"name": "audio", "shape": ["batch_size", 800]}],
                                              "outputs": [{"name": "emb", "shape": ["batch_size", 800]}]})
    assert io == {"inputs": [("audio", ["batch_size", 1, 1, 800])], "outputs": [("emb", ["batch_size", 1, 1, 800])]}


@pytest.mark.parametrize("kwargs, message", [
    ({"in_type": TensorProto.DOUBLE, "outputs": {"emb": ("batch", 800)}}, "is tensor\\(double\\), OnnxPredict feeds float32"),
    ({"in_shape": ("batch", "samples"), "outputs": {"emb": ("batch", "samples")}}, "a static length"),
    ({"outputs": {"emb": ("batch", 1, 1, 1, 800)}}, "output emb has rank 5; OnnxPredict stores"),
    ({"in_shape": ("batch", "n"), "outputs": {"emb": ("batch", "n")}}, "output emb .* every non-batch dim must be static"),
    ({"outputs": {"emb": (4, 800)}, "in_shape": (4, 800)}, "symbolic batch"),
])
def test_contract_reports_each_violation(tmp_path, kwargs, message):
    path = _graph(tmp_path / "bad.onnx", **kwargs)
    with pytest.raises(CheckpointError, match=message):
        em.check_onnxpredict_contract(path)


def test_contract_checks_the_schema_names_and_shapes(tmp_path):
    path = _graph(tmp_path / "g.onnx", outputs={"emb": ("batch", 800)})
    with pytest.raises(CheckpointError, match="schema output 'hidden_state_6' is not an output of the graph"):
        em.check_onnxpredict_contract(path, {"inputs": [{"name": "audio", "shape": ["batch_size", 800]}],
                                             "outputs": [{"name": "hidden_state_6", "shape": ["batch_size", 800]}]})
    with pytest.raises(CheckpointError, match="schema input audio is shaped"):
        em.check_onnxpredict_contract(path, {"inputs": [{"name": "audio", "shape": ["batch_size", 120000]}],
                                             "outputs": []})
    with pytest.raises(CheckpointError, match="no output named missing"):
        em.check_onnxpredict_contract(path, outputs=["missing"])
    (tmp_path / "junk.onnx").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="cannot load the ONNX model"):
        em.check_onnxpredict_contract(str(tmp_path / "junk.onnx"))


def test_onnxpredict_call_names_the_recommended_output():
    call = em.onnxpredict_call("/x/mert-v1-95m.onnx", 120000, 374, 768, 6)
    assert call["algorithm"] == "OnnxPredict"
    assert call["parameters"] == {"graphFilename": "mert-v1-95m.onnx", "inputs": ["audio"],
                                  "outputs": ["hidden_state_6"], "squeeze": True}
    assert call["input_pool"] == {"audio": ["batch_size", 1, 1, 120000]}
    assert call["output_pool"] == {"hidden_state_6": ["batch_size", 1, 374, 768]}
    assert np.prod(call["output_pool"]["hidden_state_6"][1:]) == 374 * 768
