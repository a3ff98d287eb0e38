"""The training step as published (issue 11): sphere initialisation with the GAN optimiser, stage-2
lazy R1 inside the one D step, stage-2 D loss per chunk, stage-1 fakes per chunk; the draws object."""
import copy
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from munch import Munch  # noqa: E402

from common import draws  # noqa: E402
from losses import d_logistic_loss, r1_image_and_mask  # noqa: E402
from options import default_options  # noqa: E402
from training import steps  # noqa: E402

TINY = ["--renderer_spatial_output_dim", "8", "--style_dim", "32", "--width", "32", "--N_samples", "8",
        "--device", "cpu", "--d_channel_scale", "0.25"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def stage1(*extra):
    opt = default_options(TINY + ["--size", "8", *map(str, extra)])
    g, _, gd, sd = steps.build_stage1(opt, torch.device("cpu"))
    g_optim, gd_optim, sd_optim = steps.stage1_optimizers(opt, g, gd, sd)
    return opt, Munch(g=g, g_module=g, gd=gd, sd=sd, g_optim=g_optim, gd_optim=gd_optim, sd_optim=sd_optim,
                      device=torch.device("cpu"), resolution=8)


def stage2(*extra):
    opt = default_options(TINY + ["--size", "16", "--channel_multiplier", "1", *map(str, extra)])
    g, _, d = steps.build_stage2(opt, torch.device("cpu"))
    g_optim, d_optim = steps.stage2_optimizers(opt, g, d)
    return opt, Munch(g=g, g_module=g, d=d, g_optim=g_optim, d_optim=d_optim, device=torch.device("cpu"),
                      resolution=8)


def real_batch(n, size):
    return torch.rand(n, 3, size, size) * 2 - 1, (torch.rand(n, 9, size, size) > 0.5).float()


def adam_steps(optimizer, param):
    state = optimizer.state.get(param, {})
    return int(state["step"]) if "step" in state else 0


def test_sphere_init_steps_the_gan_optimiser_and_its_state_carries_on():
    opt, m = stage1("--batch", 2, "--chunk", 2)
    params = dict(m.g.named_parameters())
    init = params["renderer.init_network.sdf_linear.weight"]
    mapping = params["style.0.weight"]
    region = params["renderer.network.0.sdf_linear.weight"]
    group = m.g_optim.param_groups[0]
    assert group["lr"] == 2e-5 and tuple(group["betas"]) == (0.0, 0.9)  # the published GAN settings
    for step in range(2):
        steps.sphere_init_step(m, opt, step)
    assert adam_steps(m.g_optim, init) == 2 and adam_steps(m.g_optim, mapping) == 2
    assert adam_steps(m.g_optim, region) == 0
    assert all(p.grad is None for p in m.g.parameters())  # nothing stale reaches the first GAN step
    before = init.detach().clone()
    steps.stage1_iteration(m, opt, *real_batch(2, 8), 0)
    # The same optimiser goes on: the mapping's Adam counts 3 steps, the regions' 1; the initial SDF
    # network takes no gradient in GAN training, so Adam leaves it (and its count) alone.
    assert adam_steps(m.g_optim, mapping) == 3 and adam_steps(m.g_optim, region) == 1
    assert adam_steps(m.g_optim, init) == 2 and torch.equal(init, before)


def test_stage1_fakes_are_generated_chunk_by_chunk():
    opt, m = stage1("--batch", 2, "--chunk", 1)
    calls = []
    m.g.register_forward_pre_hook(lambda module, args: calls.append(args[0][0].shape[0]))
    records = steps.stage1_iteration(m, opt, *real_batch(2, 8), 0)
    assert calls == [1, 1, 1, 1]  # D: one call per chunk slice of one draw; G: one per chunk
    assert [name for name, _ in records] == ["d_loss", "sd_loss", "g_loss", "g_loss"]
    assert records[0][1]["gen_imgs"].shape[0] == 2


def snapshot_before_step(optimizer, module, into):
    """Keep D's state and gradients just before the (first) step."""
    def hook(*_):
        into.setdefault("state", (copy.deepcopy(module.state_dict()), [p.grad.clone() for p in module.parameters()]))
    optimizer.register_step_pre_hook(hook)


def test_generator_chunks_have_chunk_samples_as_published():
    """--batch 3 --chunk 2: the D fakes are the batch's slices [2, 1]; every generator chunk draws
    --chunk samples (the published loop draws `opt.chunk`, so G sees 4)."""
    opt, m = stage1("--batch", 3, "--chunk", 2)
    calls = []
    m.g.register_forward_pre_hook(lambda module, args: calls.append(args[0][0].shape[0]))
    steps.stage1_iteration(m, opt, *real_batch(3, 8), 0)
    assert calls == [2, 1, 2, 2]


def test_path_regularisation_repeats_per_chunk_as_published():
    """Path batch 2 with --chunk 1: two passes over the whole path batch (published loop), the
    running mean updated by each, one optimiser step."""
    opt, m = stage2("--batch", 4, "--chunk", 1)
    count = count_steps(m.g_optim)
    calls = []
    m.g.register_forward_pre_hook(lambda module, args, kwargs: calls.append(args[0][0].shape[0]), with_kwargs=True)
    records, mean = steps.stage2_path_phase(m, opt, 0.0, 0)
    assert calls == [2, 2] and len(records) == 2 and len(count) == 1
    first = 0.01 * float(records[0]["path_lengths"].mean())
    assert float(records[0]["mean_path_length"]) == pytest.approx(first)
    assert mean == pytest.approx(first + 0.01 * (float(records[1]["path_lengths"].mean()) - first))


def count_steps(optimizer):
    count = []
    optimizer.register_step_pre_hook(lambda *_: count.append(1))
    return count


def test_stage2_lazy_r1_is_added_to_the_same_discriminator_step():
    opt, m = stage2("--batch", 2, "--chunk", 2)
    assert opt.training.d_reg_every == 16
    count = count_steps(m.d_optim)
    before = {}
    snapshot_before_step(m.d_optim, m.d, before)
    real_img, real_mask = real_batch(2, 16)
    records = [steps.stage2_d_phase(m, opt, real_img, real_mask, i) for i in range(16)]
    assert len(count) == 16  # 16 discriminator steps in 16 iterations (R1 included in one of them)
    first = records[0][0]
    expected_r1 = 16 * (opt.training.r1_img * 0.5 * first["grad_penalty_img"] +
                        opt.training.r1_seg * 0.5 * first["grad_penalty_seg"])
    assert float(first["r1_loss"]) > 0 and torch.allclose(first["r1_loss"], expected_r1, rtol=1e-6)
    assert torch.equal(first["d_loss"], first["d_gan_loss"] + first["r1_loss"])
    assert all(float(r[0]["r1_loss"]) == 0 and "grad_penalty_img" not in r[0] for r in records[1:])

    # The step's gradient is that of logistic + 16·R1 on ONE real prediction, before any update.
    state, grads = before["state"]
    d = copy.deepcopy(m.d)
    d.load_state_dict(state)
    img = real_img.clone().requires_grad_(True)
    seg = real_mask.clone().requires_grad_(True)
    real_pred = d(img, seg)
    assert torch.allclose(real_pred, first["real_pred"], atol=1e-6)
    r1, _, _ = r1_image_and_mask(real_pred, img, seg, opt.training.r1_img, opt.training.r1_seg)
    (d_logistic_loss(real_pred, d(first["gen_imgs"], first["gen_segs"])) + 16 * r1).backward()
    for ours, reference in zip(grads, d.parameters()):
        assert torch.allclose(ours, reference.grad, rtol=1e-4, atol=1e-6)


def test_stage2_discriminator_loss_is_summed_over_chunks():
    opt, m = stage2("--batch", 4, "--chunk", 2, "--d_reg_every", 2)
    captured = {}
    snapshot_before_step(m.d_optim, m.d, captured)
    real_img, real_mask = real_batch(4, 16)
    records = steps.stage2_d_phase(m, opt, real_img, real_mask, 1)  # not a regularised iteration
    assert len(records) == 2 and all(r["gen_imgs"].shape[0] == 2 for r in records)
    state, grads = captured["state"]
    d = copy.deepcopy(m.d)
    d.load_state_dict(state)

    def gradients(groups):
        d.zero_grad(set_to_none=True)
        for part, r in groups:
            gen_imgs = torch.cat([x["gen_imgs"] for x in r])
            gen_segs = torch.cat([x["gen_segs"] for x in r])
            d_logistic_loss(d(real_img[part], real_mask[part]), d(gen_imgs, gen_segs)).backward()
        return [p.grad.clone() for p in d.parameters()]

    per_chunk = gradients([(slice(0, 2), records[:1]), (slice(2, 4), records[1:])])
    whole = gradients([(slice(0, 4), records)])
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(grads, per_chunk))
    assert not all(torch.allclose(a, b, rtol=1e-3, atol=1e-5) for a, b in zip(grads, whole))


