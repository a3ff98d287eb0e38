#!/usr/bin/env python
"""Time the region editor's edits in-process (no browser): wall and CPU seconds per edit.

  python tools/measure_editor.py --trained_ckpt CKPT [model flags] [--edits 8] [--device cpu]

Renders N texture edits (hair), N shape edits (face) and N camera moves with the hair edit on, each to
a state not seen before (nothing from the cache), then one repeated state (from the cache), and prints
the medians. CPU seconds are the process's user + system time over the edit: on a machine shared with
other work the wall time grows while the CPU time does not, so CPU time bounds what an idle core takes.
tools/editor_screenshot.py --measure times the same edits as a user sees them in the browser.
"""
import os
import resource
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from common.cli import UsageError, command  # noqa: E402
from editing import region_editor  # noqa: E402
from rendering import loading as gen  # noqa: E402


def add_arguments(group):
    group.add_argument("--edits", type=int, default=8, help="edits of each kind (1-19)")
    group.add_argument("--inference_samples", type=int, default=0, help="as editor.py (default --N_samples)")


def cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(editor, data):
    state = editor.parse(data)
    wall, cpu = time.perf_counter(), cpu_seconds()
    result = editor.render(state)
    return time.perf_counter() - wall, cpu_seconds() - cpu, result["cached"]


@command
def main(argv=None):
    opt, own = gen.parse_options(argv, add_arguments, "measure_editor")
    if not 1 <= own.edits <= 19:
        raise UsageError(f"--edits must be 1..19, got {own.edits}")
    samples = own.inference_samples or opt.rendering.N_samples
    editor = region_editor.load_editor(opt, samples, opt.model.renderer_spatial_output_dim, samples)
    k = editor.n_regions
    base = {"source": 3, "reference": 7}
    timed(editor, base)  # the source's view and shape: every later edit finds them cached
    values = [round(0.05 * (i + 1), 2) for i in range(own.edits)]
    hair = [0.0] * k
    hair[7] = 1.0
    kinds = {
        "texture edit (hair)": [dict(base, texture=[v if r == 7 else 0.0 for r in range(k)]) for v in values],
        "shape edit (face)": [dict(base, shape=[v if r == 1 else 0.0 for r in range(k)]) for v in values],
        "camera move with an edit": [dict(base, texture=hair, azim=round(0.02 * (i + 1), 2)) for i in range(own.edits)],
    }
    print(f"{editor.label}; torch threads {__import__('torch').get_num_threads()}; load {os.getloadavg()[0]:.1f}")
    for name, states in kinds.items():
        runs = [timed(editor, s) for s in states]
        assert not any(cached for _, _, cached in runs)
        walls, cpus = [w for w, _, _ in runs], [c for _, c, _ in runs]
        print(f"{name:26s} wall median {statistics.median(walls):.2f} s (min {min(walls):.2f}, max {max(walls):.2f}); "
              f"CPU median {statistics.median(cpus):.2f} s; n={len(runs)}")
    wall, cpu, cached = timed(editor, kinds["texture edit (hair)"][0])
    print(f"{'repeated view (cache)':26s} wall {wall * 1000:.1f} ms, cached={cached}")


if __name__ == "__main__":
    main()
