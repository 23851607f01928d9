"""The training example: under torchrun, two CPU processes (gloo) train a few steps with
DistributedDataParallel on different images and end with identical parameters; in one
process, every task trains, evaluates and writes its table and figure."""

import argparse
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "train_hypercolumns.py")


def load_example():
    """The training example as a module."""
    spec = importlib.util.spec_from_file_location("train_hypercolumns", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return example


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="needs torch.distributed with gloo")
@pytest.mark.slow
def test_two_processes_end_with_the_same_parameters(tmp_path):
    checksums = tmp_path / "checksums.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
               OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", EXAMPLE,
               "--task", "figure-ground", "--steps", "3", "--batch-size", "4", "--val-images", "4", "--device", "cpu",
               # The test is about gradient synchronisation; the reference backend runs everywhere.
               "--backend", "reference", "--no-save", "--checksum-file", str(checksums)]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(checksums.read_text())
    assert report["world_size"] == 2
    first, second = report["digests"]
    assert set(first) == set(second) == {"top layer (stride 8)", "hypercolumn (strides 2, 4, 8)"}
    for model in first:
        # Different images on each rank, so only the all-reduced gradients keep the models equal.
        assert first[model]["images"] != second[model]["images"]
        assert first[model]["parameters"] == second[model]["parameters"]
    # Only rank 0 prints the table.
    assert result.stdout.count("| layers |") == 1


@pytest.mark.parametrize("task", ["figure-ground", "keypoints", "parts"])
@pytest.mark.slow
def test_one_process_writes_table_and_figure(tmp_path, task, capsys):
    example = load_example()
    example.main(["--task", task, "--steps", "2", "--batch-size", "2", "--val-images", "4", "--grid", "8",
                  "--device", "cpu", "--backend", "reference", "--threads", "0", "--out-dir", str(tmp_path)])
    printed = capsys.readouterr().out
    assert printed.count("| top layer (stride 8) | 64 |") == 1
    assert printed.count("| hypercolumn (strides 2, 4, 8) | 16+32+64 |") == 1
    stem = tmp_path / task.replace("-", "_")
    assert (stem.with_suffix(".png")).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| hypercolumn (strides 2, 4, 8) |" in stem.with_suffix(".md").read_text()


@pytest.mark.slow
def test_one_process_trains_with_mixed_precision():
    """--amp: the forward and the loss inside the CPU's autocast (the compiled kernels in
    bfloat16), float32 parameters that the steps change, nothing non-finite."""
    example = load_example()
    args = argparse.Namespace(task="figure-ground", steps=3, batch_size=2, seed=0, image_size=64, grid=8,
                              workers=0, lr=3e-3, checksum_file=None, amp=True)
    torch.manual_seed(args.seed)  # as train() does: the same initial model
    initial = example.HypercolumnModel(args.task, [0, 1, 2], output_size=(args.grid, args.grid))
    model, _, _ = example.train(args, [0, 1, 2], torch.device("cpu"), 0, 1, "amp")
    for (name, _), after in zip(initial.named_parameters(), model.parameters()):
        assert after.dtype == torch.float32 and torch.isfinite(after).all(), name
    assert example.parameter_digest(model) != example.parameter_digest(initial)
