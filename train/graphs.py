"""One micro-batch's forward + backward captured once as a CUDA graph, then replayed for every micro-batch.

At small batches an update is bound by kernel launches, not by the GPU (thousands of launches per update: the
profile in BENCHMARKS.md). A replay issues all of them with one call. What capture needs, and how it is met here:
- fixed shapes and addresses: micro-batches are copied into fixed input buffers (train.max_length wide; with
  data.packing = "documents" the documents of each token too, from which the graph itself builds the positions and
  the mask, aegis/packing.py), and the gradients exist before capture, so every replay adds into the same tensors
  (gradient accumulation keeps working);
- no host synchronisation inside the graph: the loss scale (1 / labelled tokens of the update) is a device tensor,
  α is changed in place, and the soul's rotation, whose matrix exponential reads its norm on the host, is computed
  outside the graph and fed in as a leaf tensor; its gradient is carried back through the exponential afterwards.
One process only: DDP's all-reduce hooks are not captured. With model.compile the decoder layers' blocks are compiled
during the eager warm-up runs and their fused kernels are what the graph captures (fewer kernels and less memory
traffic; the throughput is in BENCHMARKS.md). That holds because nothing recompiles inside the capture: the
attention builds no mask there (aegis/causal.py) and every layer shares its block's compiled code (aegis/forwards.py).
With `capture=False` the same buffers run eagerly, which is how the CPU tests check this path against the plain one.
"""

from __future__ import annotations

import torch
from torch import nn

from aegis import packing
from aegis.config import ConfigError
from aegis.soul import BLOCK, Soul

from . import data
from .loss import masked_loss_sum

WARMUP = 3  # eager runs before capture: lazy initialisation, cuBLAS workspaces and the allocator settle first


def _rope_types(params) -> set[str]:
    """rope_type of a config's rope_parameters (per layer type in some models)."""
    if not isinstance(params, dict):
        return set()
    if "rope_type" in params:
        return {str(params["rope_type"])}
    return set().union(*(_rope_types(v) for v in params.values()))


def decide(
    setting: bool | str, device: torch.device, processes: int, checkpointing: bool, model_config=None
) -> tuple[bool, str]:
    """Whether to capture the step, and why; `true` where it cannot work is an error naming the key."""
    import transformers
    from packaging.version import Version

    blockers = []
    dynamic = sorted(t for t in _rope_types(getattr(model_config, "rope_parameters", None)) if "dynamic" in t)
    if dynamic:  # these grow their frequency table after comparing the length on the host
        blockers.append(f"rope type {dynamic[0]!r} synchronises with the host")
    if device.type != "cuda":
        blockers.append("there is no CUDA device")
    if processes > 1:
        blockers.append(f"{processes} processes (DDP's all-reduce is not captured)")
    if Version(transformers.__version__) < Version("5.21"):  # LongRoPE picked its factors on the host before
        blockers.append(f"transformers {transformers.__version__} < 5.21 synchronises in LongRoPE")
    if setting is True and blockers:
        raise ConfigError("train.cuda_graphs = true", blockers)
    if setting == "auto" and checkpointing:
        blockers.append("gradient checkpointing is on (the batch is large enough not to be launch-bound)")
    if setting is False:
        return False, "train.cuda_graphs = false"
    return (False, "; ".join(blockers)) if blockers else (True, "one CUDA process, fixed shapes")


class GraphedStep:
    """begin() once per update, micro(batch, scale) per micro-batch, end() before the optimizer step."""

    def __init__(
        self,
        model: nn.Module,
        soul: Soul,
        params: list[torch.Tensor],
        batch_size: int,
        length: int,
        device: torch.device,
        capture: bool = True,
        documents: bool = False,
    ):
        self.model, self.soul, self.capture = model, soul, capture
        # the generators reach the loss only through the rotation, so their gradient comes from end()
        self.params = params
        self.ids = torch.zeros(batch_size, length, dtype=torch.long, device=device)
        self.labels = torch.full((batch_size, length), data.IGNORE, dtype=torch.long, device=device)
        # the documents of each token, where a window keeps them apart (data.packing = "documents")
        self.inputs = {packing.KEY: torch.zeros_like(self.ids)} if documents else {}
        self.scale = torch.zeros((), device=device)
        self.rotation = torch.zeros(soul.blocks, BLOCK, BLOCK, device=device, requires_grad=True)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.loss: torch.Tensor | None = None
        self.fixed: list[torch.Tensor] = []  # the gradient tensors the graph writes into
        soul.rotation_input = self.rotation

    def close(self) -> None:
        self.soul.rotation_input = None
        self.graph, self.fixed = None, []

    def _grads(self) -> list[torch.Tensor]:
        """The gradients, allocated before capture and then the same tensors every update (re-attached if something
        set them to None, since the graph keeps writing into them)."""
        tensors = [*self.params, self.rotation]
        for i, t in enumerate(tensors):
            grad = self.fixed[i] if self.fixed else t.grad
            t.grad = grad if grad is not None else torch.zeros_like(t)
        return [t.grad for t in tensors]

    def begin(self) -> None:
        torch._foreach_zero_(self._grads())
        with torch.no_grad():
            self.rotation.copy_(self.soul.rotation())

    def _forward_backward(self) -> torch.Tensor:
        loss = masked_loss_sum(
            self.model(input_ids=self.ids, **packing.model_inputs(self.model, self.inputs)).logits, self.labels
        )
        (loss * self.scale).backward()
        return loss.detach()

    def _capture(self) -> None:
        grads = self.fixed = self._grads()
        saved = [g.clone() for g in grads]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP):
                self._forward_backward()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss = self._forward_backward()
        torch._foreach_copy_(grads, saved)  # the warm-up runs added to the gradients; capture itself computes nothing

    def micro(self, batch: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
        """Forward + backward of one micro-batch (input_ids, labels and, keeping documents apart, their documents,
        exactly batch_size x length); the loss sum."""
        if batch["input_ids"].shape != self.ids.shape:
            raise ValueError(
                f"graphed step: micro-batch of shape {tuple(batch['input_ids'].shape)}, captured "
                f"for {tuple(self.ids.shape)}"
            )
        self.ids.copy_(batch["input_ids"], non_blocking=True)
        self.labels.copy_(batch["labels"], non_blocking=True)
        for key, buffer in self.inputs.items():
            buffer.copy_(batch[key], non_blocking=True)
        self.scale.fill_(scale)
        if not self.capture:
            return self._forward_backward()
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.loss

    def end(self) -> None:
        """Carry the rotation's gradient back through the matrix exponential into the soul's generators."""
        if self.soul.generators.requires_grad:
            self.soul.rotation().backward(self.rotation.grad)
