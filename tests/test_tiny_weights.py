"""The shipped weights of the embedded tiny Phi-3 belong to the recipe and corpus in the repository, and a build
uses them only then."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open
from safetensors.torch import load_file

from aegis import sp_tokenizer, tiny


def shipped_metadata() -> dict:
    with safe_open(str(tiny.corpus_path(tiny.SHIPPED)), framework="pt") as f:
        return f.metadata()


def test_shipped_weights_were_trained_for_this_recipe_and_corpus():
    """Fails when the corpus or the recipe changes and the weights are not made anew
    (`python -m aegis.tiny --out DIR --from-source --ship` on a GPU)."""
    path = tiny.corpus_path(tiny.SHIPPED)
    assert path.stat().st_size <= 20 * 2**20
    assert shipped_metadata()["fingerprint"] == tiny.fingerprint()


def test_the_build_takes_the_shipped_weights(tiny_path):
    info = json.loads((tiny_path / "aegis_tiny.json").read_text())
    assert info["shipped"] is True and info["vocab"] == shipped_metadata()["vocab"]
    # the tokenizer built here from the corpus is the one the weights were trained with
    assert sp_tokenizer.vocab_digest(tiny_path / "tokenizer.model") == shipped_metadata()["vocab"]
    built, shipped = load_file(tiny_path / "model.safetensors"), load_file(tiny.corpus_path(tiny.SHIPPED))
    assert built.keys() == shipped.keys()
    for name, tensor in shipped.items():
        assert built[name].equal(tensor.float()), name


def test_another_recipe_or_vocabulary_does_not_take_them(monkeypatch):
    messages = []
    vocab = shipped_metadata()["vocab"]
    assert tiny._shipped(vocab, messages.append) is not None
    assert tiny._shipped("0" * 16, messages.append) is None
    monkeypatch.setattr(tiny, "STEPS", tiny.STEPS + 1)  # another recipe: another fingerprint
    assert tiny._shipped(vocab, messages.append) is None
    assert len(messages) == 2 and all("pre-training from source" in m for m in messages)


def test_ship_refuses_a_model_of_another_recipe(tmp_path):
    (tmp_path / "aegis_tiny.json").write_text(json.dumps({"fingerprint": "0" * 16, "vocab": "x"}))
    with pytest.raises(ValueError, match="fingerprint"):
        tiny.ship(tmp_path)
