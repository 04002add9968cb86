"""--offload disk: blocks read from the checkpoint's files one at a time give the in-memory run's plan and model."""

from __future__ import annotations

import json
import platform

import pytest
import torch
from conftest import SHARED_DATA
from transformers import AutoModelForCausalLM

from amp_prune import PruneConfig, prune
from amp_prune.arch import get_spec
from amp_prune.errors import AmpPruneError
from amp_prune.io.load import load_model
from amp_prune.io.offload import fix_mmap_threshold
from amp_prune.placement import is_offloaded, materialized

SMALL = dict(num_samples=4, seq_len=32, eval_samples=2, batch_size=2, progress=False, device="cpu")
IDS = torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(0))


def _plan(path) -> dict:
    plan = json.loads((path / "pruning_plan.json").read_text())
    return {k: v for k, v in plan.items() if k not in ("created", "timings")}


def test_disk_offload_keeps_the_blocks_off_memory_and_gives_the_same_logits(tiny_dir, tmp_path):
    src = tiny_dir()
    dense = load_model(str(src), device="cpu")
    off = load_model(str(src), device="cpu", offload_folder=str(tmp_path / "spill"))
    layers = get_spec(off.model.config.model_type).get_layers(off.model)
    assert is_offloaded(off.model)
    assert all(p.device.type == "meta" for p in layers.parameters())
    with torch.no_grad():
        torch.testing.assert_close(off.model(IDS).logits, dense.model(IDS).logits, rtol=0, atol=0)
        with materialized(layers[0]):  # loaded once, for reads and forwards alike
            q = get_spec(off.model.config.model_type).attention(layers[0]).q_proj.weight
            assert q.device.type == "cpu" and torch.equal(q, dense.model.model.layers[0].self_attn.q_proj.weight)
    assert all(p.device.type == "meta" for p in layers.parameters())  # and dropped again


@pytest.mark.parametrize("case", [
    dict(method="width", criterion="amp", eval_tasks="piqa", eval_limit=8, data_dir=str(SHARED_DATA)),  # defaults
    dict(method="width", criterion="wanda_sp", refit="sequential"),
    dict(method="width", criterion="magnitude", gqa_mode="heads", attn_units="1"),
    dict(method="cka", layers=1, standin_damp="0.01", family="qwen2"),  # drops block 1: its stand-in is folded in
])
def test_a_disk_offloaded_run_gives_the_plan_and_the_model_of_the_in_memory_run(tiny_dir, tmp_path, case):
    case = dict(case)
    src = tiny_dir(case.pop("family", "llama_gqa"))
    runs = {}
    for offload in ("none", "disk"):
        out = tmp_path / offload
        res = prune(PruneConfig.from_flat(model=str(src), out=str(out), ratio=0.3, offload=offload, **{**SMALL, **case}))
        assert is_offloaded(res.model) == (offload == "disk")  # the pruned blocks are written back to disk
        runs[offload] = (out, res)
    (mem, r_mem), (disk, r_disk) = runs["none"], runs["disk"]
    assert _plan(disk) == _plan(mem)
    assert r_disk.summary["ppl_before"] == r_mem.summary["ppl_before"]
    assert r_disk.summary["ppl_after"] == r_mem.summary["ppl_after"]
    assert r_disk.summary.get("eval") == r_mem.summary.get("eval")  # lm-eval through accelerate's own hooks
    if case["method"] == "cka":
        assert r_disk.plan.standin_fit and all(f.get("damp") is not None for f in r_disk.plan.standin_fit)
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(mem)(IDS).logits
        b = AutoModelForCausalLM.from_pretrained(disk)(IDS).logits
    torch.testing.assert_close(b, a, rtol=0, atol=0)
    with torch.no_grad():  # the returned model still runs: its spill folder lives as long as it does
        torch.testing.assert_close(r_disk.model(IDS).logits, a, rtol=1e-5, atol=1e-5)
    assert r_disk.summary["exported_class"] == r_mem.summary["exported_class"]
    assert json.loads((disk / "config.json").read_text())["architectures"] == [r_mem.summary["exported_class"]]


def test_disk_offload_refuses_a_gguf_and_hybrid(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(AmpPruneError, match="--offload disk reads the blocks from a Hugging Face checkpoint"):
        load_model(str(gguf), device="cpu", offload_folder=str(tmp_path))
    with pytest.raises(AmpPruneError, match="--offload disk supports --method width and cka"):
        PruneConfig.from_flat(model="x", method="hybrid", offload="disk").validate()
    with pytest.raises(AmpPruneError, match="unknown --offload 'gpu'"):
        PruneConfig.from_flat(model="x", offload="gpu").validate()
    assert PruneConfig.from_flat(model="x", offload=True).validate().runtime.offload == "cpu"  # an old run.json


@pytest.mark.parametrize("flag, recorded", [(["--offload"], "cpu"), (["--offload", "disk"], "disk")])
def test_the_offload_flag_alone_means_cpu_and_disk_runs_on_another_family(tiny_dir, tmp_path, flag, recorded):
    from amp_prune.cli import main
    src, out = tiny_dir("qwen2"), tmp_path / "o"
    assert main([str(src), "--ratio", "0.3", "--out", str(out), "--num-samples", "4", "--seq-len", "32",
                 "--eval-samples", "2", "--batch-size", "2", "--no-progress", *flag]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["offload"] == recorded
    assert run["export_check"]["max_abs_diff"] <= run["export_check"]["tolerance"]


def test_max_memory_keeps_the_blocks_that_fit_and_leaves_the_rest_on_disk(tiny_dir, tmp_path):
    src = tiny_dir()
    dense = load_model(str(src), device="cpu")
    spec = get_spec(dense.model.config.model_type)
    block = sum(p.numel() * p.element_size() for p in spec.get_layers(dense.model)[0].parameters())
    outside = sum(p.numel() * p.element_size() for p in dense.model.parameters()) - 3 * block
    budget = {"cpu": outside + int(2.5 * block)}  # the rest, one block, and the block accelerate holds back
    off = load_model(str(src), device="cpu", offload_folder=str(tmp_path / "spill"), max_memory=budget)
    on_disk = [all(p.device.type == "meta" for p in layer.parameters()) for layer in spec.get_layers(off.model)]
    assert 0 < sum(on_disk) < len(on_disk), on_disk
    with torch.no_grad():
        torch.testing.assert_close(off.model(IDS).logits, dense.model(IDS).logits, rtol=0, atol=0)
    runs = {}
    for name, extra in [("mem", {}), ("mixed", dict(offload="disk", max_memory=f"cpu={budget['cpu']}"))]:
        runs[name] = prune(PruneConfig.from_flat(model=str(src), out=str(tmp_path / name), ratio=0.3,
                                                 **{**SMALL, **extra}))
    assert _plan(tmp_path / "mixed") == _plan(tmp_path / "mem")
    assert runs["mixed"].summary["ppl_after"] == runs["mem"].summary["ppl_after"]


@pytest.mark.parametrize("extra, match", [
    (dict(max_memory="cpu=1GiB"), "--max-memory applies to --offload disk"),
    (dict(offload="disk", max_memory="ram=1GiB"), "--max-memory 'ram=1GiB': write DEVICE=SIZE pairs"),
    (dict(offload="disk", max_memory="cpu=lots"), "write DEVICE=SIZE pairs"),
])
def test_a_bad_max_memory_gets_one_line(extra, match):
    with pytest.raises(AmpPruneError, match=match):
        PruneConfig.from_flat(model="x", **extra).validate()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_disk_offload_can_pin_the_glibc_mmap_threshold():
    assert fix_mmap_threshold()
