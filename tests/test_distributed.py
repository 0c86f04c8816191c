"""WeightDecay under DDP and FSDP2 (two CPU processes, gloo), against a single-process ``torch.optim`` reference.

How the runs are made: each strategy is one ``python tests/_dist_scripts.py {ddp,fsdp2} WORKDIR`` subprocess
(Lightning's launcher starts rank 1 itself by re-running the same command line), which executes every run of that
strategy in turn and leaves each rank's weights, the sample indices it trained on and the spy records in
``WORKDIR/rank{r}.pt``. A module-scoped fixture launches each script once; the tests below only read the results.

The reference is a plain loop (no Lightning, no lightning_wd) over the same initial weights, taking at step ``k`` the
union of the samples both ranks trained on at step ``k``: with a mean-reduced loss and equal per-rank batches, the
gradient DDP/FSDP2 averages over the ranks is the gradient of the mean over the union. Lightning's training
``DistributedSampler`` shuffles whatever the loader says (lightning 2.6: ``_process_dataloader`` forces
``shuffle=True`` for training), so the union is taken from what the ranks recorded, after checking that it is a proper
split (disjoint ranks, every sample once per epoch).

Tolerance: the distributed gradient is ``(mean of 4 + mean of 4) / 2`` (all-reduce or reduce-scatter, then the
division by the world size, exact for 2) while the reference takes one mean of 8: same sum, other order, so each
gradient entry may differ in its last bit (~6e-8 relative). Adam divides by ``sqrt(v)``, so the update inherits that
relative error; after these few steps of lr=0.05 the weights differ by up to ~5e-8. ``ATOL = 1e-6`` leaves a 20x margin
and stays over 1000x below the smallest difference the tests must detect (decoupled vs coupled decay, decay vs none,
both asserted > ``MIN_EFFECT`` below). Runs compared with runs of the same strategy (a rank with the other rank, a
resumed run with the uninterrupted one) do the same float ops in the same order and must be bit-identical.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from reference import train_by_hand

pytestmark = pytest.mark.distributed

SCRIPT = Path(__file__).with_name("_dist_scripts.py")
ATOL = 1e-6  # see the module docstring
MIN_EFFECT = 1e-3  # what the decay changes in the weights over these runs must exceed this, or the test proves nothing
LAUNCH_TIMEOUT_S = 240

LR, WD = 0.05, 0.5
STEPS = 5  # per fit without resume; 2 steps per epoch, so epochs (and the sampler's set_epoch) change twice
PER_RANK_BATCH = 4
N_SAMPLES = 16
RESUME = {"epochs": 3, "from_epoch": 0}  # 6 steps; the checkpoint is the one saved at the end of the first epoch

# name -> optimizer built by configure_optimizers (lr=LR, weight_decay=WD), WeightDecay mode/native (None: no callback)
# and the torch.optim optimizer the run must match.
RUNS = {
    "no_callback": dict(optimizer="Adam", mode=None, native=None, reference="Adam_l2"),
    "decoupled_native": dict(optimizer="Adam", mode="decoupled", native=True, reference="AdamW"),
    "decoupled_generic": dict(optimizer="Adam", mode="decoupled", native=False, reference="AdamW"),
    "coupled_native": dict(optimizer="AdamW", mode="coupled", native=True, reference="Adam_l2"),
    "coupled_generic": dict(optimizer="AdamW", mode="coupled", native=False, reference="Adam_l2"),
}
DDP_RESUME_RUNS = {
    "resume_decoupled_native": dict(optimizer="Adam", mode="decoupled", native=True, reference="AdamW", resume=RESUME),
    "resume_coupled_generic": dict(optimizer="AdamW", mode="coupled", native=False, reference="Adam_l2", resume=RESUME),
}
FSDP2_RESUME_RUNS = {
    "resume_decoupled_generic": dict(
        optimizer="Adam", mode="decoupled", native=False, reference="AdamW", resume=RESUME
    ),
}
WITH_CALLBACK = [name for name, run in RUNS.items() if run["mode"] is not None]

REFERENCES = {
    "AdamW": lambda params: torch.optim.AdamW(params, lr=LR, weight_decay=WD),
    "Adam_l2": lambda params: torch.optim.Adam(params, lr=LR, weight_decay=WD),
    "Adam_no_decay": lambda params: torch.optim.Adam(params, lr=LR, weight_decay=0.0),
}

# variables that would make the launched script join, or impersonate, some other job
_INHERITED_PREFIXES = ("SLURM_", "TORCHELASTIC_", "LSB_", "JSM_NAMESPACE_", "OMPI_", "PMI_")
_INHERITED_NAMES = {
    "MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "WORLD_SIZE",
    "LOCAL_WORLD_SIZE", "PL_GLOBAL_SEED", "PL_SEED_WORKERS", "STANDALONE_PORT", "KUBERNETES_PORT",
}


def _load_script():
    spec = importlib.util.spec_from_file_location("_lightning_wd_dist_scripts", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _launch_env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in _INHERITED_NAMES and not k.startswith(_INHERITED_PREFIXES)
    }
    # With MASTER_PORT unset, Lightning's launcher picks a free port (find_free_network_port binds port 0) and hands
    # it to rank 1; an inherited MASTER_PORT would instead make every launch (and any parallel pytest worker) share it.
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if "GLOO_SOCKET_IFNAME" not in env and "lo" in {name for _, name in socket.if_nameindex()}:
        env["GLOO_SOCKET_IFNAME"] = "lo"  # gloo would otherwise resolve the hostname, which may not be routable
    return env


def _launch(scenario: str, workdir: Path, runs: dict) -> dict:
    script = _load_script()
    torch.manual_seed(0)
    init = {k: v.detach().clone() for k, v in script.make_net().state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(N_SAMPLES, 4, generator=gen)
    y = torch.randn(N_SAMPLES, 1, generator=gen)
    inputs = dict(
        init=init, x=x, y=y, lr=LR, wd=WD, steps=STEPS, batch_size=PER_RANK_BATCH,
        runs=[{"name": name, **run} for name, run in runs.items()],
    )
    torch.save(inputs, workdir / "inputs.pt")
    # own session, so that a hang can be ended by killing this launch's process group (rank 0 and the rank 1 it
    # started), and nothing else
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), scenario, str(workdir)],
        cwd=workdir, env=_launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{scenario} launch timed out after {LAUNCH_TIMEOUT_S}s; output tail:\n{out[-6000:]}")
    assert proc.returncode == 0, f"{scenario} launch failed (rc={proc.returncode}); output tail:\n{out[-6000:]}"
    ranks = []
    for r in range(2):
        path = workdir / f"rank{r}.pt"
        assert path.exists(), f"rank {r} wrote no result; output tail:\n{out[-6000:]}"
        ranks.append(torch.load(path, weights_only=False))
    assert [res["rank"] for res in ranks] == [0, 1] and all(res["world_size"] == 2 for res in ranks)
    return {"inputs": inputs, "ranks": ranks, "output": out}


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    return _launch("ddp", tmp_path_factory.mktemp("ddp"), {**RUNS, **DDP_RESUME_RUNS})


@pytest.fixture(scope="module")
def fsdp2(tmp_path_factory):
    return _launch("fsdp2", tmp_path_factory.mktemp("fsdp2"), {**RUNS, **FSDP2_RESUME_RUNS})


# --- the reference --------------------------------------------------------------------------------------------


def _global_batches(seen0: list, seen1: list) -> list[list[int]]:
    """The sample indices of each step across both ranks, after checking they form a proper data-parallel split."""
    assert [s for s, _ in seen0] == [s for s, _ in seen1] == list(range(seen0[0][0], seen0[0][0] + len(seen0)))
    batches = []
    for (_, i0), (_, i1) in zip(seen0, seen1):
        assert len(i0) == len(i1) == PER_RANK_BATCH
        assert not set(i0) & set(i1), "the ranks trained on overlapping samples"
        batches.append(i0 + i1)
    steps_per_epoch = N_SAMPLES // (2 * PER_RANK_BATCH)
    first = seen0[0][0]
    assert first % steps_per_epoch == 0
    for e in range(0, len(batches), steps_per_epoch):
        epoch = sorted(i for b in batches[e : e + steps_per_epoch] for i in b)
        if len(epoch) == N_SAMPLES:
            assert epoch == list(range(N_SAMPLES)), "an epoch did not see every sample exactly once"
        else:  # the last epoch, cut short by max_steps
            assert len(set(epoch)) == len(epoch), "a sample was seen twice in one epoch"
    return batches


def _reference(launch: dict, reference: str, batches: list[list[int]]) -> dict[str, torch.Tensor]:
    """Single-process training with ``torch.optim`` alone, one global batch per step."""
    inputs = launch["inputs"]
    net = _load_script().make_net()
    net.load_state_dict(inputs["init"])
    opt = REFERENCES[reference](net.parameters())
    indices = [torch.tensor(batch) for batch in batches]
    train_by_hand(net, opt, [(inputs["x"][idx], inputs["y"][idx]) for idx in indices])
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _assert_matches_reference(launch: dict, name: str, reference: str) -> None:
    r0, r1 = (res[name] for res in launch["ranks"])
    batches = _global_batches(r0["seen"], r1["seen"])
    # both ranks must hold the same (full) weights, bit for bit
    assert _max_diff(r0["weights"], r1["weights"]) == 0
    expected = _reference(launch, reference, batches)
    # the comparison must be able to tell the modes apart, and decay from no decay
    others = {other: _reference(launch, other, batches) for other in REFERENCES if other != reference}
    for other, weights in others.items():
        gap = _max_diff(expected, weights)
        assert gap > MIN_EFFECT, f"reference {reference} vs {other} differ by only {gap}"
    got = r0["weights"]
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=ATOL, msg=lambda m: f"{name} {k}: {m}")


def _assert_holds_the_configured_optimizer(groups: list[dict], state_dict: dict, run: dict, final: dict) -> None:
    """A checkpoint's param groups hold the optimizer as ``run`` configured it, with the mode it trains in; its
    weights are earlier ones than the ``final`` weights."""
    configured_flag = run["optimizer"] == "AdamW"
    assert [(g["weight_decay"], g["decoupled_weight_decay"], g["lightning_wd_mode"]) for g in groups] == [
        (WD, configured_flag, run["mode"])
    ]
    saved = {k.removeprefix("net."): v for k, v in state_dict.items()}
    assert _max_diff(saved, final) > MIN_EFFECT


# --- DDP ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(RUNS))
def test_ddp_matches_single_process_reference(ddp, name):
    """Under DDP, Adam + decoupled == AdamW and AdamW + coupled == Adam(weight_decay), native or generic pass.

    ``no_callback`` (Adam with its own L2, no WeightDecay) checks the harness itself against the same reference.
    """
    _assert_matches_reference(ddp, name, RUNS[name]["reference"])


@pytest.mark.parametrize("name", list(DDP_RESUME_RUNS))
def test_ddp_checkpoint_resume_equals_uninterrupted_run(ddp, name):
    """A checkpoint saved by ModelCheckpoint under DDP resumes (fresh Trainer, module and callback) to the weights
    of the uninterrupted run, bit for bit, and both equal the single-process reference."""
    run = DDP_RESUME_RUNS[name]
    r0, r1 = (res[name] for res in ddp["ranks"])
    _assert_matches_reference(ddp, name, run["reference"])
    # the resumed run trained on exactly the batches the uninterrupted run trained on after the checkpoint
    for full, resumed in ((r0["seen"], r0["resumed"]["seen"]), (r1["seen"], r1["resumed"]["seen"])):
        assert resumed == full[len(full) - len(resumed) :] and 0 < len(resumed) < len(full)
    assert _max_diff(r0["resumed"]["weights"], r1["resumed"]["weights"]) == 0
    assert _max_diff(r0["resumed"]["weights"], r0["weights"]) == 0
    ckpt = torch.load(r0["ckpt_path"], weights_only=False)
    _assert_holds_the_configured_optimizer(ckpt["optimizer_states"][0]["param_groups"], ckpt["state_dict"], run,
                                           r0["weights"])


# --- FSDP2 (ModelParallelStrategy + fully_shard) --------------------------------------------------------------


def test_fsdp2_parameters_are_sharded(fsdp2):
    """The runs below are meaningful only if the optimizer saw sharded DTensors: dim 0 split over the two ranks,
    unevenly (5 rows as 3 + 2) and with an empty shard on rank 1 (the 1-row output layer)."""
    r0, r1 = (res["decoupled_generic"] for res in fsdp2["ranks"])
    for name, full in r0["weights"].items():
        assert r0["types"][name] == r1["types"][name] == "DTensor"
        assert r0["placements"][name] == r1["placements"][name] == ["S(0)"]
        s0, s1 = r0["local_shapes"][name], r1["local_shapes"][name]
        assert s0[0] + s1[0] == full.shape[0] and s0[1:] == s1[1:] == tuple(full.shape[1:])
    assert r0["local_shapes"]["0.weight"] == (3, 4) and r1["local_shapes"]["0.weight"] == (2, 4)
    assert r1["local_shapes"]["2.weight"] == (0, 5) and r1["local_shapes"]["2.bias"] == (0,)


@pytest.mark.parametrize("name", list(RUNS))
def test_fsdp2_matches_single_process_reference(fsdp2, name):
    """Under FSDP2 the gathered weights (``full_tensor()`` on every rank) match the same references as DDP."""
    _assert_matches_reference(fsdp2, name, RUNS[name]["reference"])


def _assert_local_only(calls: list[dict], local_shapes: list[tuple]) -> None:
    """Every recorded call got the DTensor parameters, dispatched ops on plain tensors of the local shard shapes
    only, and started no gather or collective."""
    for call in calls:
        assert call["collectives"] == [], f"the decay gathered or communicated: {call['collectives']}"
        assert call["param_types"] == ["DTensor"] * len(local_shapes)
        assert call["param_local_shapes"] == local_shapes
        names = [op for op, _, _ in call["ops"]]
        assert not [op for op in names if "c10d" in op], f"collective ops dispatched: {names}"
        assert [op for op in names if op.startswith("aten._foreach_")], f"no foreach op on the shards: {names}"
        for op, types, shapes in call["ops"]:
            assert set(types) == {"Tensor"}, f"{op} ran on {types}, not on the local shards"
            assert set(shapes) <= set(local_shapes), f"{op} ran on shapes {shapes}, not the shards {local_shapes}"


@pytest.mark.parametrize("name", WITH_CALLBACK)
def test_fsdp2_step_decays_local_shards_without_gathering(fsdp2, name):
    """During training, the generic decay pass (``native=False``) runs once per step on each rank's local shards: no
    ``full_tensor``/``redistribute``, no collective, and every op it dispatches sees plain tensors shaped like the
    shards. With ``native=True`` the decay rides in Adam's/AdamW's own step and the generic pass is not used."""
    run = RUNS[name]
    for res in fsdp2["ranks"]:
        spy = res[name]["spy"]
        local_shapes = list(res[name]["local_shapes"].values())
        if run["native"]:  # Adam and AdamW do either mode inside their own step
            assert spy == {"decay_weights_": [], "add_l2_to_grads_": []}
            continue
        used, unused = ("decay_weights_", "add_l2_to_grads_")[:: 1 if run["mode"] == "decoupled" else -1]
        assert spy[unused] == []
        assert len(spy[used]) == STEPS
        # decay_weights_(params, x, 1.0) with the per-step decay x = lr * wd; add_l2_to_grads_(params, grads, wd)
        expected_numbers = [LR * WD, 1.0] if used == "decay_weights_" else [WD]
        assert [call["numbers"] for call in spy[used]] == [expected_numbers] * STEPS
        _assert_local_only(spy[used], local_shapes)


def test_fsdp2_direct_decay_calls_on_sharded_parameters(fsdp2):
    """``decay_weights_`` and ``add_l2_to_grads_`` called directly on FSDP2 DTensor parameters change each local
    shard in place by the exact factor, the gathered tensors accordingly, and communicate nothing; the same spy does
    catch a function that gathers (the control), so its silence means something."""
    for res in fsdp2["ranks"]:
        d = res["direct"]
        factor = 1 - d["lr"] * d["wd"]
        local_shapes = [tuple(t.shape) for t in d["local_before"]]
        for before, after in zip(d["local_before"], d["local_after"]):
            torch.testing.assert_close(after, before * factor, rtol=0, atol=0)
        for before, after in zip(d["full_before"], d["full_after"]):
            torch.testing.assert_close(after, before * factor, rtol=0, atol=0)
        assert max((a - b).abs().max().item() for a, b in zip(d["full_before"], d["full_after"])) > MIN_EFFECT
        assert d["grad_types"] == ["DTensor"] * len(local_shapes)
        for grad, param in zip(d["grad_local_after"], d["param_local_final"]):
            torch.testing.assert_close(grad, param * d["wd"], rtol=0, atol=0)
        for grad, param in zip(d["grad_full_after"], d["full_after"]):
            torch.testing.assert_close(grad, param * d["wd"], rtol=0, atol=0)
        for fn in ("decay_weights_", "add_l2_to_grads_"):
            assert len(d["log"][fn]) == 1
            _assert_local_only(d["log"][fn], local_shapes)
        (control,) = d["log"]["control"]
        assert "DTensor.full_tensor" in control["collectives"]
        assert any("c10d" in op for op, _, _ in control["ops"])


def test_fsdp2_checkpoint_resume_equals_uninterrupted_run(fsdp2, tmp_path):
    """A distributed (DCP) checkpoint saved under ModelParallelStrategy resumes to the uninterrupted run's weights,
    bit for bit, with the generic decay pass; both match AdamW.

    On resume, torch's ``get/set_optimizer_state_dict`` (``_init_optim_state``) calls ``optimizer.step()`` once with
    zero gradients and every group's lr set to 0, to create the optimizer state it then overwrites. Lightning restores
    a ModelParallelStrategy checkpoint after ``on_fit_start``, so the WeightDecay hooks are attached and see that
    step: the decay pass runs with ``lr=0``, i.e. multiplies by 1. The test allows that one no-op call and checks
    that every other call is a real step with the group's lr."""
    name = "resume_decoupled_generic"
    r0, r1 = (res[name] for res in fsdp2["ranks"])
    _assert_matches_reference(fsdp2, name, FSDP2_RESUME_RUNS[name]["reference"])
    for full, resumed in ((r0["seen"], r0["resumed"]["seen"]), (r1["seen"], r1["resumed"]["seen"])):
        assert resumed == full[len(full) - len(resumed) :] and 0 < len(resumed) < len(full)
    assert _max_diff(r0["resumed"]["weights"], r0["weights"]) == 0
    assert _max_diff(r1["resumed"]["weights"], r1["weights"]) == 0
    # the generic pass ran on every step of both fits (uninterrupted, then resumed), on the local shards
    for res in fsdp2["ranks"]:
        run = res[name]
        calls = run["spy"]["decay_weights_"]
        n_before, n_after = len(run["seen"]), len(run["resumed"]["seen"])
        # the uninterrupted fit, then at most one lr=0 call from the DCP load, then the resumed fit
        assert [c["numbers"] for c in calls[:n_before]] == [[LR * WD, 1.0]] * n_before
        assert [c["numbers"] for c in calls[n_before:-n_after]] in ([], [[0.0, 1.0]])
        assert [c["numbers"] for c in calls[-n_after:]] == [[LR * WD, 1.0]] * n_after
        _assert_local_only(calls, list(run["local_shapes"].values()))
        assert run["spy"]["add_l2_to_grads_"] == []
    # the distributed checkpoint holds the optimizer as configured with the mode it trains in, and earlier weights
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(r0["ckpt_path"], tmp_path / "ckpt.pt")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    _assert_holds_the_configured_optimizer(ckpt["optimizer_0"]["param_groups"], ckpt["state_dict"],
                                           FSDP2_RESUME_RUNS[name], r0["weights"])


