"""The shipped weights of the embedded tiny Phi-3 belong to the corpus and the pre-training recipe in the repository
(tools/tiny_pretrain.py), and a build loads them only for the tokenizer they were trained with."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from aegis import sp_tokenizer, tiny
from aegis.errors import ModelError

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("tiny_pretrain", ROOT / "tools" / "tiny_pretrain.py")
recipe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(recipe)


def test_shipped_weights_were_trained_for_this_recipe_and_corpus():
    """Fails when the corpus or the recipe changes and the weights are not made anew
    (`python tools/tiny_pretrain.py --out DIR --ship` on a GPU)."""
    path = tiny.corpus_path(tiny.SHIPPED)
    assert path.stat().st_size <= 20 * 2**20
    assert tiny.shipped_metadata()["fingerprint"] == recipe.fingerprint() == tiny.fingerprint()


def test_another_recipe_has_another_fingerprint(monkeypatch):
    monkeypatch.setattr(recipe, "STEPS", recipe.STEPS + 1)
    assert recipe.fingerprint() != tiny.shipped_metadata()["fingerprint"]


def test_the_build_takes_the_shipped_weights(tiny_path):
    info = json.loads((tiny_path / tiny.INFO).read_text())
    assert info["shipped"] is True and info["vocab"] == tiny.shipped_metadata()["vocab"]
    assert tiny_path.name == f"tiny-{tiny.fingerprint()}"
    # the tokenizer built here from the corpus is the one the weights were trained with
    assert sp_tokenizer.vocab_digest(tiny_path / "tokenizer.model") == tiny.shipped_metadata()["vocab"]
    built, shipped = load_file(tiny_path / "model.safetensors"), load_file(tiny.corpus_path(tiny.SHIPPED))
    assert built.keys() == shipped.keys()
    for name, tensor in shipped.items():
        assert built[name].equal(tensor.float()), name


def test_weights_of_another_vocabulary_are_refused_by_name():
    vocab = tiny.shipped_metadata()["vocab"]
    state, stats = tiny.shipped_weights(vocab)
    assert "model.embed_tokens.weight" in state and stats["steps"] == recipe.STEPS
    with pytest.raises(ModelError, match=f"{tiny.SHIPPED}: trained with tokenizer vocabulary {vocab}.*0000000000"):
        tiny.shipped_weights("0" * 16)


def test_ship_refuses_a_model_of_another_recipe(tmp_path):
    (tmp_path / tiny.INFO).write_text(json.dumps({"fingerprint": "0" * 16, "vocab": "x"}))
    with pytest.raises(ValueError, match="fingerprint"):
        recipe.ship(tmp_path)
