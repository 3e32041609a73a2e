"""The Ray executor's GPU side without a GPU or vLLM: replicas shaped for vLLM on a real two-node
Ray cluster (127.0.0.1) whose nodes declare GPUs they do not have, which Ray takes at their word.

- A tensor-parallel replica gets a placement group of one-GPU bundles on one node, its actor and
  the workers it starts land in it; one that no node can hold stays unplaced.
- `--engine vllm --executor ray` starts its API process without vLLM; with nothing to describe
  the engine it fails with one clear line (the replica's error, or why none was placed), and
  removes its placement groups.
- An API process that lacks the engine's library (llama.cpp hidden from it) serves a batch with
  the facts a replica sent: its model names, their check, its answers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmbatch._exceptions import ConfigError
from llmbatch.server._ray_gpu import replica_shape
from tests.conftest import ServerProc, chat_line, read_jsonl, run_batch

pytest.importorskip("ray")
# One xdist worker runs the whole module, so its cluster starts once (pyproject: --dist loadgroup).
pytestmark = pytest.mark.xdist_group("ray-gpu")

from tests.server._ray_cluster import running_cluster  # noqa: E402

HERE = Path(__file__).parent
GPUS_PER_NODE = 2


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Two nodes of 2 CPUs and 2 (declared) GPUs each."""
    with running_cluster(tmp_path_factory.mktemp("ray-gpu"), "2", str(GPUS_PER_NODE)) as info:
        yield info


