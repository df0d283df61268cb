"""The Serve application builder a RayService names (``raycake.cluster.openai_app:app_builder``):
it brings the deployment up detached from the config file in its args, or attaches to the one
running, and serves the OpenAI API over it; ``shutdown_deployment`` ends the detached actors."""

from __future__ import annotations

import socket

import openai
import pytest
import ray
import yaml
from ray import serve

from raycake import LLM, SamplingParams
from raycake.cluster.config import ClusterConfig
from raycake.cluster.deployment import deployment_is_running, shutdown_deployment
from raycake.cluster.openai_app import app_builder
from tests.ray_fixture import ray_session  # noqa: F401 - the session fixture

NAMESPACE = "raycake-test-builder"


@pytest.fixture(scope="module")
def config_path(ray_session, tmp_path_factory):  # noqa: F811
    path = tmp_path_factory.mktemp("builder") / "cluster.yaml"
    path.write_text(
        yaml.safe_dump(
            {"namespace": NAMESPACE, "num_prefill": 1, "num_decode": 1, "num_store_shards": 1}
        )
    )
    yield path
    shutdown_deployment(ClusterConfig.from_file(path))


def test_builder_launches_detached_actors_serves_and_attaches_again(config_path):
    config = ClusterConfig.from_file(config_path)
    assert not deployment_is_running(config)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(app_builder({"config": str(config_path)}), name="builder", route_prefix="/b")
        conductor = ray.get_actor("raycake-conductor", namespace=NAMESPACE)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/b/v1", api_key="x")
        reply = client.completions.create(
            model="default", prompt="def fibonacci(n):", max_tokens=12, temperature=0
        )
        params = SamplingParams(temperature=0, max_tokens=12)
        assert reply.choices[0].text == LLM().generate(["def fibonacci(n):"], params)[0].text
        # A second build (a redeploy) attaches to the running actors: none is created again.
        serve.run(app_builder({"config": str(config_path)}), name="builder", route_prefix="/b")
        again = ray.get_actor("raycake-conductor", namespace=NAMESPACE)
        assert again._actor_id == conductor._actor_id
    finally:
        serve.shutdown()
    # The actors are detached: Serve going away leaves them; shutdown_deployment ends them.
    assert deployment_is_running(config)
    # autoscaler, conductor, 1 prefill, 1 decode, 1 store shard
    assert shutdown_deployment(config) == 5
    assert not deployment_is_running(config)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({}, "args.config: expected the path of a cluster config file, got None"),
        ({"config": 3}, "args.config: expected the path"),
        ({"config": "x.yaml", "port": 1}, r"args: unknown key\(s\) \['port'\]"),
        ("x.yaml", "args: expected a mapping"),
    ],
)
def test_builder_checks_its_args_before_any_work(args, message):
    with pytest.raises(ValueError, match=message):
        app_builder(args)
