"""The in-process simulation backend (flmnist/flower_patches/inprocess_backend.py): a ClientApp run on copies of
Flower's real Messages and Context, errors as Flower's, one PyTorch thread; and its place in
Flower 1.41's engine. (That its runs give Ray's numbers is tested end to end in
test_integration.py.)"""

from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.client_app import ClientAppException
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.server.superlink.fleet.vce.backend import raybackend
from flwr.supercore.task_identity import TaskIdentity

from flmnist.core.constants import BACKEND_ENV as ENV
from flmnist.flower_patches import inprocess_backend
from flmnist.flower_patches.inprocess_backend import backend_class
from flmnist.ml.threads import on_torch_thread


@pytest.fixture(autouse=True)
def server_identity(monkeypatch):
    """Who sends: Flower stamps messages with the task's identity, as its simulation sets it."""
    for key, value in (("_task_id", 77), ("_run_id", 1), ("_node_id", SUPERLINK_NODE_ID)):
        monkeypatch.setattr(TaskIdentity, key, value)


def message(value: float = 1.0) -> Message:
    content = RecordDict({"arrays": ArrayRecord({"w": Array(np.full(4, value, dtype=np.float32))}),
                          "config": ConfigRecord({"lr": 0.1})})
    return Message(content, dst_node_id=7, message_type="train")


def context() -> Context:
    return Context(run_id=1, node_id=7, node_config={"partition-id": 0}, state=RecordDict(), run_config={})


def backend_for(app: ClientApp):
    backend = backend_class()({})
    backend.build(lambda: app)
    return backend


@pytest.fixture
def inprocess(monkeypatch):
    monkeypatch.setenv(ENV, "inprocess")


def test_the_clientapp_works_on_copies_and_its_reply_and_context_come_back(inprocess):
    seen = {}
    app = ClientApp()

    @app.train()
    def train(msg: Message, ctx: Context) -> Message:
        seen["msg"], seen["thread"] = msg, threading.current_thread().name
        received = msg.content["arrays"]["w"].numpy()
        msg.content["arrays"]["w"] = Array(np.zeros(4, dtype=np.float32))  # a node scribbling on its input
        ctx.state["calls"] = ConfigRecord({"n": 1})
        return Message(RecordDict({"arrays": ArrayRecord({"w": Array(received * 2)})}), reply_to=msg)

    sent, ctx = message(3.0), context()
    reply, new_ctx = backend_for(app).process_message(sent, ctx)
    assert seen["msg"] is not sent
    np.testing.assert_array_equal(sent.content["arrays"]["w"].numpy(), np.full(4, 3.0))  # the server's copy is intact
    np.testing.assert_array_equal(reply.content["arrays"]["w"].numpy(), np.full(4, 6.0))
    assert reply.metadata.reply_to_message_id == sent.metadata.message_id
    assert new_ctx.state["calls"]["n"] == 1 and "calls" not in ctx.state
    assert seen["thread"].startswith("flmnist-torch")  # the process's one PyTorch thread


def test_a_clientapp_error_becomes_flowers_clientapp_exception(inprocess):
    app = ClientApp()

    @app.train()
    def train(msg: Message, ctx: Context) -> Message:
        raise RuntimeError("injected")

    with pytest.raises(ClientAppException, match="injected"):
        backend_for(app).process_message(message(), context())


def test_an_unbuilt_backend_says_so():
    with pytest.raises(ValueError, match="not built"):
        backend_class()({}).process_message(message(), context())


def test_work_runs_here_unless_clientapps_run_in_process(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert on_torch_thread(lambda: threading.current_thread().name) == threading.current_thread().name
    monkeypatch.setenv(ENV, "inprocess")
    assert on_torch_thread(lambda: threading.current_thread().name).startswith("flmnist-torch")
    # from the PyTorch thread itself, nested calls run where they are (no deadlock)
    assert on_torch_thread(lambda: on_torch_thread(lambda: threading.current_thread().name)).startswith(
        "flmnist-torch")


def test_install_replaces_rays_backend_only_when_asked_and_for_the_pinned_flower(monkeypatch):
    monkeypatch.setattr(raybackend, "RayBackend", raybackend.RayBackend)  # restored afterwards
    monkeypatch.delenv(ENV, raising=False)
    assert not inprocess_backend.install() and not getattr(raybackend.RayBackend, "flmnist", False)
    monkeypatch.setenv(ENV, "ray")
    assert not inprocess_backend.install()
    monkeypatch.setenv(ENV, "inprocess")
    import flwr

    monkeypatch.setattr(flwr, "__version__", "1.42.0")
    assert not inprocess_backend.install()
    monkeypatch.setattr(flwr, "__version__", inprocess_backend.FLWR_VERSION)
    assert inprocess_backend.install()
    # what Flower's engine builds (vce_api.start_vce imports this name) is now the in-process backend
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend

    backend = RayBackend({"client_resources": {"num_cpus": 2}, "init_args": {}})
    assert backend.num_workers == 1 and RayBackend.flmnist


def test_install_in_a_fresh_process_never_imports_ray():
    """A simulation process that loads the ClientApp (whose import installs the backend) and then
    builds its backend as Flower's engine does (vce_api: ``from .backend.raybackend import
    RayBackend``) gets the in-process backend without Ray's import (0.5 s of a core per run)."""
    code = (
        "import os, sys\n"
        f"os.environ['{ENV}'] = 'inprocess'\n"
        "import flmnist.client_app\n"
        "from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend\n"
        "backend = RayBackend({'client_resources': {'num_cpus': 2}, 'init_args': {}})\n"
        "from flmnist.flower_patches import inprocess_backend\n"
        "print(RayBackend.__name__, backend.num_workers, 'ray' in sys.modules, inprocess_backend.install())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["InProcessBackend", "1", "False", "True"]


def test_the_serverapps_thread_runs_pytorch_single_threaded_and_evaluation_keeps_every_thread():
    """In its own process: the thread counts are process-wide state."""
    code = (
        "import os, threading, torch\n"
        f"os.environ['{ENV}'] = 'inprocess'\n"
        "from flmnist.ml.threads import confine_torch, on_torch_thread\n"
        "before = torch.get_num_threads()\n"
        "confine_torch()\n"
        "print(before, torch.get_num_threads(), on_torch_thread(torch.get_num_threads))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    before, here, there = map(int, out.stdout.split())
    assert here == 1 and there == before
