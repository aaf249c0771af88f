"""Throughput of the scene generator: python -m westar.synth.bench [--n 300] [--size 126]."""

from .scenes import SceneParams, render_scene


def main(argv=None) -> None:
    """python -m westar.synth.bench [--n 300] [--size 126]: generator throughput."""
    import argparse
    import time

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--size", type=int, default=126)
    ap.add_argument("--no-shadows", action="store_true")
    a = ap.parse_args(argv)
    prm = SceneParams(height=a.size, width=a.size, shadows=not a.no_shadows)
    render_scene(0, prm)
    t0 = time.perf_counter()
    for s in range(a.n):
        render_scene(s, prm)
    dt = time.perf_counter() - t0
    print(f"{a.n} scenes {a.size}x{a.size} in {dt:.2f} s: {a.n / dt:.0f} img/s (one process)")


if __name__ == "__main__":
    main()
