"""pagedllm generate | chat | serve | bench — the command line."""

from __future__ import annotations

import argparse
import logging
import sys

from pagedllm.benchmarks import (
    allreduce,
    offline,
    parallel,
    peers,
    prefix_sharing,
    report,
    scaling,
    size_suite,
    synthetic,
)
from pagedllm.benchmarks import serve as bench_serve
from pagedllm.benchmarks import speculative as bench_speculative
from pagedllm.benchmarks import structured as bench_structured
from pagedllm.chat import EngineChat, RemoteChat, run_repl
from pagedllm.config import EngineConfig
from pagedllm.errors import PagedLLMError
from pagedllm.evaluation import kl_divergence, perplexity
from pagedllm.flags import add_dataclass_arguments, dataclass_from_args
from pagedllm.quantize import command as quantize_command
from pagedllm.sampling_params import DOLA_BUCKETS, SamplingParams
from pagedllm.serving import api_server


def _add_sampling_arguments(parser: argparse.ArgumentParser, max_tokens: int) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--max-tokens", type=int, default=max_tokens, help="most tokens to generate")
    group.add_argument("--temperature", type=float, default=0.7, help="0 picks the most likely token")
    group.add_argument("--top-p", type=float, default=0.9)
    group.add_argument("--top-k", type=int, default=0, help="0 disables it; contrastive search's candidates")
    group.add_argument("--repetition-penalty", type=float, default=1.0, help="DoLa's paper uses 1.2")
    group.add_argument(
        "--penalty-alpha", type=float, default=0.0, help="contrastive search's degeneration penalty (with --top-k)"
    )
    group.add_argument(
        "--dola-layers", type=_dola_layers, help="DoLa's premature layers: low, high or comma-separated indices"
    )


def _dola_layers(value: str) -> str | list[int]:
    if value in DOLA_BUCKETS:
        return value
    try:
        return [int(index) for index in value.split(",")]
    except ValueError as error:
        raise argparse.ArgumentTypeError(
            f"expected low, high or comma-separated layer indices, got {value!r}"
        ) from error


def _sampling_params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
        penalty_alpha=args.penalty_alpha,
        dola_layers=args.dola_layers,
    )


def _generate(args: argparse.Namespace) -> int:
    from pagedllm.llm import LLM

    params = _sampling_params(args)
    llm = LLM(**vars(dataclass_from_args(EngineConfig, args)))
    outputs = llm.generate(args.prompt, params, use_tqdm=len(args.prompt) > 1)
    for output in outputs:
        print(output.prompt + output.outputs[0].text)
        print()
    return 0


def _chat(args: argparse.Namespace) -> int:
    params = _sampling_params(args)
    if args.url:
        backend = RemoteChat(args.url, args.api_key)
    else:
        from pagedllm.engine.engine import LLMEngine

        backend = EngineChat(LLMEngine(dataclass_from_args(EngineConfig, args)))
    run_repl(backend, params, args.system)
    return 0


def _serve(args: argparse.Namespace) -> int:
    if args.headless:
        print(f"pagedllm: node {args.node_rank}'s ranks join node 0's engine at {args.master_addr}", flush=True)
    else:
        print(f"pagedllm: loading the model; then the chat page is at http://{args.host}:{args.port}/", flush=True)
    return api_server.run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagedllm", description=__doc__)
    parser.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING or ERROR")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="complete prompts offline")
    generate.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for a batch)")
    _add_sampling_arguments(generate, max_tokens=64)
    add_dataclass_arguments(generate.add_argument_group("engine"), EngineConfig)
    generate.set_defaults(handler=_generate)

    chat = commands.add_parser("chat", help="chat in the terminal, offline or with a server (--url)")
    chat.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000")
    chat.add_argument("--api-key", help="the server's API key")
    chat.add_argument("--system", help="a system prompt")
    _add_sampling_arguments(chat, max_tokens=512)
    add_dataclass_arguments(chat.add_argument_group("engine"), EngineConfig)
    chat.set_defaults(handler=_chat)

    serve = commands.add_parser("serve", help="OpenAI-compatible server with a browser chat page at /")
    api_server.add_arguments(serve)
    serve.set_defaults(handler=_serve)

    bench = commands.add_parser("bench", help="benchmarks against llama.cpp and Hugging Face transformers")
    bench_commands = bench.add_subparsers(dest="bench_command", required=True)
    benches = {
        "serve": bench_serve,
        "offline": offline,
        "peers": peers,
        "report": report,
        "prefix": prefix_sharing,
        "spec": bench_speculative,
        "structured": bench_structured,
        "synth": synthetic,
        "sizes": size_suite,
        "allreduce": allreduce,
        "parallel": parallel,
        "scaling": scaling,
    }
    for name, module in benches.items():
        sub = bench_commands.add_parser(name, help=module.__doc__.splitlines()[0])
        module.add_arguments(sub)
        sub.set_defaults(handler=module.run)

    quantize = commands.add_parser("quantize", help=quantize_command.__doc__.splitlines()[0])
    quantize_command.add_arguments(quantize)
    quantize.set_defaults(handler=quantize_command.run)

    evaluate = commands.add_parser("eval", help="measure model quality through the engine")
    eval_commands = evaluate.add_subparsers(dest="eval_command", required=True)
    ppl = eval_commands.add_parser("perplexity", help=perplexity.__doc__.splitlines()[0])
    perplexity.add_arguments(ppl)
    ppl.set_defaults(handler=perplexity.run)
    kl = eval_commands.add_parser("kl-divergence", help=kl_divergence.__doc__.splitlines()[0])
    kl_divergence.add_arguments(kl)
    kl.set_defaults(handler=kl_divergence.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    try:
        return args.handler(args)
    except PagedLLMError as error:
        print(f"pagedllm: error: {error.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
