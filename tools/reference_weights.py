"""The reference weight recipe of ../shared/reference (conformance_vectors.pt, training_vectors.pt), shared by
tools/check_conformance.py and tools/check_training_conformance.py."""
import zlib

import torch


def fill_recipe(module, stats, seed, name):
    """Overwrite every state entry named in `stats` {key: [mean, spread]} in place with the recipe's tensor:
    (mean + spread * randn(shape, generator seeded from (seed, crc32(key)))).half().float().

    Keys the recipe does not name (filter kernels `*.kernel`) keep their constructed values; a module whose
    floating keys differ from `stats` is not the published architecture (one-line exit naming `name`)."""
    state = module.state_dict()
    floating = {k for k, v in state.items() if v.is_floating_point() and not k.endswith(".kernel")}
    missing, extra = sorted(set(stats) - set(state)), sorted(floating - set(stats))
    if missing or extra:
        raise SystemExit(f"error: {name}: keys differ from the vectors file (missing here: {missing[:5]}, "
                         f"not in the file: {extra[:5]}): not the published architecture")
    with torch.no_grad():
        for key, (mean, spread) in stats.items():
            gen = torch.Generator().manual_seed((seed * 1000003 + zlib.crc32(key.encode())) % 2 ** 63)
            state[key].copy_((mean + spread * torch.randn(state[key].shape, generator=gen)).half().float())