def test_fsdp2_effective_lr_statistics_are_over_whole_parameters(fsdp2):
    """EffectiveLRMonitor under FSDP2: the statistics are those of the whole parameter (exact min/max/mean, the
    histogram median within its documented bound), every rank took part in the same reductions of the same blocks
    (rank 1 holds an empty shard of the output layer and nothing hung), and only rank 0 sent anything to the
    loggers."""
    from lightning_wd.effective_lr import HIST_BINS, histogram_median_rel_error

    r0, r1 = (res["monitor"] for res in fsdp2["ranks"])
    assert r1["logged"] == []
    # the same reductions, in blocks of the same sizes, on both ranks: a block of 3 rows and one of 1 per step
    assert r0["blocks"] == r1["blocks"] == [((3, 2), (3, 2 + HIST_BINS)), ((1, 2), (1, 2 + HIST_BINS))] * STEPS
    assert [step for step, _ in r0["logged"]] == list(range(STEPS))
    whole = {s: {k: v for k, v in ref.items() if not k.startswith("local:")} for s, ref in r0["reference"].items()}
    assert whole == {s: {k: v for k, v in ref.items() if not k.startswith("local:")}
                     for s, ref in r1["reference"].items()}  # the gathered reference is the same on both ranks
    for step, metrics in r0["logged"]:
        reference = whole[step]
        assert set(reference) == {"net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias", "Adam/pg1"}
        for name, (mn, mx, mean, median) in reference.items():
            got = {s: metrics[f"effective_lr/{name}/{s}"] for s in ("min", "max", "mean", "median")}
            # fp32 in the monitor, fp64 in the reference
            assert got["min"] == pytest.approx(mn, rel=1e-5), (step, name)
            assert got["max"] == pytest.approx(mx, rel=1e-5), (step, name)
            assert got["mean"] == pytest.approx(mean, rel=1e-5), (step, name)
            assert got["median"] == pytest.approx(median, rel=histogram_median_rel_error()), (step, name)
    # the contrast: statistics of rank 0's shard of 0.weight alone differ from what was logged, beyond tolerance
    local_only = [r0["reference"][step]["local:0.weight"] for step, _ in r0["logged"]]
    logged = [[m[f"effective_lr/net.0.weight/{s}"] for s in ("min", "max", "mean")] for _, m in r0["logged"]]
    assert any(abs(a / b - 1) > 1e-3 for loc, got in zip(local_only, logged) for a, b in zip(loc[:3], got))