def test_stage2_path_regularisation_gives_every_decoder_parameter_a_gradient():
    opt, m = stage2("--batch", 2, "--chunk", 2)
    seen = {}
    params = dict(m.g.named_parameters())

    def hook(*_):
        seen["none"] = sorted(k for k, p in params.items() if k.startswith(steps.STAGE2_TRAINED) and p.grad is None)
    m.g_optim.register_step_pre_hook(hook)
    (record,), mean = steps.stage2_path_phase(m, opt, 0.0, 0)
    # The zero terms on the image AND the mask (published) make Adam count every decoder parameter;
    # only the StyledConv biases, which the published model holds but never uses, stay without one.
    assert all(name.endswith(".bias") and name.startswith("decoder.conv") for name in seen["none"])
    assert mean == pytest.approx(0.01 * float(record["path_lengths"].mean()))


def test_draws_using_restores_the_previous_draws():
    class Fixed(draws.Draws):
        def labels(self, n_regions, batch, device):
            return torch.full((batch,), 7)

    assert type(draws.current()) is draws.Draws
    with pytest.raises(RuntimeError):
        with draws.using(Fixed()):
            assert draws.current().labels(9, 3, "cpu").tolist() == [7, 7, 7]
            raise RuntimeError
    assert type(draws.current()) is draws.Draws


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("config, published", [
    ("ffhq_stage1.yaml", {"size": 64, "batch": 1, "chunk": 1, "iter": 300001}),
    ("ffhq_stage2.yaml", {"size": 512, "batch": 4, "chunk": 4, "iter": 500001}),
])
def test_configs_hold_the_published_recipes(config, published):
    path = os.path.join(ROOT, "configs", config)
    opt = default_options(["--config", path])
    defaults = default_options([])
    got = {"size": opt.model.size, "batch": opt.training.batch, "chunk": opt.training.chunk,
           "iter": opt.training.iter}
    assert got == published
    for group in defaults:  # everything else at the published defaults
        for key, value in defaults[group].items():
            if key not in published and key != "config":
                assert opt[group][key] == value, (group, key)
    # Flags after the file override it (the published single-GPU stage-1 line).
    assert default_options(["--config", path, "--batch", "4", "--chunk", "2"]).training.chunk == 2


def test_launch_scripts_use_the_configs():
    stage1 = open(os.path.join(ROOT, "scripts", "train_CNeRF.sh")).read()
    stage2 = open(os.path.join(ROOT, "scripts", "train_Full.sh")).read()
    assert "--nproc_per_node 4 train_CNeRF.py \\\n      --config configs/ffhq_stage1.yaml" in stage1
    assert "train_CNeRF.py --config configs/ffhq_stage1.yaml --batch 4 --chunk 2" in stage1
    assert "--nproc_per_node 4 train_Full.py \\\n      --config configs/ffhq_stage2.yaml" in stage2
