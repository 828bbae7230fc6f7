"""A search on a real two-node Ray cluster (two raylets on this machine, as Ray's own
tests build one), with the worker node killed while a trial trains on it."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from ray.cluster_utils import Cluster
from test_search import write_space

STEPS = 400


def records(root: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in root.glob("trials/*/result.json")}


def under_way(root: Path) -> list[Path]:
    """Trials training now, with a checkpoint, and not finished."""
    return [d for d in root.glob("trials/*") if (d / "checkpoint/trainer.pt").exists()
            and not (d / "result.json").exists()]


def test_a_search_survives_losing_a_worker_node(tmp_path: Path) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        worker = cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        path = write_space(tmp_path, name="cluster", sampler="random",
                           budget={"trials": 4, "steps": STEPS},
                           params={"train.lr": {"float": [1e-3, 1e-2], "log": True}})
        root = tmp_path / "runs/cluster"
        search = subprocess.Popen(
            [sys.executable, "-m", "archkit.cli", "search", str(path), "--backend", "ray",
             "--address", cluster.address, "--runs", str(tmp_path / "runs"), "--no-progress"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # wait for a trial finished on the worker node while two train (one on each node)
        deadline = time.time() + 400
        while not (any(r["node"] == worker.node_id for r in records(root).values())
                   and len(under_way(root)) == 2):
            assert search.poll() is None and time.time() < deadline, search.communicate()
            time.sleep(0.2)
        finished_before = {t: (root / "trials" / t / "result.json").read_bytes()
                           for t in records(root)}
        cluster.remove_node(worker, allow_graceful=False)
        out, err = search.communicate(timeout=600)
        assert search.returncode == 0, err
    finally:
        cluster.shutdown()

    done = records(root)
    assert len(done) == 4 and all(r["state"] == "complete" for r in done.values()), done
    assert all(r["step"] == STEPS for r in done.values())
    nodes = {r["node"] for r in done.values()}
    assert worker.node_id in nodes and len(nodes) == 2  # placed on both nodes
    for trial, before in finished_before.items():  # no finished trial lost or redone
        assert (root / "trials" / trial / "result.json").read_bytes() == before
    # the trial cut on the dead node ran again on the head from its own checkpoint
    resumed = [t for t in done if len((root / "trials" / t / "commands.jsonl")
                                      .read_text().splitlines()) > 1]
    assert len(resumed) == 1, done.keys()
    starts = [json.loads(line)["from_step"] for line in
              (root / "trials" / resumed[0] / "commands.jsonl").read_text().splitlines()]
    assert starts[0] == 0 and 0 < starts[-1] < STEPS
    steps = [json.loads(line)["step"] for line in
             (root / "trials" / resumed[0] / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == STEPS
    assert "cluster: Pareto front" in out
