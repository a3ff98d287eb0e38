#!/usr/bin/env python
"""Interactive region editor in the browser, for a headless machine used locally or over SSH.

  python editor.py [--trained_ckpt CKPT] [--host 127.0.0.1] [--port 7860] [--device cpu] [model flags]

Opens nothing itself: it prints the address to open. From another machine, forward the port first:
`ssh -L 7860:localhost:7860 HOST`, then open http://localhost:7860. The logic is editing/region_editor.py,
the page and its API editing/editor_web.py.

The server answers only requests addressed to it by a localhost name, the --host it listens on or an
--allow_host name, and only the page's own (same-origin) requests change anything or start work, so
other web pages open in the same browser cannot use it; request bodies are limited by --max_request_mb
and --max_upload_mb before they are read.
"""
import socket

from common.checkpoint import CheckpointError
from common.cli import UsageError, command
from options import check_ranges
from rendering import loading as gen

DEFAULT_CKPT = "checkpoints/synthetic_portraits.pt"


def add_arguments(group):
    group.add_argument("--host", type=str, default="127.0.0.1",
                       help="address to listen on (default: this machine only; 0.0.0.0 exposes the editor)")
    group.add_argument("--port", type=int, default=7860, help="port to listen on")
    group.add_argument("--allow_host", action="append", default=[], metavar="NAME",
                       help="another host name the page may be opened under (repeatable; localhost names and "
                            "--host are always accepted; e.g. this machine's name with --host 0.0.0.0)")
    group.add_argument("--max_request_mb", type=int, default=32,
                       help="largest JSON request in MiB (an inversion's portrait and label map, as base64)")
    group.add_argument("--max_upload_mb", type=int, default=16, help="largest latent-file upload in MiB")
    group.add_argument("--inference_samples", type=int, default=0,
                       help="samples per ray while editing (default: --N_samples, for speed; 64 = the published "
                            "inference)")
    group.add_argument("--surface_resolution", type=int, default=0,
                       help="resolution of the shape pass (default: --renderer_spatial_output_dim)")
    group.add_argument("--surface_samples", type=int, default=0,
                       help="samples per ray of the shape pass (default: the editing samples)")
    group.add_argument("--invert_steps", type=int, default=200,
                       help="default Adam steps of an inversion (1..5000, region_editor.MAX_INVERT_STEPS)")
    group.add_argument("--cache_size", type=int, default=64, help="rendered views (and shapes) kept in memory")
    # The shipped model by default (the shared option's default is empty), drawn in bfloat16 where the
    # hardware does it natively (its pictures agree with fp32's at >= 55 dB; --precision fp32 for the published).
    group.set_defaults(trained_ckpt=DEFAULT_CKPT, precision="auto")


def check_port(host, port):
    """Fail with one line now rather than after loading the model when the address cannot be bound."""
    if not 0 < port < 65536:
        raise UsageError(f"--port {port} is not a port number (1-65535)")
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(info[0], socket.SOCK_STREAM) as probe:
            # As uvicorn binds: connections of a previous run in TIME_WAIT do not block the port.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(info[4])
    except OSError as error:
        raise UsageError(f"--host {host} --port {port}: cannot listen there ({error.strerror or error})") from None


@command
def main(argv=None):
    opt, own = gen.parse_options(argv, add_arguments, "editor")
    from editing import region_editor  # after option parsing, so --help stays quick

    samples = own.inference_samples or opt.rendering.N_samples
    check_ranges({"--invert_steps": (own.invert_steps, f"[1, {region_editor.MAX_INVERT_STEPS}]"),
                  "--cache_size": (own.cache_size, ">= 0"), "--max_request_mb": (own.max_request_mb, ">= 1"),
                  "--max_upload_mb": (own.max_upload_mb, ">= 1")})
    check_port(own.host, own.port)
    try:
        editor = region_editor.load_editor(
            opt, samples, own.surface_resolution or opt.model.renderer_spatial_output_dim,
            own.surface_samples or samples, cache_size=own.cache_size, invert_steps=own.invert_steps)
    except CheckpointError as error:
        if opt.training.trained_ckpt == DEFAULT_CKPT and "not found" in str(error):
            raise CheckpointError(f"{error}; the shipped model is not in this checkout yet: pass --trained_ckpt FILE "
                                  f"(and its model flags)") from None
        raise

    import uvicorn

    from editing import editor_web

    app = editor_web.create_app(editor, own.host, own.allow_host, max_request_bytes=own.max_request_mb << 20,
                                max_upload_bytes=own.max_upload_mb << 20)
    print(f"CNeRF region editor: {editor.label}")
    if own.allow_host or own.host not in editor_web.LOCAL_HOSTS:
        print(f"the page answers to the host names {editor_web.HostPolicy(own.host, own.allow_host).describe()}")
    print(f"open http://{own.host}:{own.port}/  (from another machine: ssh -L {own.port}:localhost:{own.port} "
          f"THIS_HOST, then http://localhost:{own.port}/)", flush=True)
    uvicorn.run(app, host=own.host, port=own.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
