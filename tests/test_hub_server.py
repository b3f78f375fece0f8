"""The local Hub (`tests/hub_server.py`): real huggingface_hub/transformers clients push to it and load from it."""

import base64
import json
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hub_server import LocalHub, git_blob_oid, local_hub, run_python  # noqa: F401  (local_hub is a fixture)
from modeling_nlip import NLIPModel
from nlip_testing import tiny_nlip_config, tiny_processor, write_shard

TESTS_DIR = str(Path(__file__).parent)
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _request(url: str, method: str = "GET", body: bytes | None = None, token: str | None = "dummy"):
    """(status, headers, body) of one raw HTTP request, without any proxy."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with _NO_PROXY.open(request, timeout=10) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def _create(hub: LocalHub, name: str, **payload) -> str:
    status, _, body = _request(f"{hub.url}/api/repos/create", "POST", json.dumps({"name": name, **payload}).encode())
    assert status == 200, body
    return json.loads(body)["name"]


def _commit(hub: LocalHub, repo_id: str, *operations: dict, revision: str = "main", **header):
    lines = [{"key": "header", "value": {"summary": "test", **header}}, *operations]
    body = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    return _request(f"{hub.url}/api/models/{repo_id}/commit/{revision}", "POST", body)


def test_protocol_headers_and_errors(local_hub):
    repo_id = _create(local_hub, "raw")
    assert repo_id == "nlip-tester/raw"
    content = b"\x00\x01weights" * 1000
    status, _, body = _commit(local_hub, repo_id, {"key": "file", "value": {"path": "w/x.bin", "encoding": "base64",
                                                                          "content": base64.b64encode(content).decode()}})
    assert status == 200, body
    commit = json.loads(body)["commitOid"]
    assert len(commit) == 40 and json.loads(body)["commitUrl"] == f"{local_hub.url}/{repo_id}/commit/{commit}"

    # HEAD answers what hf_hub_download checks, without a body; GET returns the bytes.
    status, headers, body = _request(f"{local_hub.url}/{repo_id}/resolve/main/w/x.bin", "HEAD")
    assert (status, body) == (200, b"")
    assert headers["X-Repo-Commit"] == commit
    assert headers["ETag"] == f'"{git_blob_oid(content)}"' and int(headers["Content-Length"]) == len(content)
    assert _request(f"{local_hub.url}/{repo_id}/resolve/{commit}/w/x.bin")[2] == content

    status, headers, _ = _request(f"{local_hub.url}/{repo_id}/resolve/main/missing.txt", "HEAD")
    assert (status, headers["X-Error-Code"], headers["X-Repo-Commit"]) == (404, "EntryNotFound", commit)
    status, headers, _ = _request(f"{local_hub.url}/{repo_id}/resolve/nobranch/w/x.bin", "HEAD")
    assert (status, headers["X-Error-Code"]) == (404, "RevisionNotFound")
    status, headers, _ = _request(f"{local_hub.url}/nlip-tester/none/resolve/main/x", "HEAD")
    assert (status, headers["X-Error-Code"]) == (404, "RepoNotFound")

    # Writes need a token; LFS pointers and path escapes are refused with a reason; a stale parent is refused.
    assert _request(f"{local_hub.url}/api/repos/create", "POST", b'{"name": "x"}', token=None)[0] == 401
    status, _, body = _request(f"{local_hub.url}/api/repos/create", "POST", b'{"name": "x", "organization": ".."}')
    assert status == 400 and "Invalid repo id '../x'" in json.loads(body)["error"]
    status, _, body = _commit(local_hub, repo_id, {"key": "lfsFile", "value": {"path": "big.bin", "oid": "0" * 64}})
    assert status == 400 and "only stores inline files" in json.loads(body)["error"]
    status, _, body = _commit(local_hub, repo_id, {"key": "file", "value": {"path": "../x", "encoding": "base64", "content": ""}})
    assert status == 400 and "Invalid file path" in json.loads(body)["error"]
    status, _, body = _commit(local_hub, repo_id, parentCommit="f" * 40)
    assert status == 412 and f"is not the head of 'main' ({commit})" in json.loads(body)["error"]
    assert _request(f"{local_hub.url}/api/models/{repo_id}/commit/main", "POST", b"not json")[0] == 400

    # Preupload: every file inline, with the current blob id so unchanged files are skipped by the client.
    payload = json.dumps({"files": [{"path": "w/x.bin", "size": 1, "sample": ""}, {"path": "new", "size": 1, "sample": ""}]})
    status, _, body = _request(f"{local_hub.url}/api/models/{repo_id}/preupload/main", "POST", payload.encode())
    files = {f["path"]: f for f in json.loads(body)["files"]}
    assert status == 200 and {f["uploadMode"] for f in files.values()} == {"regular"}
    assert files["w/x.bin"]["oid"] == git_blob_oid(content) and files["new"]["oid"] is None

    # The tree lists directories and files; a quoted sub-path lists that folder only.
    tree = json.loads(_request(f"{local_hub.url}/api/models/{repo_id}/tree/main?recursive=true")[2])
    assert [(e["type"], e["path"]) for e in tree] == [("directory", "w"), ("file", ".gitattributes"), ("file", "w/x.bin")]
    assert [e["path"] for e in json.loads(_request(f"{local_hub.url}/api/models/{repo_id}/tree/main/w")[2])] == ["w/x.bin"]
    assert _request(f"{local_hub.url}/api/models/{repo_id}/tree/main/nope")[0] == 404


def test_huggingface_hub_client_round_trip(local_hub, tmp_path):
    """upload_folder / list_repo_files / hf_hub_download / branches / private repos through the real client."""
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    weights = np.random.default_rng(0).integers(0, 256, 300_000, dtype=np.uint8).tobytes()  # above the LFS threshold
    (folder / "sub" / "model.safetensors").write_bytes(weights)
    (folder / "config.json").write_text('{"a": 1}')
    (folder / "README.md").write_text("---\nlicense: mit\ntags:\n- nlip\n---\n# Card\n")
    script = textwrap.dedent(
        f"""
        import json
        from huggingface_hub import HfApi, hf_hub_download, list_repo_files, upload_folder
        from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError
        api = HfApi()
        repo = api.create_repo("files", private=True).repo_id
        assert api.create_repo("files", exist_ok=True).repo_id == repo
        first = upload_folder(folder_path={str(folder)!r}, repo_id=repo, commit_message="add files")
        again = upload_folder(folder_path={str(folder)!r}, repo_id=repo)  # nothing changed: no new commit
        api.create_branch(repo, branch="dev")
        api.upload_file(path_or_fileobj=b"dev only", path_in_repo="dev.txt", repo_id=repo, revision="dev")
        api.delete_file("config.json", repo)
        info = api.model_info(repo)
        missing = []
        for call in (lambda: hf_hub_download(repo, "nope.txt"), lambda: hf_hub_download("nlip-tester/none", "x"),
                     lambda: hf_hub_download(repo, "README.md", token=False)):
            try:
                call()
            except (EntryNotFoundError, RepositoryNotFoundError) as error:
                missing.append(type(error).__name__)
        print(json.dumps({{
            "repo": repo, "same_commit": first.oid == again.oid,
            "files_at_first": list_repo_files(repo, revision=first.oid),
            "files_main": list_repo_files(repo), "files_dev": list_repo_files(repo, revision="dev"),
            "weights": hf_hub_download(repo, "sub/model.safetensors", revision=first.oid),
            "config_at_first": open(hf_hub_download(repo, "config.json", revision=first.oid)).read(),
            "private": info.private, "license": info.card_data.license, "tags": info.tags, "missing": missing,
        }}))
        """
    )
    result = json.loads(run_python(script, local_hub.env(tmp_path / "hf_home")))
    assert result["repo"] == "nlip-tester/files" and result["same_commit"]
    assert result["files_at_first"] == [".gitattributes", "README.md", "config.json", "sub/model.safetensors"]
    assert result["files_main"] == [".gitattributes", "README.md", "sub/model.safetensors"]
    assert result["files_dev"] == [".gitattributes", "README.md", "config.json", "dev.txt", "sub/model.safetensors"]
    assert Path(result["weights"]).read_bytes() == weights and result["config_at_first"] == '{"a": 1}'
    assert result["private"] is True and result["license"] == "mit" and result["tags"] == ["nlip"]
    assert result["missing"] == ["RemoteEntryNotFoundError", "RepositoryNotFoundError", "RepositoryNotFoundError"]


@pytest.mark.slow
def test_push_to_hub_then_remote_code_load_in_fresh_process(local_hub, tmp_path):
    """`push_to_hub` of a tiny NLIPModel + processor; a process without our package loads it back from the Hub."""
    torch.manual_seed(0)
    model = NLIPModel(tiny_nlip_config()).eval()
    processor = tiny_processor()
    model.save_pretrained(tmp_path / "local")
    processor.save_pretrained(tmp_path / "local")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(2)]
    inputs = processor(images=images, text=["a photo of a cat", "a red car"], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model(**inputs)
    torch.save(dict(inputs), tmp_path / "inputs.pt")

    push = textwrap.dedent(
        f"""
        from huggingface_hub import list_repo_files
        from modeling_nlip import NLIPModel, NLIPProcessor
        model = NLIPModel.from_pretrained({str(tmp_path / "local")!r})
        processor = NLIPProcessor.from_pretrained({str(tmp_path / "local")!r})
        repo = model.push_to_hub("tiny-nlip").repo_url.repo_id
        processor.push_to_hub(repo)
        print(sorted(list_repo_files(repo)))
        """
    )
    files = run_python(push, local_hub.env(tmp_path / "home_push")).strip().splitlines()[-1]
    for name in ("config.json", "model.safetensors", "modeling_nlip.py", "configuration_nlip.py", "processing_nlip.py",
                 "processor_config.json", "tokenizer.json", "README.md"):
        assert f"'{name}'" in files

    load = textwrap.dedent(
        f"""
        import sys
        sys.modules["modeling_nlip"] = None  # the package is not importable here
        import torch
        from transformers import AutoModel, AutoProcessor
        model = AutoModel.from_pretrained("nlip-tester/tiny-nlip", trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained("nlip-tester/tiny-nlip", trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        assert type(processor).__name__ == "NLIPProcessor"
        assert processor(text=["a photo of a cat"])["input_ids"][0] == {inputs["input_ids"][0].tolist()!r}
        with torch.no_grad():
            out = model(**torch.load({str(tmp_path / "inputs.pt")!r}))
        torch.save({{"image": out.image_embeds, "text": out.text_embeds}}, {str(tmp_path / "out.pt")!r})
        """
    )
    run_python(load, local_hub.env(tmp_path / "home_load"))  # a fresh HF_HOME: everything comes from the server
    remote = torch.load(tmp_path / "out.pt")
    # Same weights and inputs; another process may sum in another order (its own thread count): float32 rounding only.
    torch.testing.assert_close(remote["image"], expected.image_embeds, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(remote["text"], expected.text_embeds, rtol=1e-6, atol=1e-7)


def test_webdataset_shards_stream_from_hf_paths(local_hub, tmp_path):
    """`hf://` shards through huggingface_hub's own filesystem client (`HfFileSystem`) against the local Hub: a glob
    lists them, and the streamed and mapped pairs, and a second process's stable indices (shard 0's count from its
    `_stats.json` sidecar on the Hub), are those of the local files."""
    from trainers.data.pairs import load_webdataset_pairs

    folder = tmp_path / "shards"
    folder.mkdir()
    write_shard(folder / "00000.tar", 0, 5)
    write_shard(folder / "00001.tar", 10000, 5)
    (folder / "00000_stats.json").write_text(json.dumps({"successes": 5}))
    script = textwrap.dedent(
        f"""
        import json
        import logging
        from datasets.distributed import split_dataset_by_node
        from huggingface_hub import HfApi
        from trainers.data.pairs import load_webdataset_pairs
        from trainers.data.shards import resolve_shards
        HfApi().create_repo("shards", repo_type="dataset")
        HfApi().upload_folder(folder_path={str(folder)!r}, path_in_repo="data", repo_id="nlip-tester/shards",
                              repo_type="dataset")
        pattern = "hf://datasets/nlip-tester/shards/data/*.tar"
        messages = []
        handler = logging.Handler()
        handler.emit = lambda record: messages.append(record.getMessage())
        logging.getLogger("trainers.data.pairs").addHandler(handler)
        stream = load_webdataset_pairs(pattern, streaming=True)
        second = next(iter(split_dataset_by_node(stream, rank=1, world_size=2)))
        print(json.dumps({{
            "shards": resolve_shards(pattern),
            "streamed": [[ex["key"], ex["index"], ex["text"]] for ex in stream],
            "mapped": list(load_webdataset_pairs("hf://datasets/nlip-tester/shards/data/{{00000..00001}}.tar")["key"]),
            "second": [second["key"], second["index"]],
            "messages": messages,
        }}))
        """
    )
    result = json.loads(run_python(script, local_hub.env(tmp_path / "home")).strip().splitlines()[-1])
    assert result["shards"] == [f"hf://datasets/nlip-tester/shards/data/{i:05d}.tar" for i in range(2)]
    local = [[ex["key"], ex["index"], ex["text"]] for ex in load_webdataset_pairs(str(folder / "*.tar"), streaming=True)]
    assert result["streamed"] == local and len(local) == 10
    assert result["mapped"] == [key for key, _, _ in local]
    assert result["second"] == ["00001.tar/10000", 5]
    assert not any("sidecar" in message for message in result["messages"]), result["messages"]  # it was read


def test_standalone_server_prints_its_url_and_stops_on_sigterm(tmp_path):
    server = subprocess.Popen([sys.executable, f"{TESTS_DIR}/hub_server.py", "--port", "0", "--root", str(tmp_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = server.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        status, _, body = _request(f"{url}/api/whoami-v2")
        assert status == 200 and json.loads(body)["name"] == "nlip-tester"
        assert _request(f"{url}/api/whoami-v2", token=None)[0] == 401
    finally:
        server.terminate()
        assert server.wait(timeout=10) == 0
