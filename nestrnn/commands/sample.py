"""``nestrnn sample RUN_DIR --prime TEXT``: generate text from a trained language model."""

from __future__ import annotations

import argparse
import math

import torch

from nestrnn.errors import UserError
from nestrnn.output import stdout_to_stderr

HELP = "generate text from a trained language model (ptb_char, text8, chinese_poems, text_file)"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by train")
    parser.add_argument("--prime", default="", help="text to start from (default: a line start)")
    parser.add_argument("--length", type=int, default=200, help="symbols to generate (200)")
    parser.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        help="sampling temperature: lower is more conservative, 0 is greedy (default 1.0)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--checkpoint", default="best", help="best (default), last, or a path")
    parser.add_argument("--device", help="auto, cpu, cuda (default: cpu)")


@torch.no_grad()
def generate(
    model, task, prime: list[int], length: int, temperature: float, seed: int, device: torch.device
) -> list[int]:
    """Feed ``prime`` then sample ``length`` symbols, carrying the recurrent state."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    tokens = torch.tensor([prime], dtype=torch.long, device=device)
    logits, state = model(tokens, None)
    out: list[int] = []
    for _ in range(length):
        last = logits[0, -1].float().cpu()
        if temperature == 0:
            token = int(last.argmax())
        else:
            probs = torch.softmax(last / temperature, dim=-1)
            token = int(torch.multinomial(probs, 1, generator=generator))
        out.append(token)
        logits, state = model(torch.tensor([[token]], device=device), state)
    return out


def run(args: argparse.Namespace) -> int:
    if args.length < 0:
        raise UserError(f"--length must be >= 0, got {args.length}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise UserError(f"--temperature must be a finite number >= 0, got {args.temperature}")
    with stdout_to_stderr():  # a plugin task or memory function may print: not into the text
        text = _sample(args)
    print(text)
    return 0


def _sample(args: argparse.Namespace) -> str:
    """The prime followed by the generated text."""
    from nestrnn.engine.loading import load_run

    loaded = load_run(args.run_dir, args.checkpoint, (), args.device or "cpu", prepare=False)
    task = loaded.task
    if getattr(task, "kind", None) != "lm" or not hasattr(task, "encode"):
        raise UserError(
            f"task {loaded.config.task.name!r} is not a language model; sample works for "
            "ptb_char, text8, chinese_poems and text_file runs"
        )
    prime = task.encode(args.prime)  # text it cannot encode: a UserError naming the symbols
    shown = args.prime
    if not prime:
        symbols = task.vocab.symbols
        start = "\n" if "\n" in symbols else symbols[0]
        prime = [symbols.index(start)]
        shown = ""
    ids = generate(
        loaded.model, task, prime, args.length, args.temperature, args.seed, loaded.device
    )
    return shown + task.decode(ids)
