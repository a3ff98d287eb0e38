"""The order training images are drawn in: an endless shuffled stream that a resumed run continues exactly,
under one process or DDP."""
import os

import torch
from torch.utils import data

import distributed as dist_utils


class ResumableSampler(data.Sampler):
    """An endless, shuffled index stream that a resumed run continues exactly.

    Epoch e is the permutation a DistributedSampler(seed, epoch=e) gives this rank (one replica when
    not distributed), so the order depends only on (seed, rank, world size) and the number of
    samples already drawn -- `start` skips those.
    """

    def __init__(self, dataset, seed=0, start=0, num_replicas=1, rank=0, shuffle=True):
        self.dataset = dataset
        self.seed = int(seed)
        self.start = int(start)
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle

    def _epoch(self, epoch):
        sampler = data.distributed.DistributedSampler(self.dataset, num_replicas=self.num_replicas, rank=self.rank,
                                                      shuffle=self.shuffle, seed=self.seed, drop_last=False)
        sampler.set_epoch(epoch)
        return list(iter(sampler))

    def __iter__(self):
        per_epoch = len(self._epoch(0))
        epoch, offset = divmod(self.start, per_epoch)
        while True:
            indices = self._epoch(epoch)
            for index in indices[offset:]:
                yield index
            offset = 0
            epoch += 1

    def __len__(self):  # endless; DataLoader only needs this for its own bookkeeping
        return 2 ** 62


def loader_workers(requested, device, deterministic=False):
    """--num_workers, or by default: 0 on the CPU and with --deterministic (the flips then come from the
    main process's Python RNG, which checkpoints carry, so a resumed run continues exactly; on a CPU the
    workers would also take cores from the training step), else up to 4 per process on this machine's
    cores, so that decoding the next batch overlaps the device's work."""
    if requested is not None:
        return int(requested)
    if torch.device(device).type == "cpu" or deterministic:
        return 0
    try:  # processes on this machine (torchrun sets it)
        per_node = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        per_node = 1
    return max(1, min(4, (os.cpu_count() or 1) // per_node - 1))


def make_loader(dataset, batch, seed, start_iteration, num_workers, device):
    """A DataLoader over `dataset` that continues where iteration `start_iteration` left off."""
    sampler = ResumableSampler(dataset, seed=seed, start=start_iteration * batch,
                               num_replicas=dist_utils.get_world_size(), rank=dist_utils.get_rank())
    # Workers draw their flip decisions from seeds derived from this generator; seeding it from the
    # start iteration makes runs with workers reproducible (bit-exact resume needs num_workers 0,
    # where flips come from the main process's Python RNG, which checkpoints carry).
    generator = torch.Generator().manual_seed(int(seed) * 1000003 + start_iteration)
    return data.DataLoader(dataset, batch_size=batch, sampler=sampler, drop_last=True, num_workers=num_workers,
                           pin_memory=device.type == "cuda", generator=generator,
                           persistent_workers=num_workers > 0)
