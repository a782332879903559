"""Chat with a checkpoint in the terminal: python -m train.chat --checkpoint RUN_DIR/final [--prompt TEXT]

Loads the base as trained (4-bit or not), the PEFT adapter and the soul through aegis.loading.load_checkpoint,
renders the conversation with the tokenizer's chat template and streams the reply. Commands in the loop:
/reset (forget the conversation), /system TEXT (set the system prompt; /system alone clears it), /help, /exit.
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from aegis import checkpoint, cli, families, runs
from aegis.cli import setting
from aegis.errors import AegisError
from aegis.loading import load_checkpoint

END_OF_TURN = families.end_of_turn()  # every family's (aegis/families/): those the tokenizer knows are used
PROG = "python -m train.chat"
HELP = "commands: /reset  /system TEXT  /help  /exit   (Ctrl-D also exits)"


def stop_ids(model, tokenizer) -> list[int]:
    """The generation config's eos ids plus the tokenizer's own end-of-turn tokens, so a reply stops at <|end|>."""
    gen = getattr(model, "generation_config", None)
    ids = gen.eos_token_id if gen is not None else None
    ids = [] if ids is None else ([ids] if isinstance(ids, int) else list(ids))
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    ids += [vocab[t] for t in END_OF_TURN if t in vocab]
    return sorted(set(ids))


class Chat:
    """A conversation with one loaded model: history, system prompt, sampling settings."""

    def __init__(
        self,
        model,
        tokenizer,
        temperature: float = 0.7,
        top_p: float = 0.9,
        max_new_tokens: int = 256,
        system: str | None = None,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.temperature, self.top_p, self.max_new_tokens = temperature, top_p, max_new_tokens
        self.system = system
        self.history: list[dict] = []
        self.eos = stop_ids(model, tokenizer)
        cfg = getattr(model, "config", None)
        self.context = getattr(cfg, "max_position_embeddings", None) or 4096

    def reset(self) -> None:
        self.history = []

    def messages(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.history

    def _prompt_ids(self) -> torch.Tensor:
        """The rendered conversation; the oldest exchanges are dropped while it would not fit the context."""
        while True:
            ids = self.tokenizer.apply_chat_template(
                self.messages(), add_generation_prompt=True, tokenize=True, return_tensors="pt", return_dict=True
            )["input_ids"]
            if ids.shape[1] + self.max_new_tokens <= self.context or len(self.history) <= 1:
                return ids
            self.history = self.history[2:]  # one user turn and its reply

    def reply(self, text: str, out=sys.stdout) -> str:
        """Answer `text`, streaming the reply to `out`; the exchange is kept in the history."""
        from transformers import TextIteratorStreamer

        self.history.append({"role": "user", "content": text})
        ids = self._prompt_ids()
        device = next(self.model.parameters()).device
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        sample = self.temperature > 0
        kwargs = dict(
            input_ids=ids.to(device),
            attention_mask=torch.ones_like(ids).to(device),
            streamer=streamer,
            max_new_tokens=self.max_new_tokens,
            do_sample=sample,
            eos_token_id=self.eos,
            pad_token_id=self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos[0],
            use_cache=True,
        )
        if sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p)
        else:  # greedy: don't let the model's own sampling defaults leak in (and warn)
            kwargs.update(temperature=None, top_p=None, top_k=None)
        errors: list[BaseException] = []

        def work():
            try:
                with torch.no_grad():
                    self.model.generate(**kwargs)
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                errors.append(e)
                streamer.end()

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        pieces = []
        for piece in streamer:
            pieces.append(piece)
            out.write(piece)
            out.flush()
        thread.join()
        out.write("\n")
        out.flush()
        if errors:
            self.history.pop()
            raise errors[0]
        answer = "".join(pieces).strip()
        self.history.append({"role": "assistant", "content": answer})
        return answer


def loop(chat: Chat, inp=sys.stdin, out=sys.stdout) -> None:
    interactive = inp.isatty()
    if interactive:
        out.write(HELP + "\n")
    while True:
        if interactive:
            out.write("\n> ")
            out.flush()
        line = inp.readline()
        if not line:
            return
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            cmd, _, arg = line.partition(" ")
            if cmd in ("/exit", "/quit"):
                return
            if cmd == "/reset":
                chat.reset()
                out.write("(conversation cleared)\n")
            elif cmd == "/system":
                chat.system = arg.strip() or None
                chat.reset()
                out.write(f"(system prompt {'set' if chat.system else 'cleared'}; conversation cleared)\n")
            elif cmd == "/help":
                out.write(HELP + "\n")
            else:
                out.write(f"unknown command {cmd}; {HELP}\n")
            continue
        chat.reply(line, out)


def checkpoint_dir(value: str) -> Path:
    """--checkpoint: a checkpoint directory as it is, or a run directory's final/ (else its newest complete
    checkpoint)."""
    path = Path(value)
    if not path.is_dir() or any((path / name).exists() for name in checkpoint.REQUIRED):
        return path  # missing, or a checkpoint (complete or not): loading says what is wrong with it
    if (path / runs.CONFIG).is_file() or (path / checkpoint.FINAL).exists() or (path / checkpoint.CHECKPOINTS).is_dir():
        found = checkpoint.latest(path, resumable=False)
        if found is None:
            raise ValueError(
                f"this run has no complete checkpoint yet (neither {checkpoint.FINAL}/ nor checkpoints/step_N)"
            )
        return found
    raise ValueError(
        "neither a checkpoint nor a run directory; pass RUN_DIR, RUN_DIR/final or RUN_DIR/checkpoints/step_N"
    )


def _top_p(text: str) -> float:
    value = cli.CONVERT[float](text)
    if not 0 < value <= 1:
        raise ValueError("must be in (0, 1]")
    return value


@dataclass
class Args:
    """Chat with a trained checkpoint (base + LoRA adapter + soul) in the terminal, or answer one --prompt."""

    checkpoint: Path = setting(
        help="RUN_DIR (its final/, else its newest checkpoint), RUN_DIR/final or RUN_DIR/checkpoints/step_N",
        parse=checkpoint_dir,
        metavar="DIR",
        env="AEGIS_CHECKPOINT",
        required=True,
    )
    prompt: str | None = setting(None, "answer this once and exit", metavar="TEXT")
    system: str | None = setting(None, "system prompt", metavar="TEXT")
    temperature: float = setting(0.7, "0 for greedy decoding", parse=cli.bounded(float, 0))
    top_p: float = setting(0.9, "nucleus sampling mass, in (0, 1]", parse=_top_p, metavar="P")
    max_new_tokens: int = setting(256, "the longest reply, in tokens", parse=cli.bounded(int, 1))
    seed: int | None = setting(None, "seed for sampling (reproducible replies)")
    base: str | None = setting(None, "use this base instead of the one the checkpoint names", metavar="NAME")
    quantization: str | None = setting(
        None, "override the quantization the checkpoint was trained with", choices=("nf4", "none")
    )

    def problems(self) -> list[str]:
        return ["--prompt: empty"] if self.prompt is not None and not self.prompt.strip() else []


def chat(args: Args) -> None:
    try:
        model, soul, tokenizer, meta = load_checkpoint(args.checkpoint, base=args.base, quantization=args.quantization)
    except AegisError as e:  # the checkpoint or base the user named
        raise cli.UsageError(str(e).splitlines()) from None
    if args.seed is not None:
        from transformers import set_seed

        set_seed(args.seed)
    print(
        f"loaded {args.checkpoint} (step {meta.get('step')}, gate {float(soul.gate()):.4f}, "
        f"base {meta.get('base')}, {meta.get('quantization')})",
        file=sys.stderr,
    )
    talk = Chat(model, tokenizer, args.temperature, args.top_p, args.max_new_tokens, args.system)
    try:
        if args.prompt is not None:
            talk.reply(args.prompt)
        else:
            loop(talk)
    except KeyboardInterrupt:
        print(file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    return cli.main(lambda: chat(cli.parse(Args, sys.argv[1:] if argv is None else argv, prog=PROG)))


if __name__ == "__main__":
    sys.exit(main())
