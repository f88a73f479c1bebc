"""Serving: concurrent clients, the CLI process and its shutdown, wire normalization, introspection."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2 as httpx
from google.genai import types

from batchd.emulator import EmulatorServer
from batchd.emulator.wire import has_snake_case_keys, to_camel_case

from .support import MODEL, inline_requests, make_client, output_lines, request_lines, wait_done, write_jsonl


def test_twenty_clients_at_once(emulator: EmulatorServer, tmp_path: Path):
    def one_client(number: int) -> tuple[int, int]:
        client = make_client(emulator.base_url, ("v1", "v1beta")[number % 2])
        path = write_jsonl(tmp_path / f"c{number}.jsonl", request_lines(50, prefix=f"c{number}-"))
        uploaded = client.files.upload(file=str(path), config={"mime_type": "jsonl"})
        file_job = client.batches.create(model=MODEL, src=uploaded.name, config={"display_name": f"crowd-{number}"})
        inline_job = client.batches.create(model=MODEL, src=inline_requests(5, prefix=f"c{number}"))
        lines = output_lines(client, wait_done(client, file_job.name))
        answers = wait_done(client, inline_job.name).dest.inlined_responses
        assert [line["key"] for line in lines] == [f"c{number}-{i}" for i in range(50)]
        return len(lines), len(answers)

    with ThreadPoolExecutor(20) as pool:
        assert list(pool.map(one_client, range(20))) == [(50, 5)] * 20
    stats = httpx.get(emulator.base_url + "/_emulator/stats").json()
    assert all(stats["createsByDisplayName"][f"crowd-{n}"] == 1 for n in range(20))


def test_port_zero_picks_a_free_port_and_two_emulators_coexist(tmp_path: Path):
    with EmulatorServer(tmp_path / "a") as first, EmulatorServer(tmp_path / "b") as second:
        assert first.port != second.port and first.port > 0
        assert first.base_url == f"http://127.0.0.1:{first.port}"


def test_without_state_dir_a_temporary_one_is_used_and_removed():
    server = EmulatorServer().start()
    state = server.state_dir
    assert state.exists()
    server.stop()
    assert not state.exists()


def test_cli_serves_until_sigterm_and_keeps_state(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GOOGLE_", "GEMINI_"))}
    command = [sys.executable, "-m", "batchd.emulator", "--port", "0", "--state-dir", str(tmp_path),
               "--job-seconds", "0.1", "--api-key", "cli-key", "--fault", "shuffle"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        banner = process.stdout.readline()
        assert "listening on http://127.0.0.1:" in banner, process.stderr.read()
        base_url = banner.split("listening on ")[1].split()[0]
        client = make_client(base_url, api_key="cli-key")
        job = wait_done(client, client.batches.create(model=MODEL, src=inline_requests(5)).name)
        assert job.state == types.JobState.JOB_STATE_SUCCEEDED
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0
        assert "stopped" in process.stdout.read()
    finally:
        if process.poll() is None:
            process.kill()
    with EmulatorServer(tmp_path, api_key="cli-key") as emulator:  # kept: a new emulator on it serves the job
        assert make_client(emulator.base_url, api_key="cli-key").batches.get(name=job.name).state == \
            types.JobState.JOB_STATE_SUCCEEDED


def test_cli_refuses_a_bad_fault_spec():
    result = subprocess.run([sys.executable, "-m", "batchd.emulator", "--fault", "explode"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "explode" in result.stderr


def test_snake_case_is_normalized_but_data_names_are_kept():
    body = {
        "generation_config": {
            "max_output_tokens": 5,
            "thinking_config": {"thinking_budget": 0},
            "response_schema": {"type": "OBJECT", "property_ordering": ["first_name"],
                                "properties": {"first_name": {"type": "STRING", "max_length": 3}}},
            "response_json_schema": {"properties": {"snake_prop": {"type": "string"}}},
        },
        "metadata": {"my_key": "v"},
        "labels": {"team_name": "x"},
        "contents": [{"parts": [{"function_response": {"name": "f", "response": {"out_value": 1}}},
                                {"function_call": {"name": "g", "args": {"in_value": 2}}}]}],
    }
    normalized = to_camel_case(body)
    config = normalized["generationConfig"]
    assert config["maxOutputTokens"] == 5 and config["thinkingConfig"] == {"thinkingBudget": 0}
    schema = config["responseSchema"]
    assert schema["propertyOrdering"] == ["first_name"]
    assert schema["properties"] == {"first_name": {"type": "STRING", "maxLength": 3}}
    assert config["responseJsonSchema"] == {"properties": {"snake_prop": {"type": "string"}}}
    assert normalized["metadata"] == {"my_key": "v"} and normalized["labels"] == {"team_name": "x"}
    parts = normalized["contents"][0]["parts"]
    assert parts[0]["functionResponse"]["response"] == {"out_value": 1}
    assert parts[1]["functionCall"]["args"] == {"in_value": 2}


def test_the_snake_case_fast_path_check():
    assert has_snake_case_keys(b'{"generation_config": {}}')
    assert not has_snake_case_keys(json.dumps({"contents": [{"parts": [{"text": 'say "a_b": 1'}]}]}).encode())
    assert not has_snake_case_keys(b'{"generationConfig": {"maxOutputTokens": 1}}')


def test_connections_are_served_without_nagle(emulator: EmulatorServer):
    """asyncio turns Nagle off only on sockets that say they are TCP: with it on, each answer on a
    kept-alive connection waited for the client's delayed ACK (40 ms), as no real server makes one wait."""
    import socket

    listening = emulator._socket
    assert listening.proto == socket.IPPROTO_TCP
    with socket.create_connection(("127.0.0.1", emulator.port)) as client:
        client.sendall(b"GET /v1beta/batches HTTP/1.1\r\nHost: x\r\nx-goog-api-key: k\r\n\r\n")
        assert client.recv(12).startswith(b"HTTP/1.1")
