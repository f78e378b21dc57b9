"""``ecomrec export triton``: the user tower as a Triton model repository (ONNX + config.pbtxt)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``export`` and its targets."""
    e = sub.add_parser("export", help="export models for other runtimes")
    esub = e.add_subparsers(dest="export_command", required=True, metavar="TARGET")
    t = esub.add_parser("triton", help="Triton model repository: ONNX user tower + config.pbtxt")
    t.add_argument("--model", required=True, help="training run directory")
    t.add_argument("--out", required=True, help="model repository directory")
    t.add_argument("--name", default="user_tower", help="model name in the repository")
    t.add_argument("--max-batch-size", type=int, default=64, help="Triton max_batch_size")
    t.add_argument("--instances", type=int, default=1, help="model instances")
    t.add_argument(
        "--kind", choices=["KIND_CPU", "KIND_GPU"], default="KIND_CPU", help="instance kind"
    )
    t.add_argument(
        "--queue-delay-us", type=int, default=200, help="dynamic batching max queue delay"
    )
    t.set_defaults(func=_export_triton)


def _export_triton(args: argparse.Namespace) -> int:
    from serving.triton import export_triton

    mdir = export_triton(
        args.model,
        args.out,
        name=args.name,
        max_batch_size=args.max_batch_size,
        instances=args.instances,
        kind=args.kind,
        queue_delay_us=args.queue_delay_us,
    )
    print(f"wrote {mdir}/config.pbtxt and {mdir}/1/model.onnx")
    return 0
