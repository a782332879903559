"""The compiled blocks (model.compile): one compiled graph per kind of block serves every decoder layer. A forward
stored on each instance (as LoRA, norm and tiled layers once got theirs) is guarded by identity, so
each layer compiled its own graph and past torch's recompile limit (8) the remaining layers ran uncompiled."""

from __future__ import annotations

from aegis import loading as model_mod, memory
from aegis.config import build
from support.training import loss_and_grads


def test_each_kind_of_block_compiles_once_for_all_layers(tiny_path):
    import torch._dynamo

    cfg = build({}, ["model.base=embedded", "model.quantization=none", "lora.dropout=0.0"])
    model, _ = model_mod.build(cfg, tiny_path, torch.device("cpu"), seed=0)
    model.train()
    layers = model.get_base_model().config.num_hidden_layers
    plan = memory.plan_for(cfg, model.get_base_model().config, torch.device("cpu"))
    torch._dynamo.reset()
    compiles = []

    def backend(gm, example_inputs):  # counts what dynamo compiles, runs it as traced
        compiles.append(gm)
        return gm.forward

    try:
        assert model_mod.compile_blocks(model, plan, backend=backend) == 4 * layers  # 2 norms, attention, MLP
        ids = torch.randint(5, 3000, (2, 64), generator=torch.Generator().manual_seed(0))
        for _ in range(2):
            loss_and_grads(model, ids)
    finally:
        torch._dynamo.reset()
    # each kind once, and once more where layer 0 sees an input that needs no gradient (the embeddings' output)
    print("graphs compiled:", len(compiles))
    assert 4 <= len(compiles) <= 8 < 4 * layers, len(compiles)
