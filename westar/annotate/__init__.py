"""`westar annotate`: label ordinal depth pairs in a browser (docs/annotate.md).

    westar annotate --images DIR --out pairs.json [--samples 5] [--port 8765]

starts a local web app (127.0.0.1) and prints its address. Per image the person answers
`--samples` structured samples (an anchor and two points, three pairs each) with one key
per pair: F (farther), C (closer), E (equal). Every answer is written at once to the
pairs file (docs/formats.md), which `westar train --pairs` reads.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["CLI_HELP", "cli_arguments", "cli_run"]

CLI_HELP = "label ordinal depth pairs of an image folder in the browser"


def cli_arguments(p: argparse.ArgumentParser) -> None:
    from westar.cli_flags import MODEL_HELP, deprecated_alias, model_name

    p.add_argument("--images", required=True, help="folder of images to label")
    p.add_argument(
        "--out", required=True, help="pairs JSON to write (read and extended if it exists)"
    )
    p.add_argument(
        "--samples",
        type=int,
        default=5,
        help="structured samples per image, 3 pairs each (default: 5)",
    )
    p.add_argument("--port", type=int, default=8765, help="port (default: 8765; 0 = any free port)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the proposed points (default: 0)")
    p.add_argument(
        "--model",
        type=model_name,
        help=MODEL_HELP + "; points are proposed where its predictions disagree (default: none)",
    )
    p.add_argument(
        "--adapter",
        help="peft adapter of --model: points where teacher (base) and student (adapted) "
        "disagree (default: none)",
    )
    p.add_argument(
        "--image-size",
        dest="size",
        type=int,
        default=None,
        help="inference shorter side for --model (default: the model's)",
    )
    deprecated_alias(p, "--size", "--image-size", "size", type=int)
    p.add_argument("--open", action="store_true", help="open the page in the default browser")  # fmt: skip


def cli_run(args: argparse.Namespace) -> int:
    if args.adapter and not args.model:
        raise ValueError("--adapter needs --model (the base model it adapts)")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    check_arguments(args)
    lock = _lock_out(Path(args.out))
    try:
        return _serve(args)
    finally:
        lock.release()


MAX_SAMPLES = 50  # per image: 150 pairs to answer; more makes the proposal (and the page) crawl


def check_arguments(args: argparse.Namespace) -> None:
    """--samples, --seed and --size in range: one line naming the flag, before any work."""
    from westar.evaluate import check_inference_size

    if not 1 <= args.samples <= MAX_SAMPLES:
        raise ValueError(f"--samples must be in 1..{MAX_SAMPLES} per image, got {args.samples}")
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    check_inference_size(args.size, "--size")


def _lock_out(out: Path):
    """One `westar annotate` per --out: a second one would overwrite the first's answers."""
    from westar.checkpoint import RunLock

    if not out.parent.is_dir():
        raise FileNotFoundError(2, "folder of --out not found", str(out.parent))
    return RunLock(out.parent, f".{out.name}.lock", "westar annotate", "--out").acquire()


def _serve(args: argparse.Namespace) -> int:
    from westar.annotate.server import make_server
    from westar.annotate.store import AnnotationSession

    score_fn = None
    if args.model:
        from westar.annotate.guide import make_score_fn

        score_fn = make_score_fn(args.model, args.adapter, size=args.size)
    session = AnnotationSession(args.images, args.out, samples=args.samples, seed=args.seed,
                                score_fn=score_fn)  # fmt: skip
    server = make_server(session, args.host, args.port)
    host = args.host if ":" not in args.host else f"[{args.host}]"
    url = f"http://{host}:{server.server_port}/"
    for note in session.notes:
        print(f"westar annotate: note: {note}", file=sys.stderr)
    summary = session.summary()
    print(
        f"westar annotate: {len(session.items)} images, {summary['images_done']} done; "
        f"answers are saved to {session.out}\n"
        f"open {url} in a browser (Ctrl+C to stop)",
        flush=True,
    )
    if args.open:
        import webbrowser

        webbrowser.open(url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    summary = session.summary()
    print(
        f"westar annotate: {summary['images_done']}/{len(session.items)} images done, "
        f"{summary['pairs_done']} pairs answered, saved in {session.out}"
    )
    conflicts = session.document()["annotate"]["unresolved_conflicts"]
    if conflicts:
        print(
            f"westar annotate: warning: contradictions left in {len(conflicts)} images "
            f"({', '.join(sorted(conflicts)[:5])}); run again to fix them",
            file=sys.stderr,
        )
    return 0