@pytest.fixture(scope="module")
def probed(cluster: dict[str, Any]) -> dict[str, Any]:
    """What `_ray_probe.py` saw on the cluster."""
    out = subprocess.run(
        [sys.executable, str(HERE / "_ray_probe.py"), cluster["address"]], capture_output=True, text=True, timeout=90
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def test_replica_shapes() -> None:
    tp4 = replica_shape("vllm", {"tensor_parallel_size": 4, "model_path": "m"}, 2.0, {"accelerator_type:H100": 0.001})
    assert tp4.bundles == [{"GPU": 1.0, "CPU": 2.0, "accelerator_type:H100": 0.001}] + [{"GPU": 1.0}] * 3
    assert (tp4.cpus, tp4.gpus, tp4.resources) == (2.0, 0.0, {"accelerator_type:H100": 0.001})
    assert tp4.engine_options == {"tensor_parallel_size": 4, "model_path": "m", "distributed_executor_backend": "ray"}
    assert tp4.total() == {"GPU": 4.0, "CPU": 2.0, "accelerator_type:H100": 0.001}
    # One GPU per vllm replica unless told otherwise; other engines none unless told.
    assert replica_shape("vllm", None, 1.0, {}).gpus == 1.0
    assert replica_shape("vllm", None, 1.0, {"GPU": 0.5}).gpus == 0.5
    assert replica_shape("transformers", None, 1.0, {}).gpus == 0.0
    assert replica_shape("echo", None, 1.0, {"GPU": 1, "x": 2}).resources == {"x": 2}  # GPU is num_gpus
    with pytest.raises(ConfigError, match="needs 2: leave GPU out"):
        replica_shape("vllm", {"tensor_parallel_size": 2}, 1.0, {"GPU": 1})
    with pytest.raises(ConfigError, match="--replica-cpus"):
        replica_shape("echo", None, 1.0, {"CPU": 2})


def test_placement_groups_of_gpu_bundles(probed: dict[str, Any]) -> None:
    placed = probed["place"]
    tp2 = placed["tp2"]
    assert tp2["engine_options"]["distributed_executor_backend"] == "ray"
    assert list(tp2["bundles"].values()) == [{"GPU": 1.0, "CPU": 1.0}, {"GPU": 1.0}]
    where = tp2["where"]
    assert where["group"] == tp2["group"] and where["gpus"] == []  # the actor: in the group, no GPU of its own
    # vLLM-style workers started by the actor are captured by the group, one GPU each, both on one node's two.
    assert [w[0] for w in where["workers"]] == [tp2["group"]] * 2
    assert sorted(w[1][0] for w in where["workers"]) == [0, 1]
    tp1, echo = placed["tp1"]["where"], placed["echo_gpu"]["where"]
    assert tp1["group"] is None and len(tp1["gpus"]) == 1  # a vllm replica asks Ray for its GPU
    assert echo["group"] is None and len(echo["gpus"]) == 1  # "GPU" in --replica-resources is num_gpus
    # Three GPUs on one node: no node has them (two each), so the group and its actor wait.
    assert placed["tp3"]["group_state"] == "PENDING" and placed["tp3"]["where"] is None


def test_vllm_without_vllm_here_fails_with_the_replicas_error(
    cluster: dict[str, Any], server_factory: Callable[..., ServerProc], tmp_path: Path
) -> None:
    srv = server_factory(
        "--engine", "vllm", "--model-path", str(tmp_path / "model"), "--tensor-parallel-size", "2",
        "--executor", "ray", "--ray-address", cluster["address"], "--replicas", "1", start=False,
    )  # fmt: skip
    with pytest.raises(RuntimeError, match="server exited"):
        srv.start(timeout=60)
    # The API process has no vLLM and did not need it; the replica it placed cannot build one either.
    log = srv.log()
    assert (
        "ERROR:    the vllm engine cannot start: replica 0 could not be created: the vllm engine needs vllm: pip" in log
    )
    assert "Traceback" not in log, log


def test_a_failed_start_says_why_and_removes_its_groups(probed: dict[str, Any]) -> None:
    started = probed["engine"]
    assert started["tp2"]["error"].startswith("replica ")
    assert 'could not be created: the vllm engine needs vllm: pip install "llmbatch[vllm]"' in started["tp2"]["error"]
    assert started["tp3"]["error"] == (
        "no vllm replica was placed within 1 s (the cluster has no room for a placement group of 3 GPUs on one "
        "node ({'GPU': 3.0, 'CPU': 1.0}) per replica), and this process cannot stand in to describe the engine "
        '(the vllm engine needs vllm: pip install "llmbatch[vllm]" (Linux with a CUDA GPU)): free room, or give '
        "a longer --replica-placement-wait"
    )
    assert started["tp2"]["groups"] == started["tp3"]["groups"] == ["REMOVED", "REMOVED"]


def test_a_replica_describes_an_engine_this_process_cannot_build(
    cluster: dict[str, Any], server_factory: Callable[..., ServerProc], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("llama_cpp")
    from llmbatch.engines._packaged import DEFAULT_CHAT_MODEL, local_engine_available

    if not local_engine_available():
        pytest.skip("the packaged SmolLM2 model is not installed")
    # The API process alone cannot import llama_cpp (find_spec answers None for a None module);
    # the cluster's workers, started by its own processes, can.
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['llama_cpp'] = None\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join((str(hide), os.environ["PYTHONPATH"])))
    srv = server_factory(
        "--engine", "llamacpp", "--n-threads", "1", "--embedding-model", "none", "--executor", "ray",
        "--ray-address", cluster["address"], "--replicas", "1", "--replica-cpus", "1", start=False,
    )  # fmt: skip
    srv.start(timeout=60)
    assert "replica 0 describes the engine (the llamacpp engine needs llama_cpp" in srv.log()
    client = srv.client()
    assert [m.id for m in client.models.list()] == [DEFAULT_CHAT_MODEL]
    rows = [chat_line(i, f"Say {i}.", model=DEFAULT_CHAT_MODEL, max_tokens=4, temperature=0) for i in range(3)]
    done = run_batch(client, rows)
    assert done.status == "completed" and done.request_counts.completed == 3, done  # type: ignore[union-attr]
    for line in read_jsonl(client, done.output_file_id):
        body = line["response"]["body"]
        assert body["model"] == DEFAULT_CHAT_MODEL and body["usage"]["completion_tokens"] >= 1
    # The facts' model check, in the API process: a batch for another model fails validation.
    bad = run_batch(client, [chat_line(0, model="gpt-4o-mini")])
    assert bad.status == "failed" and bad.errors.data[0].code == "model_not_found", bad  # type: ignore[union-attr]
    assert DEFAULT_CHAT_MODEL in bad.errors.data[0].message  # type: ignore[union-attr,operator]
    r = httpx.post(f"{srv.base_url}/chat/completions", json={"model": "nope", "messages": []}, timeout=10)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
