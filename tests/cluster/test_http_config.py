"""The HTTP server's pieces that need no cluster: its config section, the command line's
overrides (the API key from the flag or the environment), OpenAI-shaped validation errors, the
embedded models' chat template, and the merge of Prometheus exports from several nodes."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from raycake.cli import build_parser, http_config_from_args
from raycake.cluster.config import ClusterConfig, HttpConfig
from raycake.cluster.openai_errors import from_validation_errors
from raycake.cluster.openai_protocol import ChatCompletionRequest, CompletionRequest
from raycake.cluster.prometheus_scrape import merge_raycake_series
from raycake.model.loader import resolve_model_path
from raycake.model.tokenizer import EMBEDDED_CHAT_TEMPLATE, Tokenizer


def test_the_http_section_composes_into_the_cluster_config(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text(
        "http:\n  port: 9001\n  served_model_name: tiny\n"
        "  autoscaling_config:\n    min_replicas: 1\n    max_replicas: 4\n"
        "    target_ongoing_requests: 32\n"
    )
    http = ClusterConfig.from_file(path).http
    assert (http.host, http.port, http.served_model_name) == ("127.0.0.1", 9001, "tiny")
    assert http.autoscaling_config == {
        "min_replicas": 1,
        "max_replicas": 4,
        "target_ongoing_requests": 32,
    }
    assert (http.num_replicas, http.api_key) == (None, None)
    assert "secret" not in repr(HttpConfig(api_key="secret"))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"port": 0}, "http.port: expected an integer in [1, 65535], got 0"),
        ({"port": True}, "http.port: expected an integer in [1, 65535], got True"),
        ({"num_replicas": 0}, "http.num_replicas: expected a positive integer, got 0"),
        (
            {"num_replicas": 2, "autoscaling_config": {"max_replicas": 2}},
            "http.num_replicas: expected null when http.autoscaling_config is set",
        ),
        ({"autoscaling_config": {"min_replica": 1}}, "http.autoscaling_config: expected keys"),
        (
            {"autoscaling_config": {"min_replicas": -1}},
            "http.autoscaling_config.min_replicas: input should be greater than or equal to 0",
        ),
        ({"max_ongoing_requests": 0}, "http.max_ongoing_requests: expected a positive integer"),
        ({"num_cpus": float("nan")}, "http.num_cpus: expected a finite number >= 0"),
        ({"route_prefix": "v1"}, "http.route_prefix: expected a path starting with '/'"),
        ({"api_key": " "}, "http.api_key: expected a non-empty string, or null for no key, got '<redacted>'"),
    ],
)  # fmt: skip
def test_invalid_http_fields_are_named(fields, message):
    with pytest.raises(ValueError) as caught:
        HttpConfig(**fields)
    assert str(caught.value).startswith(message), str(caught.value)


def test_the_command_line_overrides_the_section_and_reads_the_key_once():
    parser = build_parser()
    base = HttpConfig(port=9000)
    args = parser.parse_args(["serve", "--port", "8123"])
    assert http_config_from_args(base, args, {}).port == 8123
    assert http_config_from_args(base, args, {}).api_key is None
    assert http_config_from_args(base, args, {"RAYCAKE_API_KEY": "from-env"}).api_key == "from-env"
    args = parser.parse_args(["serve", "--api-key", "from-flag", "--host", "0.0.0.0"])
    http = http_config_from_args(base, args, {"RAYCAKE_API_KEY": "from-env"})
    assert (http.api_key, http.host, http.port) == ("from-flag", "0.0.0.0", 9000)
    assert parser.parse_args(["serve", "--stdin"]).stdin is True


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        (b'{"model": "m", "prompt": "x", "n": true}', "n", "n: expected a valid integer, got True"),
        (b'{"model": "m", "prompt": "x", "temperature": NaN}', "temperature",
         "temperature: expected a finite number, got nan"),
        (b'{"model": "m", "prompt": [[1], "a"]}', "prompt",
         "prompt: expected a string, a list of strings, a list of token ids or a list of "
         "token-id lists, got [[1], 'a']"),
        (b'{"model": "m", "prompt": "x", "stop": 3}', "stop",
         "stop: expected a string or a list of strings, got 3"),
        (b'{"model": "m", "prompt": "x", "stream_options": {"include_usage": 1}}',
         "stream_options.include_usage", "stream_options.include_usage: expected a valid boolean"),
        (b'{"model": "m", "prompt": "x", "top_n": 1}', "top_n", "top_n: unknown field"),
        (b'{"model": "m"}', "prompt", "prompt: required"),
        (b'{"model": "m", "prompt": "x",', None, "body: expected a JSON object (EOF while parsing"),
        (b'"text"', None, "body: expected a JSON object, got str"),
    ],
)  # fmt: skip
def test_completion_bodies_fail_naming_the_field(body, param, message):
    with pytest.raises(ValidationError) as caught:
        CompletionRequest.model_validate_json(body)
    error = from_validation_errors(caught.value.errors())
    assert (error.status, error.param) == (400, param)
    assert error.message.startswith(message), error.message


def test_chat_message_fields_are_named_with_their_index():
    body = b'{"model": "m", "messages": [{"role": "user", "content": "a"}, {"role": "user"}]}'
    with pytest.raises(ValidationError) as caught:
        ChatCompletionRequest.model_validate_json(body)
    error = from_validation_errors(caught.value.errors())
    assert (error.param, error.message) == ("messages[1].content", "messages[1].content: required")
    parts = ChatCompletionRequest.model_validate_json(
        b'{"model": "m", "messages": [{"role": "user", "content": '
        b'[{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}'
    )
    assert parts.messages[0].text() == "a\nb"


def test_embedded_models_get_a_chat_template_and_other_checkpoints_keep_theirs():
    for name in ("default", "default-moe"):
        tokenizer = Tokenizer.from_dir(resolve_model_path(name))
        assert tokenizer.chat_template == EMBEDDED_CHAT_TEMPLATE
    rendered = tokenizer.apply_chat_template(
        [
            {"role": "system", "content": "utilities\nfor paths"},
            {"role": "user", "content": "import os\n"},
            {"role": "assistant", "content": "import sys\n"},
        ]
    )
    assert rendered == "# utilities\n# for paths\nimport os\nimport sys\n"


TEXT_A = """# HELP ray_raycake_ttft_ms Time to first token.
# TYPE ray_raycake_ttft_ms histogram
ray_raycake_ttft_ms_bucket{NodeAddress="10.0.0.1",le="5.0"} 1.0
ray_raycake_ttft_ms_count{NodeAddress="10.0.0.1"} 1.0
# HELP ray_node_cpu_utilization CPU.
# TYPE ray_node_cpu_utilization gauge
ray_node_cpu_utilization{NodeAddress="10.0.0.1"} 12.0
"""
TEXT_B = """# HELP ray_raycake_ttft_ms Time to first token.
# TYPE ray_raycake_ttft_ms histogram
ray_raycake_ttft_ms_bucket{NodeAddress="10.0.0.2",le="5.0"} 3.0
ray_raycake_ttft_ms_count{NodeAddress="10.0.0.2"} 3.0
# HELP ray_raycake_rejections_total Rejections.
# TYPE ray_raycake_rejections_total counter
ray_raycake_rejections_total{NodeAddress="10.0.0.2",reason="TTFT SLO"} 2.0
"""


def test_metrics_from_several_nodes_merge_into_one_family_each():
    merged = merge_raycake_series([TEXT_A, TEXT_B]).splitlines()
    assert merged == [
        "# HELP ray_raycake_rejections_total Rejections.",
        "# TYPE ray_raycake_rejections_total counter",
        'ray_raycake_rejections_total{NodeAddress="10.0.0.2",reason="TTFT SLO"} 2.0',
        "# HELP ray_raycake_ttft_ms Time to first token.",
        "# TYPE ray_raycake_ttft_ms histogram",
        'ray_raycake_ttft_ms_bucket{NodeAddress="10.0.0.1",le="5.0"} 1.0',
        'ray_raycake_ttft_ms_count{NodeAddress="10.0.0.1"} 1.0',
        'ray_raycake_ttft_ms_bucket{NodeAddress="10.0.0.2",le="5.0"} 3.0',
        'ray_raycake_ttft_ms_count{NodeAddress="10.0.0.2"} 3.0',
    ]
    assert merge_raycake_series(["# HELP ray_other x\nray_other 1\n"]) == ""