def test_fsdp2_weight_norms_are_of_whole_parameters(fsdp2):
    """WeightNormMonitor under FSDP2: weight norms, gradient-to-weight ratios and the Adam + L2 equilibrium norm
    (which needs |G| |W| of the whole matrix) are those of the whole parameters, computed here from the gathered
    tensors in float64; every rank took part (rank 1 holds an empty shard of the output layer and nothing hung), and
    only rank 0 sent anything to the loggers."""
    r0, r1 = (res["weight_norm"] for res in fsdp2["ranks"])
    assert r1["logged"] == []
    assert [step for step, _ in r0["logged"]] == list(range(STEPS))
    for step, metrics in r0["logged"]:
        ref = r0["reference"][step]
        expected = {}
        for name, w in ref["before"].items():
            w, g = w.double(), ref["grad"][name].double()
            expected[f"weight_norm/{name}"] = w.norm().item()  # at the step, the weights its gradient was taken at
            expected[f"grad_to_weight/{name}"] = (g.norm() / w.norm()).item()
            if w.dim() >= 2:  # Adam's own weight_decay is L2: (lr sqrt(n) |g~| / (2 wd))^(1/3), |g~| = |G| |W|
                scale_free = (g.norm() * w.norm()).item()
                expected[f"equilibrium_norm/{name}"] = (LR * w.numel() ** 0.5 * scale_free / (2 * WD)) ** (1 / 3)
        # the param group's keys: all its parameters together
        ws = sum(w.double().norm().item() ** 2 for w in ref["before"].values())
        gs = sum(g.double().norm().item() ** 2 for g in ref["grad"].values())
        covered = [n for n in ref["before"] if f"equilibrium_norm/{n}" in expected]
        expected["weight_norm/Adam/pg1"] = ws**0.5
        expected["grad_to_weight/Adam/pg1"] = (gs / ws) ** 0.5
        expected["equilibrium_ratio/Adam/pg1"] = (sum(ref["before"][n].double().norm().item() ** 2 for n in covered)
                                                  / sum(expected[f"equilibrium_norm/{n}"] ** 2 for n in covered)) ** 0.5
        assert set(metrics) == set(expected)
        for key, value in expected.items():
            assert metrics[key] == pytest.approx(value, rel=2e-5), (step, key)  # fp32 sums of squares
    # the contrast: the norm of rank 0's shard of 0.weight alone is not what was logged
    local = [r0["reference"][step]["local_before"]["net.0.weight"].double().norm().item() for step in range(STEPS)]
    whole = [r0["reference"][step]["before"]["net.0.weight"].double().norm().item() for step in range(STEPS)]
    assert all(abs(a / b - 1) > 1e-2 for a, b in zip(local, whole))
