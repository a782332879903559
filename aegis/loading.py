"""Load the base model (hub id, local directory or the embedded tiny Phi-3), quantize it, add LoRA, attach the soul."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from . import checkpoint, families, manifest, memory
from .config import EMBEDDED, Config
from .errors import ModelError
from .pretrained import pretrained
from .tiny import ensure as ensure_tiny

# torch, transformers, peft and the soul (a torch module) are imported by the functions that build models: serve's
# torch-less image imports this module with its transformers backend, and the CLIs start without torch.
if TYPE_CHECKING:
    import torch
    from torch import nn

# The families that go end to end, with `lora.target_modules = "auto"`'s targets: aegis/families/ declares them.
AUTO_TARGETS = {f.name: list(f.lora_targets) for f in families.FAMILIES.values()}
HUB_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def check_architecture(config_path: Path) -> None:
    """Refuse a base whose architecture AEGIS does not support, from its config.json, before any weights load."""
    import json

    try:
        cfg = json.loads(Path(config_path).read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"{config_path}: cannot read the base's config ({e})") from None
    kind, archs = cfg.get("model_type"), cfg.get("architectures") or []
    if kind not in AUTO_TARGETS or any(not a.endswith("ForCausalLM") for a in archs):
        raise ModelError(
            f"{config_path}: model_type {kind!r} (architectures {', '.join(archs) or 'none'}) is not "
            f"supported; AEGIS trains and exports causal LMs of: {', '.join(AUTO_TARGETS)}"
        )


def check_model_dir(path: Path) -> None:
    """A local base must hold a model as transformers saves one: config.json, safetensors weights (no pickle is
    ever loaded) and a tokenizer. What is missing is named before anything tries to load it."""
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    if not any(path.glob("*.safetensors")):
        missing.append("weights (*.safetensors)")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        missing.append(f"tokenizer ({', '.join(TOKENIZER_FILES[:-1])} or {TOKENIZER_FILES[-1]})")
    if missing:
        raise ModelError(f"model.base: {path} is not a Hugging Face model directory: it has no {', no '.join(missing)}")


def resolve_base(base: str, revision: str = "") -> Path:
    """A local directory for `base`: the embedded tiny model, an existing directory, or a hub snapshot; its
    architecture is checked first (a hub model's config.json is fetched alone before the weights).

    Hub downloads go through huggingface-hub, which honours HF_HOME, HF_TOKEN and HF_HUB_OFFLINE (offline, a
    snapshot already in the cache is used)."""
    if base == EMBEDDED:
        return ensure_tiny()
    path = Path(base).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            check_architecture(path / "config.json")  # the first thing to say about a family AEGIS cannot take
        check_model_dir(path)
        return path
    if path.exists() or base.startswith((".", "/", "~")) or base.count("/") != 1:
        raise ModelError(f"model.base: {base!r} is neither a directory with a model nor a hub id (owner/name)")
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        # the architecture is checked from config.json before any weights are fetched
        check_architecture(Path(hf_hub_download(repo_id=base, filename="config.json", revision=revision or None)))
        return Path(snapshot_download(repo_id=base, revision=revision or None, allow_patterns=HUB_FILES))
    except (HfHubHTTPError, LocalEntryNotFoundError) as e:  # not on the hub, no access, or offline and not cached
        raise ModelError(f"model.base: {base!r} could not be fetched from the hub: {e}") from e


def device_for(local_rank: int = 0) -> torch.device:
    import torch

    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


def compute_dtype(name: str, device: torch.device) -> torch.dtype:
    import torch

    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32  # CPUs here have no fast half-precision matmul; the 4-bit storage is the same


def load_base(path: Path, quantization: str, dtype: torch.dtype, device: torch.device) -> nn.Module:
    import torch
    from transformers import BitsAndBytesConfig

    kwargs = {"dtype": dtype, "device_map": {"": device}}
    if quantization == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_storage=torch.uint8,
        )
    model = pretrained(path, **kwargs)
    model.config.use_cache = False
    return model


def _linear_names(model: nn.Module) -> set[str]:
    """Leaf names of every linear layer (4-bit ones included) except the output head."""
    from torch import nn

    head = model.get_output_embeddings()
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module is not head and not name.endswith("lm_head"):
            names.add(name.rsplit(".", 1)[-1])
    return names


def target_modules(model: nn.Module, spec: str | list[str]) -> list[str]:
    """Resolve `lora.target_modules`; a name that matches no module is an error, not a silent no-op."""
    present = _linear_names(model)
    if spec == "auto":
        kind = model.config.model_type
        if kind not in AUTO_TARGETS:
            raise ModelError(
                f"lora.target_modules: no 'auto' targets known for model type {kind!r}; "
                f"name them (linear layers here: {', '.join(sorted(present))})"
            )
        spec = AUTO_TARGETS[kind]
    elif spec == "all-linear":
        return sorted(present)
    missing = [n for n in spec if n not in present]
    if missing:
        raise ModelError(
            f"lora.target_modules: {', '.join(missing)} match no linear layer of this model "
            f"(it has: {', '.join(sorted(present))})"
        )
    return list(spec)


def enable_checkpointing(model: nn.Module) -> None:
    """Gradient checkpointing of every decoder layer, non-reentrant, under the name this transformers has for it."""
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.18's name for it
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()


def add_lora(model: nn.Module, cfg: Config, checkpointing: bool = False):
    from peft import LoraConfig, get_peft_model

    targets = target_modules(model, cfg.lora.target_modules)
    for p in model.parameters():
        p.requires_grad_(False)
    if checkpointing:
        enable_checkpointing(model)
    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def build(cfg: Config, base_path: Path, device: torch.device, seed: int, log=print, plan=None):
    """Base (quantized as configured) + LoRA + soul, ready to train. Returns (peft_model, soul).
    `plan` is the memory plan when the caller has made it already. The decoder layers' blocks are compiled when
    model.compile is set (a captured step then replays the compiled kernels)."""
    import torch
    from transformers import AutoConfig

    from . import soul as soul_mod

    p = plan or memory.plan_for(cfg, AutoConfig.from_pretrained(base_path), device, log)
    # the budget is GPU memory; a split and a dequantized base apply wherever it runs
    if (
        device.type == "cuda"
        or p.micro_batch < cfg.train.batch_size
        or p.dequantized_base
        or p.tiled_mlp
        or p.tiled_attention
    ):
        log(memory.summary(p, cfg.train.batch_size, cfg.model.quantization == "nf4"))
    dtype = compute_dtype(cfg.model.dtype, device)
    model = load_base(base_path, cfg.model.quantization, dtype, device)
    from .causal import use_causal_sdpa

    use_causal_sdpa(model, cfg.train.max_length)  # no mask is built per forward (aegis/causal.py)
    model = add_lora(model, cfg, checkpointing=p.gradient_checkpointing)
    if p.dequantized_base:  # after LoRA wraps the 4-bit layers: the adapters stay exactly as PEFT made them
        from .dequant import dequantize_base

        layers, size = dequantize_base(model)
        log(f"dequantized {layers} 4-bit linear layers once: {size / 2**30:.2f} GiB of {dtype} weights")
    from .tiled import tile_attentions, tile_mlps

    if p.tiled_mlp:
        tile_mlps(model)
    if p.tiled_attention:
        tile_attentions(model)
    from .lora import compute_dtype_lora
    from .norms import fuse_rms_norms

    compute_dtype_lora(model)  # the adapters computed in the compute dtype (aegis/lora.py)
    fuse_rms_norms(model)  # one kernel per norm each way (aegis/norms.py)
    if cfg.model.compile:
        log(f"model.compile: {compile_blocks(model, p)} blocks of the decoder layers compiled")
    hidden = model.get_base_model().get_output_embeddings().in_features
    gen = torch.Generator().manual_seed(seed)
    soul = soul_mod.Soul(hidden, mix=cfg.soul.mix, init=cfg.soul.init, alpha=cfg.schedule.start_alpha, generator=gen)
    soul_mod.attach(model, soul)
    return model, soul


def compile_blocks(model: nn.Module, p, **options) -> int:
    """torch.compile the blocks inside each decoder layer (`options` go to torch.compile); returns how many.
    The blocks, not the layer: transformers checkpoints a layer's forward, and a checkpoint traced into a compiled
    layer keeps far more alive (BENCHMARKS.md). A tiled MLP or attention runs its pieces under checkpoints of their
    own, which compiled code would trace, so those stay as they are."""
    from torch import nn

    names = (
        ("input_layernorm", "post_attention_layernorm")
        + (() if p.tiled_attention else ("self_attn",))
        + (() if p.tiled_mlp else ("mlp",))
    )
    blocks = [
        getattr(layer, name)
        for layer in model.get_base_model().model.layers
        for name in names
        if isinstance(getattr(layer, name, None), nn.Module)
    ]
    for block in blocks:
        block.compile(**options)
    return len(blocks)


def lora_module_names(model: nn.Module) -> list[str]:
    """Names of the modules that carry LoRA weights (for checks and tests)."""
    return sorted({re.sub(r"\.lora_[AB].*$", "", n) for n, _ in model.named_parameters() if ".lora_" in n})


def load_checkpoint(
    ckpt: Path,
    base: str | None = None,
    quantization: str | None = None,
    dtype: str = "auto",
    device: torch.device | None = None,
):
    """Base + PEFT adapter + soul from a checkpoint directory, for inference (chat, eval, export, serve).

    The base is the one named in the soul's metadata unless `base` overrides it; quantization defaults to what
    the checkpoint was trained with. Returns (model, soul, tokenizer, soul_metadata)."""
    from peft import PeftModel
    from transformers import AutoConfig, AutoTokenizer

    from . import soul as soul_mod

    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise checkpoint.CheckpointError(f"{ckpt}: no such checkpoint directory")
    for name in checkpoint.REQUIRED:
        if not (ckpt / name).is_file():
            raise checkpoint.CheckpointError(f"{ckpt}: missing {name}; not a complete AEGIS checkpoint")
    manifest.verify(ckpt)  # every reader (chat, eval, export, serve) trusts a checkpoint only once it verifies
    tensors, meta = checkpoint.read_soul(ckpt)
    device = device or device_for()
    base_path = resolve_base(base or meta["base"], meta.get("revision", ""))
    hidden = AutoConfig.from_pretrained(base_path).hidden_size
    if hidden != meta["hidden_size"]:
        raise checkpoint.CheckpointError(
            f"{ckpt / checkpoint.SOUL}: the soul was trained for hidden size "
            f"{meta['hidden_size']}, but the base {base_path} has {hidden}"
        )
    model = load_base(base_path, quantization or meta.get("quantization", "none"), compute_dtype(dtype, device), device)
    model = PeftModel.from_pretrained(model, ckpt, is_trainable=False)
    soul = soul_mod.Soul(hidden, mix=meta["mix"])
    checkpoint.load_soul_into(soul, ckpt)
    soul_mod.attach(model, soul)
    model.eval()
    tok_dir = ckpt if (ckpt / "tokenizer_config.json").exists() else base_path
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    meta["base_path"] = str(base_path)
    return model, soul, tokenizer, meta
